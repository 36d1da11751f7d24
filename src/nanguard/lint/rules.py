"""The lint rules: pure functions from the facts of one config to findings.

Every rule here is documented in :data:`nanguard.lint.findings.RULES` (thresholds and their reasons).
A rule that proposes a fix must propose one that its own check accepts, so a fixed file re-lints clean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from importlib import metadata
from typing import Any

from nanguard.lint import vocabulary as vocab
from nanguard.lint.findings import Finding, KeyPath
from nanguard.lint.locate import (
    FAMILIES,
    Precision,
    Sections,
    find_sections,
    is_optimizer_scope,
    looks_like_fine_tuning,
    optimizer_family,
    read_precision,
    total_epochs,
    total_steps,
)
from nanguard.lint.tree import (
    as_bool,
    as_infinite,
    as_number,
    get_path,
    is_deferred,
    key_name,
    nice_round,
    parent_name,
    walk,
)

FP16_SMALLEST_SUBNORMAL = 2.0**-24  # ~5.96e-8: anything smaller rounds to 0 in float16
HF_DEFAULT_LR = 5e-5
WARMUP_FRACTION = 0.03
CLIP_FIX = 1.0
EPS_FIX_FP16 = 1e-6
EPS_FIX_FP32 = 1e-8


@dataclass(frozen=True)
class LearningRate:
    key_path: KeyPath
    value: Any
    number: float
    family: str


class Context:
    """One config's tree and the facts the rules share, each computed once."""

    def __init__(self, data: Mapping[Any, Any]) -> None:
        self.data = data

    @cached_property
    def sections(self) -> Sections:
        return find_sections(self.data)

    @cached_property
    def precision(self) -> Precision:
        return read_precision(self.data)

    @cached_property
    def fine_tuning(self) -> bool:
        return looks_like_fine_tuning(self.data, self.sections)

    @cached_property
    def learning_rates(self) -> list[LearningRate]:
        rates = []
        for path, value, parent in walk(self.data):
            if not isinstance(parent, Mapping) or key_name(path) not in vocab.LR_KEYS or is_deferred(value):
                continue
            number = as_number(value)
            if number is not None and not math.isnan(number):
                rates.append(
                    LearningRate(path, value, number, optimizer_family(self.data, path, self.sections))
                )
        return rates

    def family_label(self, family: str) -> str:
        return {"adam": "Adam-family", "unknown": "an unidentified"}.get(family, family.capitalize())


# --- lr_high -----------------------------------------------------------------------------------------


def lr_high(ctx: Context) -> list[Finding]:
    findings = []
    for lr in ctx.learning_rates:
        verdict = _lr_verdict(ctx, lr)
        if verdict is None:
            continue
        severity, threshold, fix = verdict
        setting = " for fine-tuning" if severity == "warning" else ""
        findings.append(
            Finding(
                "lr_high",
                lr.key_path,
                lr.value,
                f"learning rate {lr.value} is above {show(threshold)}{setting} with "
                f"{ctx.family_label(lr.family)} optimizer; rates this high typically diverge to inf/NaN "
                f"early. Try {show(fix)} (10x lower).",
                fix=fix,
                severity=severity,
            )
        )
    return findings


def _lr_verdict(ctx: Context, lr: LearningRate) -> tuple[str, float, float] | None:
    """(severity, threshold crossed, suggested lr) when ``lr`` is too high, else None."""
    family = FAMILIES[lr.family]
    warn = family.lr_warn_fine_tuning if ctx.fine_tuning else None
    if lr.number > family.lr_error:
        severity, threshold = "error", family.lr_error
    elif warn is not None and lr.number > warn:
        severity, threshold = "warning", warn
    else:
        return None
    ceiling = warn if warn is not None else family.lr_error
    fix = nice_round(lr.number / 10) if math.isfinite(lr.number) else ceiling
    return severity, threshold, min(fix, ceiling)


def show(number: float) -> str:
    """1.0 -> '1.0', 1e-08 -> '1e-08', 0.03 -> '0.03': short, and still visibly a float."""
    if isinstance(number, float) and number.is_integer() and abs(number) < 1e6:
        return f"{number:.1f}"
    return f"{number:g}"


# --- no_grad_clipping -----------------------------------------------------------------------------


