"""The lint rules: pure functions from the facts of one config to findings.

Every rule is documented in :data:`nanguard.lint.findings.RULES` (thresholds and their reasons).
Rules warn on evidence in the file; where the setting may live in the training script or another
file they ask (severity ``info``, which never changes the exit status). A rule that proposes a fix
must propose one its own check accepts, so a fixed file re-lints clean; a fix that would add a key
the config's loader may reject is withdrawn here, and the finding says what to change by hand.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from nanguard.lint import vocabulary as vocab
from nanguard.lint.context import Context, show
from nanguard.lint.findings import Finding, KeyPath
from nanguard.lint.rules_lr import lr_high, no_warmup, transformers_major
from nanguard.lint.rules_precision import (
    FP16_SMALLEST_SUBNORMAL,
    adam_eps,
    bf16_and_fp16_both,
    fp16_loss_scaling,
)
from nanguard.lint.schema import accepts_new_key
from nanguard.lint.tree import (
    as_bool,
    as_infinite,
    as_number,
    get_path,
    key_name,
    parent_name,
    walk,
    walks_cached,
)

__all__ = ["FP16_SMALLEST_SUBNORMAL", "RULE_FUNCTIONS", "run_rules", "transformers_major"]

CLIP_FIX = 1.0
FLOAT16_MAX = 65504.0
FLOAT32_MAX = 3.4028234663852886e38


# --- no_grad_clipping -----------------------------------------------------------------------------


def no_grad_clipping(ctx: Context) -> list[Finding]:
    disabled: list[tuple[KeyPath, Any]] = []
    for path, value in _clip_settings(ctx.data):
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
                f"gradient clipping is off ({key_name(path)}: {ctx.spelled(path, value)}); one bad batch can push "
                f"the weights to inf. Set it to {show(CLIP_FIX)}.",
                fix=CLIP_FIX,
            )
            for path, value in disabled
        ]
    return _missing_clipping(ctx)


def _clip_settings(data: Mapping[Any, Any]) -> list[tuple[KeyPath, Any]]:
    found = []
    for path, value, parent in walk(data):
        if not isinstance(parent, Mapping):
            continue
        name = key_name(path)
        if name in vocab.CLIP_KEYS or (name == "max_norm" and parent_name(path) in vocab.CLIP_MAX_NORM_PARENTS):
            found.append((path, value))
    return found


def _clipping_enabled(value: Any) -> bool:
    if value is None or value is False or (isinstance(value, str) and as_bool(value) is False):
        return False
    number = as_number(value)
    if number is None:
        return True  # 'auto', true, an expression: not provably off
    return math.isfinite(number) and number > 0


def _missing_clipping(ctx: Context) -> list[Finding]:
    """No clipping key: a warning where the format's own default is no clipping, else a question."""
    sections = ctx.sections
    where: KeyPath
    if sections.huggingface is not None or sections.nanogpt or sections.torchtitan:
        return []  # TrainingArguments, nanoGPT's train.py and torchtitan all default to clipping at 1.0
    if sections.lightning:
        where, after, why = ("trainer", "gradient_clip_val"), None, "Lightning's default gradient_clip_val is None"
    elif sections.deepspeed == ():
        after = _first_present(ctx.data, ("gradient_accumulation_steps", "train_micro_batch_size_per_gpu"))
        where, why = ("gradient_clipping",), "DeepSpeed's default gradient_clipping is 0 (off)"
    elif ctx.learning_rates:
        lr = ctx.learning_rates[0]
        return [
            Finding(
                "no_grad_clipping",
                lr.key_path,
                lr.value,
                "no gradient clipping setting in this file: does the training script clip gradients "
                "(e.g. clip_grad_norm_(params, 1.0))? Without it one bad batch can push the weights to inf.",
                severity="info",
            )
        ]
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


def _first_present(mapping: Mapping[Any, Any], keys: tuple[str, ...]) -> str | None:
    return next((key for key in keys if key in mapping), None)


# --- inf_mask_value ---------------------------------------------------------------------------------


