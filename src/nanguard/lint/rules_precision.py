"""The precision rules: fp16 without (or with a fixed) loss scale, fp16 and bf16 both on, and an Adam
epsilon that is zero or rounds to zero in float16 weights."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from nanguard.lint import vocabulary as vocab
from nanguard.lint.context import Context, show
from nanguard.lint.findings import Finding, KeyPath
from nanguard.lint.locate import FAMILIES, is_optimizer_scope, optimizer_family
from nanguard.lint.tree import as_number, get_path, is_deferred, key_name, parent_name, walk

FP16_SMALLEST_SUBNORMAL = 2.0**-24  # ~5.96e-8: anything smaller rounds to 0 in float16
EPS_FIX_FP16 = 1e-6
EPS_FIX_FP32 = 1e-8


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
                    f"optimizer eps={ctx.spelled(path, value)} divides by zero wherever a gradient history is 0. Use {show(fix)}.",
                    fix=fix,
                )
            )
        elif pure and number < FP16_SMALLEST_SUBNORMAL:
            finding = _eps_underflow(path, value, pure[0].key_path, exists=True)
            findings.append(replace(finding, message=finding.message.replace(f" {value} ", f" {ctx.spelled(path, value)} ", 1)))
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
    """The finding for an eps below float16's smallest subnormal (or the 1e-8 default, when absent)."""
    shown = f"{value}" if exists else "1e-8 (the default)"
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
        after = first_present(hf_args, ("adam_beta2", "adam_beta1", "learning_rate"))
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




def first_present(mapping: Mapping[Any, Any], keys: tuple[str, ...]) -> str | None:
    return next((key for key in keys if key in mapping), None)