def no_grad_clipping(ctx: Context) -> list[Finding]:
    disabled: list[tuple[KeyPath, Any]] = []
    for path, value, parent in walk(ctx.data):
        if not isinstance(parent, Mapping) or key_name(path) not in vocab.CLIP_KEYS:
            continue
        if isinstance(value, Mapping):
            if "max_norm" not in value:
                return []  # a structure we do not know: assume it clips
            path, value = (*path, "max_norm"), value["max_norm"]
        if _clipping_enabled(value):
            return []
        disabled.append((path, value))
    if disabled:
        return [
            Finding(
                "no_grad_clipping",
                path,
                value,
                f"gradient clipping is disabled ({key_name(path)}={value}); one bad batch can push the "
                f"weights to inf. Set it to {show(CLIP_FIX)}.",
                fix=CLIP_FIX,
            )
            for path, value in disabled
        ]
    return _missing_clipping(ctx)


def _clipping_enabled(value: Any) -> bool:
    if value is None or value is False or (isinstance(value, str) and as_bool(value) is False):
        return False
    number = as_number(value)
    if number is None:
        return True  # 'auto', true, an expression: not provably off
    return math.isfinite(number) and number > 0


def _missing_clipping(ctx: Context) -> list[Finding]:
    sections = ctx.sections
    where: KeyPath
    after: str | None
    if sections.huggingface is not None:
        return []  # TrainingArguments.max_grad_norm defaults to 1.0
    if sections.lightning:
        where, after, why = (
            ("trainer", "gradient_clip_val"),
            None,
            "Lightning's default gradient_clip_val is None",
        )
    elif sections.deepspeed == ():
        after = _first_present(ctx.data, ("gradient_accumulation_steps", "train_micro_batch_size_per_gpu"))
        where, why = ("gradient_clipping",), "DeepSpeed's default gradient_clipping is 0 (off)"
    elif ctx.learning_rates:
        container, after = beside(ctx.learning_rates[0].key_path)
        where, why = (*container, "max_grad_norm"), "no clipping key is set"
    else:
        return []
    return [
        Finding(
            "no_grad_clipping",
            where,
            None,
            f"no gradient clipping ({why}); one bad batch can push the weights to inf. "
            f"Add {where[-1]}: {show(CLIP_FIX)}.",
            fix=CLIP_FIX,
            exists=False,
            insert_after=after,
        )
    ]


def beside(key_path: KeyPath) -> tuple[KeyPath, str]:
    """Where a new training setting goes near ``key_path``: its own mapping, unless that is an optimizer
    mapping (``optimizer: {_target_: AdamW, lr: ...}``), whose keys become constructor arguments; then
    the mapping that holds the optimizer, right after it."""
    for index, part in enumerate(key_path[:-1]):
        if isinstance(part, str) and "optim" in part.lower():
            return key_path[:index], str(part)
    return key_path[:-1], str(key_path[-1])


def _first_present(mapping: Mapping[Any, Any], keys: tuple[str, ...]) -> str | None:
    return next((key for key in keys if key in mapping), None)


# --- precision: loss scaling and fp16/bf16 -----------------------------------------------------------


def fp16_loss_scaling(ctx: Context) -> list[Finding]:
    """fp16_without_loss_scaling (scaling off) and loss_scale_static (a fixed scale)."""
    findings = []
    for problem in ctx.precision.scaling:
        if problem.kind == "off":
            rule = "fp16_without_loss_scaling"
            advice = "use dynamic loss scaling, or bf16 which needs none"
        else:
            rule = "loss_scale_static"
            advice = "use dynamic loss scaling: a fixed scale overflows or lets small gradients underflow"
        fix_text = f" Fix: {problem.fix!r}." if problem.fix is not None else ""
        findings.append(
            Finding(
                rule,
                problem.key_path,
                problem.value,
                f"fp16 training: {problem.reason}; {advice}.{fix_text}",
                fix=problem.fix,
                exists=problem.exists,
                insert_after=problem.insert_after,
            )
        )
    return findings


def bf16_and_fp16_both(ctx: Context) -> list[Finding]:
    precision = ctx.precision
    bf16 = [s for s in precision.bf16 if _is_enable_setting(s.key_path)]
    if not bf16:
        return []
    switches = {s.key_path for s in precision.fp16_switches}
    return [
        Finding(
            "bf16_and_fp16_both",
            setting.key_path,
            setting.value,
            f"fp16 is enabled here and bf16 at {'.'.join(map(str, bf16[0].key_path))}; keep bf16 "
            "(float32 range, no loss scaling) and turn fp16 off.",
            fix=False if setting.key_path in switches else None,
        )
        for setting in precision.fp16
        if _is_enable_setting(setting.key_path)
    ]


def _is_enable_setting(path: KeyPath) -> bool:
    name = key_name(path)
    if name == "enabled":
        name = parent_name(path)
    enable_keys = (
        vocab.FP16_SWITCH_KEYS | vocab.BF16_SWITCH_KEYS | vocab.PRECISION_KEYS | vocab.AMP_SWITCH_KEYS
    )
    return name in enable_keys