def inf_mask_value(ctx: Context) -> list[Finding]:
    """Infinite mask values, and finite ones that overflow to infinity in the run's precision."""
    fp16 = bool(ctx.precision.fp16)
    magnitude = 1e4 if fp16 else 1e9
    findings = []
    for path, value, _parent in walk(ctx.data):
        name, parent = key_name(path), parent_name(path)
        if not (_is_mask_key(name) or _is_mask_key(parent)):
            continue
        infinite = as_infinite(value)
        number = as_number(value) if infinite is None else infinite
        if number is None or math.isnan(number):
            continue
        fix = math.copysign(magnitude, number)
        dtype_note = "fp16 (finite, and -1e9 would itself overflow to -inf)" if fp16 else "fp32/bf16"
        if infinite is not None:
            what = f"mask fill value {ctx.spelled(path, value)} is infinite"
        elif abs(number) > FLOAT32_MAX:
            what = f"mask fill value {ctx.spelled(path, value)} is beyond float32's range and becomes infinite"
        elif fp16 and abs(number) > FLOAT16_MAX and _is_value_key(name, parent):
            what = f"mask fill value {ctx.spelled(path, value)} overflows float16 (largest 65504) and becomes infinite under fp16"
        else:
            continue
        findings.append(
            Finding(
                "inf_mask_value",
                path,
                value,
                f"{what}: a fully masked row gives softmax NaN and inf-inf=NaN downstream. "
                f"Use {show(fix)} for {dtype_note}, or torch.finfo(dtype).min in code.",
                fix=fix,
            )
        )
    return findings


def _is_mask_key(name: str) -> bool:
    return bool(name) and (name in vocab.MASK_KEYS or any(word in name for word in vocab.MASK_WORDS))


def _is_value_key(name: str, parent: str) -> bool:
    """A key naming a fill value (not a token id, size or probability that merely mentions 'mask')."""
    words = set(re.split(r"[^a-z0-9]+", name))
    if words & {"id", "ids", "idx", "index", "token", "size", "len", "length", "steps", "prob", "ratio"}:
        return False
    return bool(words & {"value", "fill", "inf", "min", "neg"}) or name in vocab.MASK_KEYS or _is_mask_key(parent)


# --- nan_inf_filter ---------------------------------------------------------------------------------


def nan_inf_filter(ctx: Context) -> list[Finding]:
    """A note, not a problem: nanguard keeps logging_nan_inf_filter on (see docs/integrations.md)."""
    return [
        Finding(
            "nan_inf_filter",
            path,
            value,
            "logging_nan_inf_filter is on: the Trainer logs the running average in place of a NaN loss, so "
            "its logs can look healthy while steps go NaN. Keep it on (off, one NaN poisons every later "
            "logged loss) and read the true per-step loss from nanguard's history.csv and events.",
            severity="info",
        )
        for path, value, parent in walk(ctx.data)
        if isinstance(parent, Mapping) and key_name(path) == "logging_nan_inf_filter" and as_bool(value) is True
    ]


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


def run_rules(
    data: Mapping[Any, Any], fmt: str = "mapping", spelling: Callable[[KeyPath], str | None] | None = None
) -> list[Finding]:
    """Every rule's findings for ``data``, in rule order, with unsafe insertions withdrawn.

    ``spelling`` gives a value's text as written in the file, so messages quote it exactly.
    """
    ctx = Context(data, fmt, spelling)
    with walks_cached(data):
        return [_schema_checked(ctx, finding) for rule in RULE_FUNCTIONS for finding in rule(ctx)]


def _schema_checked(ctx: Context, finding: Finding) -> Finding:
    if finding.exists or finding.fix is None:
        return finding
    if accepts_new_key(ctx.data, ctx.sections, finding.key_path):
        return finding
    where = ".".join(str(p) for p in finding.key_path[:-1]) or "the top level"
    return replace(
        finding,
        fix=None,
        message=f"{finding.message} nanguard does not add {finding.key_path[-1]} at {where} itself: this "
        f"file's loader may not accept a new key there ({_why_not(ctx, finding.key_path)}); set "
        f"{show(finding.fix) if isinstance(finding.fix, float) else finding.fix} where your training code reads it.",
    )


def _why_not(ctx: Context, key_path: KeyPath) -> str:
    container = get_path(ctx.data, key_path[:-1])
    if isinstance(container, Mapping) and ("_target_" in container or "class_path" in container):
        return "its keys become constructor arguments"
    if ctx.sections.jsonargparse:
        return "a jsonargparse schema rejects options it does not declare"
    return "nothing in the file says which keys the training code reads"
