"""The learning-rate rules: ``lr_high`` (a rate that diverges) and ``no_warmup`` (no ramp at the start).

Both quote the config's own values as written. ``no_warmup`` warns only on evidence in the file (a
warmup key set to 0, or a Hugging Face config, whose default is no warmup); when the warmup may be
in the training script or another file, it asks instead (severity ``info``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from nanguard.lint import vocabulary as vocab
from nanguard.lint.context import Context, LearningRate, factor, show
from nanguard.lint.findings import Finding, KeyPath
from nanguard.lint.locate import FAMILIES, total_epochs, total_steps
from nanguard.lint.tree import get_path, key_name, walk

HF_DEFAULT_LR = 5e-5
WARMUP_FRACTION = 0.03
FULL_FINE_TUNE_LR = 2e-5  # the usual AdamW rate for a full fine-tune of a pretrained model
ADAPTER_FINE_TUNE_LR = 2e-4  # the usual rate for LoRA/QLoRA adapters


# --- lr_high -----------------------------------------------------------------------------------------


def lr_high(ctx: Context) -> list[Finding]:
    findings = []
    for lr in ctx.learning_rates:
        if _scaled_by_noam(ctx.data, lr.key_path):
            continue
        verdict = lr_verdict(ctx, lr)
        if verdict is None:
            continue
        severity, threshold, fix, why = verdict
        setting = " for fine-tuning" if severity == "warning" else ""
        findings.append(
            Finding(
                "lr_high",
                lr.key_path,
                lr.value,
                f"learning rate {ctx.spelled(lr.key_path, lr.value)} is above {show(threshold)}{setting} for "
                f"{ctx.family_label(lr.family)} optimizer; rates this high typically diverge to inf/NaN "
                f"early. Try {show(fix)} ({why}).",
                fix=fix,
                severity=severity,
            )
        )
    return findings


def lr_verdict(ctx: Context, lr: LearningRate) -> tuple[str, float, float, str] | None:
    """(severity, threshold crossed, suggested rate, why that rate) when ``lr`` is too high, else None."""
    family = FAMILIES[lr.family]
    warn = family.lr_warn_fine_tuning if ctx.fine_tuning else None
    if lr.number > family.lr_error:
        severity, threshold = "error", family.lr_error
    elif warn is not None and lr.number > warn:
        severity, threshold = "warning", warn
    else:
        return None
    if ctx.fine_tuning and lr.family == "adam":
        fix = ADAPTER_FINE_TUNE_LR if ctx.adapters else FULL_FINE_TUNE_LR
        kind = "LoRA/adapter" if ctx.adapters else "full"
        return severity, threshold, fix, f"the usual rate for {kind} fine-tuning, {factor(lr.number, fix)}"
    ceiling = warn if warn is not None else family.lr_error
    ten_x = _nice_round(lr.number / 10) if math.isfinite(lr.number) else ceiling
    if ten_x <= ceiling:
        return severity, threshold, ten_x, "10x lower"
    return severity, threshold, ceiling, f"the highest rate this check accepts, {factor(lr.number, ceiling)}"


def _nice_round(value: float, digits: int = 2) -> float:
    """1e-3/10 reads 1e-4, not 1.0000000000000002e-4."""
    return float(f"{value:.{digits}g}")


def _scaled_by_noam(data: Mapping[Any, Any], key_path: KeyPath) -> bool:
    """A Noam/inverse-sqrt scheduler beside the rate: NeMo's ``lr: 2.0`` is then a multiplier of
    ``d_model ** -0.5``, not a learning rate."""
    for depth in range(len(key_path) - 1, max(-1, len(key_path) - 4), -1):
        container = get_path(data, key_path[:depth])
        if not isinstance(container, Mapping):
            continue
        for key, value in container.items():
            if "sched" in str(key).lower() and _names_a(value, vocab.NOAM_WORDS):
                return True
    return False


def _names_a(value: Any, words: tuple[str, ...]) -> bool:
    names = [value] if isinstance(value, str) else []
    if isinstance(value, Mapping):
        names = [v for k, v in value.items() if key_name((str(k),)) in vocab.CLASS_NAME_KEYS]
    return any(isinstance(n, str) and any(w in n.lower().replace("_", "") for w in words) for n in names)


# --- no_warmup --------------------------------------------------------------------------------------


def no_warmup(ctx: Context) -> list[Finding]:
    peak = _peak_learning_rate(ctx)
    if peak is None:
        return []
    lr, family = peak
    threshold = FAMILIES[family].warmup_from
    if threshold is None or lr.number < threshold:
        return []
    zero: list[tuple[KeyPath, Any]] = []
    for path, value, parent in walk(ctx.data):
        if not isinstance(parent, Mapping) or key_name(path) not in vocab.WARMUP_KEYS:
            continue
        if _warmup_is_set(value):
            return []
        zero.append((path, value))
    if _has_ramping_scheduler(ctx.data, {path[:-1] for path, _ in zero}):
        return []
    why = f"with a peak learning rate of {ctx.spelled(lr.key_path, lr.value)}{_lowered(ctx, lr)}"
    if zero:
        return [_zero_warmup(ctx, zero, why)]
    if ctx.sections.huggingface is not None:
        return [_hf_missing_warmup(ctx, ctx.sections.huggingface, why)]
    if ctx.sections.nanogpt or ctx.sections.torchtitan:
        return []  # nanoGPT's train.py (warmup_iters=2000) and torchtitan (warmup_steps=200) warm up
    where = "the training script or another config file"
    return [
        Finding(
            "no_warmup",
            lr.key_path,
            lr.value,
            f"no warmup setting in this file {why}: does {where} warm the learning rate up? Without a "
            "warmup the first Adam updates are large and can diverge.",
            severity="info",
        )
    ]


def _lowered(ctx: Context, lr: LearningRate) -> str:
    verdict = lr_verdict(ctx, lr)
    return "" if verdict is None else f" (lr_high suggests {show(verdict[2])})"


def _warmup_is_set(value: Any) -> bool:
    """Positive, 'auto' (filled in at launch) or unreadable (a mapping, an expression): not provably 0."""
    from nanguard.lint.tree import as_number

    if value is None or value is False:
        return False
    number = as_number(value)
    return number is None or number > 0


def _peak_learning_rate(ctx: Context) -> tuple[LearningRate, str] | None:
    """The highest learning rate the file sets (HF's default 5e-5 when a HF config sets none)."""
    rates = [lr for lr in ctx.learning_rates if math.isfinite(lr.number) and not _scaled_by_noam(ctx.data, lr.key_path)]
    if rates:
        peak = max(rates, key=lambda lr: lr.number)
        return peak, peak.family
    section = ctx.sections.huggingface
    if section is not None:
        return LearningRate((*section, "learning_rate"), HF_DEFAULT_LR, HF_DEFAULT_LR, "adam"), "adam"
    return None


def _has_ramping_scheduler(data: Mapping[Any, Any], zeroed_scopes: set[KeyPath]) -> bool:
    """A OneCycle, Noam or Warmup* scheduler ramps up by itself unless its own warmup key is 0."""
    for path, value, parent in walk(data):
        if not isinstance(parent, Mapping) or not isinstance(value, str):
            continue
        if key_name(path) not in (*vocab.CLASS_NAME_KEYS, "class_path", "scheduler", "lr_scheduler", "lr_scheduler_type", "sched"):
            continue
        name = value.lower().rsplit(".", 1)[-1].replace("_", "")
        if any(word.replace("_", "") in name for word in vocab.RAMPING_SCHEDULER_WORDS):
            scope = path[:-1]
            if not any(zeroed[: len(scope)] == scope for zeroed in zeroed_scopes):
                return True
    return False


def _zero_warmup(ctx: Context, zero: list[tuple[KeyPath, Any]], why: str) -> Finding:
    steps = total_steps(ctx.data)
    ratio_first = sorted(zero, key=lambda item: key_name(item[0]) not in vocab.WARMUP_RATIO_KEYS)
    path, value = ratio_first[0]
    fix = _warmup_value(ctx, key_name(path), steps)
    if fix is None and ctx.sections.huggingface == path[:-1] and key_name(path) == "warmup_steps":
        return _hf_missing_warmup(ctx, path[:-1], why, after=str(path[-1]), zero_value=ctx.spelled(path, value))
    advice = "Warm up linearly over ~3% of training steps." if fix is None else f"Set it to {show(fix)}."
    return Finding(
        "no_warmup",
        path,
        value,
        f"warmup is {ctx.spelled(path, value)} {why}: the first updates are large and can diverge. {advice}",
        fix=fix,
    )


def _hf_missing_warmup(
    ctx: Context, section: KeyPath, why: str, after: str | None = None, zero_value: str | None = None
) -> Finding:
    """TrainingArguments default to no warmup. Before transformers 5 a fraction goes in warmup_ratio;
    from 5 on, warmup_steps below 1 is read as a fraction."""
    steps = total_steps(ctx.data)
    said = f"warmup_steps is {zero_value}" if zero_value is not None else "no warmup is set"
    if steps is not None and after is None:
        fix: Any = max(1, round(WARMUP_FRACTION * steps[1]))
        key = "warmup_steps"
    else:
        key = "warmup_steps" if transformers_major() >= 5 else "warmup_ratio"
        fix = WARMUP_FRACTION
    hf_args = get_path(ctx.data, section, {})
    exists = isinstance(hf_args, Mapping) and key in hf_args
    return Finding(
        "no_warmup",
        (*section, key),
        hf_args.get(key) if exists else None,
        f"{said} {why}, and Hugging Face's default is no warmup: the first updates are large and can "
        f"diverge. Set {key}: {show(fix)} (3% of training).",
        fix=fix,
        exists=exists,
        insert_after=after if after != key else None,
    )


def _warmup_value(ctx: Context, name: str, steps: tuple[str, int] | None) -> Any:
    if name in vocab.WARMUP_RATIO_KEYS:
        return WARMUP_FRACTION
    if name in vocab.WARMUP_EPOCH_KEYS:
        epochs = total_epochs(ctx.data)
        return max(1, round(WARMUP_FRACTION * epochs)) if epochs is not None and epochs >= 2 else None
    return max(1, round(WARMUP_FRACTION * steps[1])) if steps is not None else None


def transformers_major() -> int:
    """The installed transformers' major version; 4 (the most common in configs) when not installed."""
    try:
        return int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 4