# --- Adam epsilon -----------------------------------------------------------------------------------


def adam_eps(ctx: Context) -> list[Finding]:
    """adam_eps_zero (eps <= 0, any precision) and adam_eps_underflow (eps < 2**-24 with fp16 weights)."""
    pure = ctx.precision.pure_fp16
    findings = []
    found_any = False
    for path, value, _parent in _eps_settings(ctx):
        family = (
            "adam"
            if key_name(path) in vocab.ADAM_EPS_KEYS
            else optimizer_family(ctx.data, path, ctx.sections)
        )
        if not FAMILIES[family].has_eps:
            continue
        found_any = True
        number = as_number(value)
        if number is None or math.isnan(number):
            continue
        if number <= 0:
            fix = EPS_FIX_FP16 if pure else EPS_FIX_FP32
            findings.append(
                Finding(
                    "adam_eps_zero",
                    path,
                    value,
                    f"optimizer eps={value} divides by zero wherever a gradient history is 0. Use {show(fix)}.",
                    fix=fix,
                )
            )
        elif pure and number < FP16_SMALLEST_SUBNORMAL:
            findings.append(_eps_underflow(path, value, pure[0].key_path, exists=True))
    if pure and not found_any:
        findings += _missing_eps(ctx, pure[0].key_path)
    return findings


def _eps_settings(ctx: Context) -> list[tuple[KeyPath, Any, Any]]:
    settings = []
    for path, value, parent in walk(ctx.data):
        if not isinstance(parent, Mapping) or is_deferred(value):
            continue
        name = key_name(path)
        if name in vocab.ADAM_EPS_KEYS:
            settings.append((path, value, parent))
        elif name in vocab.GENERIC_EPS_KEYS:
            siblings = {str(k).lower() for k in parent}
            if is_optimizer_scope(path) or siblings & vocab.LR_KEYS:
                settings.append((path, value, parent))
    return settings


def _eps_underflow(
    path: KeyPath, value: Any, pure_at: KeyPath, *, exists: bool, fix: Any = EPS_FIX_FP16
) -> Finding:
    shown = value if exists else "1e-8 (the default)"
    return Finding(
        "adam_eps_underflow",
        path,
        value,
        f"Adam eps {shown} is below float16's smallest subnormal 2**-24 (~5.96e-8) and rounds to 0 with "
        f"fp16 weights ({'.'.join(map(str, pure_at))}); sqrt(v)+eps can then be 0 and the update inf. "
        f"Use eps >= {show(EPS_FIX_FP16)}.",
        fix=fix,
        exists=exists,
    )


def _missing_eps(ctx: Context, pure_at: KeyPath) -> list[Finding]:
    """No eps key with fp16 weights: the Adam default 1e-8 applies, so say where to set it."""
    section = ctx.sections.huggingface
    if section is not None:
        if optimizer_family(ctx.data, (*section, "learning_rate"), ctx.sections) != "adam":
            return []
        hf_args = get_path(ctx.data, section, {})
        after = _first_present(hf_args, ("adam_beta2", "adam_beta1", "learning_rate"))
        finding = _eps_underflow((*section, "adam_epsilon"), None, pure_at, exists=False)
        return [_with(finding, insert_after=after)]
    adam_rates = [lr for lr in ctx.learning_rates if lr.family == "adam"]
    for lr in adam_rates:
        if is_optimizer_scope(lr.key_path):  # the optimizer's own arguments: eps belongs beside lr
            finding = _eps_underflow((*lr.key_path[:-1], "eps"), None, pure_at, exists=False)
            return [_with(finding, insert_after=str(lr.key_path[-1]))]
    if adam_rates:  # where the training code reads eps from is unknown: report, do not guess
        return [_eps_underflow((*adam_rates[0].key_path[:-1], "eps"), None, pure_at, exists=False, fix=None)]
    return []


def _with(finding: Finding, **changes: Any) -> Finding:
    return replace(finding, **changes)


# --- inf_mask_value ---------------------------------------------------------------------------------


def inf_mask_value(ctx: Context) -> list[Finding]:
    magnitude = 1e4 if ctx.precision.fp16 else 1e9
    findings = []
    for path, value, _parent in walk(ctx.data):
        infinite = as_infinite(value)
        if infinite is None or not (_is_mask_key(key_name(path)) or _is_mask_key(parent_name(path))):
            continue
        fix = math.copysign(magnitude, infinite)
        dtype_note = (
            "fp16 (finite, and -1e9 would itself overflow to -inf)" if ctx.precision.fp16 else "fp32/bf16"
        )
        findings.append(
            Finding(
                "inf_mask_value",
                path,
                value,
                f"mask fill value {value} is infinite: a fully masked row gives softmax NaN and inf-inf=NaN "
                f"downstream. Use {show(fix)} for {dtype_note}, or torch.finfo(dtype).min in code.",
                fix=fix,
            )
        )
    return findings


def _is_mask_key(name: str) -> bool:
    return bool(name) and (name in vocab.MASK_KEYS or any(word in name for word in vocab.MASK_WORDS))


# --- nan_inf_filter ---------------------------------------------------------------------------------


def nan_inf_filter(ctx: Context) -> list[Finding]:
    found = False
    findings = []
    for path, value, parent in walk(ctx.data):
        if isinstance(parent, Mapping) and key_name(path) == "logging_nan_inf_filter":
            found = True
            if as_bool(value) is True:
                findings.append(
                    Finding(
                        "nan_inf_filter",
                        path,
                        value,
                        "logging_nan_inf_filter=true replaces NaN/Inf training losses in the logs with the "
                        "average of recent ones, so a diverged run looks healthy. Set it to false.",
                        fix=False,
                    )
                )
    section = ctx.sections.huggingface
    if found or section is None:
        return findings
    hf_args = get_path(ctx.data, section, {})
    logging_keys = [str(k) for k in hf_args if str(k).lower().startswith("logging_")]
    return [
        Finding(
            "nan_inf_filter",
            (*section, "logging_nan_inf_filter"),
            None,
            "logging_nan_inf_filter is not set and Hugging Face defaults it to true: NaN/Inf training "
            "losses are replaced in the logs by the average of recent ones. Set it to false.",
            fix=False,
            severity="info",
            exists=False,
            insert_after=logging_keys[-1] if logging_keys else None,
        )
    ]


# --- no_warmup --------------------------------------------------------------------------------------


def no_warmup(ctx: Context) -> list[Finding]:
    peak = _peak_learning_rate(ctx)
    if peak is None:
        return []
    lr_value, family = peak
    threshold = FAMILIES[family].warmup_from
    if threshold is None or lr_value < threshold:
        return []
    zero: list[tuple[KeyPath, Any]] = []
    for path, value, parent in walk(ctx.data):
        if not isinstance(parent, Mapping) or key_name(path) not in vocab.WARMUP_KEYS:
            continue
        if _warmup_is_set(value):
            return []
        zero.append((path, value))
    if _has_builtin_warmup(ctx.data, {path[:-1] for path, _ in zero}):
        return []
    return [_warmup_finding(ctx, zero, lr_value)]


def _warmup_is_set(value: Any) -> bool:
    """Positive, 'auto' (filled in at launch) or unreadable (a mapping, an expression): not provably 0."""
    if value is None or value is False:
        return False
    number = as_number(value)
    return number is None or number > 0


def _peak_learning_rate(ctx: Context) -> tuple[float, str] | None:
    """The highest learning rate as it will be once lr_high's fix is applied (so the check and a
    scheduler we insert agree with the fixed file), with its optimizer family."""
    rates = [lr for lr in ctx.learning_rates if math.isfinite(lr.number)]
    if rates:
        peak = max(rates, key=lambda lr: lr.number)
        verdict = _lr_verdict(ctx, peak)
        return (peak.number if verdict is None else verdict[2]), peak.family
    if ctx.sections.huggingface is not None:
        return HF_DEFAULT_LR, "adam"
    return None


def _has_builtin_warmup(data: Mapping[Any, Any], zeroed_scopes: set[KeyPath]) -> bool:
    """A OneCycle or DeepSpeed Warmup* scheduler ramps up by itself unless its own warmup key is 0."""
    for path, value, parent in walk(data):
        if not isinstance(parent, Mapping) or not isinstance(value, str):
            continue
        if key_name(path) not in ("class_path", "_target_", "type", "name", "scheduler", "lr_scheduler"):
            continue
        name = value.lower().rsplit(".", 1)[-1]
        if "onecycle" in name.replace("_", "") or name.startswith("warmup") or "linearwarmup" in name:
            scope = path[:-1]
            if not any(zeroed[: len(scope)] == scope for zeroed in zeroed_scopes):
                return True
    return False


def _warmup_finding(ctx: Context, zero: list[tuple[KeyPath, Any]], lr_value: float) -> Finding:
    steps = total_steps(ctx.data)
    why = f"with a peak learning rate of {show(lr_value)}: the first updates are large and can diverge"
    if zero:
        ratio_first = sorted(zero, key=lambda item: key_name(item[0]) not in vocab.WARMUP_RATIO_KEYS)
        path, value = ratio_first[0]
        fix = _warmup_value(ctx, key_name(path), steps)
        if fix is None and ctx.sections.huggingface == path[:-1] and key_name(path) == "warmup_steps":
            return _hf_warmup_ratio(ctx, path[:-1], why, after=str(path[-1]))
        return Finding("no_warmup", path, value, f"warmup is {value} {why}. {_warmup_advice(fix)}", fix=fix)
    if ctx.sections.huggingface is not None:
        section = ctx.sections.huggingface
        if steps is not None:
            fix = max(1, round(WARMUP_FRACTION * steps[1]))
            where = (*section, "warmup_steps")
            return Finding(
                "no_warmup",
                where,
                None,
                f"no warmup is set {why}. {_warmup_advice(fix)}",
                fix=fix,
                exists=False,
            )
        return _hf_warmup_ratio(ctx, section, why, after=None)
    if ctx.sections.deepspeed == () and ctx.learning_rates and "scheduler" not in ctx.data:
        fix_scheduler = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0, "warmup_max_lr": lr_value, "warmup_num_steps": 1000},
        }
        return Finding(
            "no_warmup",
            ("scheduler",),
            None,
            f"no scheduler, so no warmup, {why}. Add a WarmupLR scheduler (1000 steps, DeepSpeed's default).",
            fix=fix_scheduler,
            exists=False,
            insert_after="optimizer" if "optimizer" in ctx.data else None,
        )
    if ctx.sections.lightning or ctx.sections.deepspeed == ():
        key = "lr_scheduler" if ctx.sections.lightning else "scheduler"
        return Finding(
            "no_warmup",
            (key,),
            ctx.data.get(key),
            f"no warmup {why}. Configure {key} with a linear warmup over ~3% of training.",
            exists=key in ctx.data,
        )
    container, after = beside(max(ctx.learning_rates, key=lambda lr: lr.number).key_path)
    if steps is not None:
        name = "warmup_iters" if "iter" in steps[0] else "warmup_steps"
        fix_value: Any = max(1, round(WARMUP_FRACTION * steps[1]))
    else:
        name, fix_value = "warmup_ratio", WARMUP_FRACTION
    return Finding(
        "no_warmup",
        (*container, name),
        None,
        f"no warmup is set {why}. Add {name}: {show(fix_value)} (your training code must read this key).",
        fix=fix_value,
        exists=False,
        insert_after=after,
    )


def _hf_warmup_ratio(ctx: Context, section: KeyPath, why: str, after: str | None) -> Finding:
    """TrainingArguments before transformers 5 take warmup_ratio; from 5 on, warmup_steps < 1 is a ratio."""
    key = "warmup_steps" if _transformers_major() >= 5 else "warmup_ratio"
    hf_args = get_path(ctx.data, section, {})
    return Finding(
        "no_warmup",
        (*section, key),
        hf_args.get(key) if isinstance(hf_args, Mapping) else None,
        f"no warmup {why}. Set {key}: {show(WARMUP_FRACTION)} (3% of training).",
        fix=WARMUP_FRACTION,
        exists=isinstance(hf_args, Mapping) and key in hf_args,
        insert_after=after if after != key else None,
    )


def _warmup_value(ctx: Context, name: str, steps: tuple[str, int] | None) -> Any:
    if name in vocab.WARMUP_RATIO_KEYS:
        return WARMUP_FRACTION
    if name in vocab.WARMUP_EPOCH_KEYS:
        epochs = total_epochs(ctx.data)
        return max(1, round(WARMUP_FRACTION * epochs)) if epochs is not None and epochs >= 2 else None
    return max(1, round(WARMUP_FRACTION * steps[1])) if steps is not None else None


def _warmup_advice(fix: Any) -> str:
    if fix is None:
        return "Warm up linearly over ~3% of training steps."
    return f"Set it to {show(fix)}."


def _transformers_major() -> int:
    """The installed transformers' major version; 4 (the most common in configs) when not installed."""
    try:
        return int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 4


RULE_FUNCTIONS: tuple[Callable[[Context], list[Finding]], ...] = (
    lr_high,
    no_grad_clipping,
    fp16_loss_scaling,
    bf16_and_fp16_both,
    adam_eps,
    inf_mask_value,
    nan_inf_filter,
    no_warmup,
)


def run_rules(data: Mapping[Any, Any]) -> list[Finding]:
    """Every rule's findings for ``data``, in rule order."""
    ctx = Context(data)
    return [finding for rule in RULE_FUNCTIONS for finding in rule(ctx)]
