"""What a lint rule reports, and the catalogue of rules with the reasoning behind each threshold.

A :class:`Finding` carries both what a person reads (rule, dotted path, value, message, suggested fix)
and what the fixer needs (the key path as a tuple, whether the key exists, where to insert it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

KeyPath = tuple[str | int, ...]

SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Rule:
    """One rule's id, default severity, one-line summary and the documented reasoning."""

    id: str
    severity: str
    summary: str
    doc: str


RULES: dict[str, Rule] = {
    rule.id: rule
    for rule in (
        Rule(
            "lr_high",
            "error",
            "learning rate implausibly high for the optimizer family",
            "Error above: Adam family (Adam, AdamW, NAdam, RAdam, fused/8-bit variants) 3e-3; Lion 1e-3; "
            "Adafactor 1e-2; LAMB 2e-2; RMSprop 1e-2; Adagrad 0.1; SGD and unknown optimizers 1.0. "
            "Warning above: Adam family 1e-3 and Lion 3e-4 when the config looks like fine-tuning "
            "(Hugging Face TrainingArguments, or keys such as model_name_or_path/pretrained/lora_r). "
            "The family is read from the nearest optimizer name (optim, optimizer.type, class_path, "
            "_target_), else sibling hints (betas -> Adam, momentum -> SGD); HF defaults to AdamW. "
            "A Noam/inverse-sqrt scheduler beside the rate makes it a multiplier (NeMo's lr: 2.0), not "
            "checked. Fix: for an Adam-family fine-tune the usual rate (2e-5 full, 2e-4 LoRA/adapters); "
            "otherwise 10x lower, capped at the threshold that applies; the message says the true factor.",
        ),
        Rule(
            "no_grad_clipping",
            "warning",
            "gradient clipping is off",
            "A single bad batch can then push weights to inf. A warning when a clipping key (max_grad_norm, "
            "grad_clip, gradient_clip_val, gradient_clipping, train.max_norm, ...) is 0, null, false, "
            "negative or inf, or when none is set and the format's default is off (a Lightning trainer "
            "section: gradient_clip_val=None; DeepSpeed: gradient_clipping=0). Hugging Face, nanoGPT and "
            "torchtitan default to 1.0, so their absence is fine; in other files the clipping may be in "
            "the training script, so its absence is a question (info). Fix: 1.0.",
        ),
        Rule(
            "fp16_without_loss_scaling",
            "error",
            "fp16 training without loss scaling",
            "Gradients below 6e-8 flush to zero in float16 and large ones overflow with nothing to skip "
            "the step. Flagged for Lightning precision '16-true', DeepSpeed fp16.loss_scale=1, apex "
            "opt_level O3 without a loss_scale, and explicit switches (use_loss_scaling/grad_scaler/"
            "scaler: false). Fix: dynamic scaling (DeepSpeed loss_scale 0, Lightning '16-mixed', the "
            "switch to true); bf16 needs no scaling at all.",
        ),
        Rule(
            "loss_scale_static",
            "warning",
            "fp16 with a fixed (static) loss scale",
            "A fixed scale cannot adapt: too high overflows every step, too low lets small gradients "
            "underflow. Flagged for a loss_scale > 1 (DeepSpeed fp16.loss_scale, apex loss_scale) or "
            "dynamic_loss_scale: false. Fix: DeepSpeed loss_scale 0 (dynamic); otherwise manual.",
        ),
        Rule(
            "bf16_and_fp16_both",
            "error",
            "fp16 and bf16 are both enabled",
            "Hugging Face and DeepSpeed refuse this combination, and elsewhere one silently wins. "
            "Fix: turn fp16 off and keep bf16, which has float32's range and needs no loss scaling.",
        ),
        Rule(
            "adam_eps_underflow",
            "error",
            "Adam epsilon rounds to zero in float16 weights",
            "float16's smallest subnormal is 2**-24 ~ 5.96e-8, so eps=1e-8 (the PyTorch and HF default) "
            "becomes 0 when the optimizer runs on half weights and sqrt(v)=0 gives an inf update. Only "
            "pure fp16 training counts: Lightning '16-true', torch_dtype/model_dtype float16, half/"
            "pure_fp16: true, apex O3, DeepSpeed fp16_master_weights_and_grads. Mixed precision keeps "
            "fp32 master weights and is fine; fp16_full_eval affects evaluation only. Fix: 1e-6.",
        ),
        Rule(
            "adam_eps_zero",
            "error",
            "Adam epsilon is zero or negative",
            "With eps <= 0 the update m/(sqrt(v)+eps) divides by zero for any parameter whose gradient "
            "history is zero. Fix: 1e-8 (1e-6 for pure fp16 weights).",
        ),
        Rule(
            "inf_mask_value",
            "error",
            "an infinite mask/fill value, or one that overflows to infinity",
            "A row masked entirely with -inf gives softmax NaN (exp(-inf - -inf)), and -inf + x or "
            "0 * inf produce NaN downstream. Flagged for an infinite value under a key naming a mask or "
            "fill value (mask_value, fill_value, neg_inf, masking, ...), for a finite one beyond float32's "
            "range (-1e39), and under fp16 for one beyond float16's 65504 (-1e9 becomes -inf). "
            "Fix: -1e4 under fp16 (finite and far below any logit), else -1e9; torch.finfo(dtype).min in code.",
        ),
        Rule(
            "nan_inf_filter",
            "info",
            "Hugging Face logging hides NaN/Inf losses (a note)",
            "logging_nan_inf_filter=true logs the average of recent losses in place of a NaN one, so the "
            "Trainer's logs can look healthy. A note (info) when set to true, never a problem and never "
            "fixed: turned off, one NaN poisons every later logged loss, so nanguard keeps it on and "
            "records the true per-step loss itself (docs/integrations.md).",
        ),
        Rule(
            "no_warmup",
            "warning",
            "no learning-rate warmup",
            "Adam's second-moment estimate is noisy for the first steps and early updates are large; "
            "warmup avoids early divergence. For a peak learning rate of at least 1e-4 (Adam family, "
            "unknown), 3e-5 (Lion) or 0.1 (SGD): a warning when a warmup key is 0, or when a Hugging Face "
            "config sets none (its default is 0); a question (info) when the file sets none and the "
            "warmup may be in the training script or another file. nanoGPT and torchtitan warm up by "
            "default. Schedulers with a built-in ramp (OneCycle, Noam, DeepSpeed Warmup*) count as "
            "warmup. Fix: 3% of training (warmup_ratio 0.03, or 3% of max_steps/max_iters when known).",
        ),
    )
}


@dataclass(frozen=True)
class Finding:
    """One problem at one key.

    ``value`` is what the config holds (``None`` when the key is absent: see ``exists``); ``fix`` the
    value the fixer would write, or ``None`` when the right value needs a person's judgement.
    """

    rule: str
    key_path: KeyPath
    value: Any
    message: str
    fix: Any = None
    severity: str = ""
    line: int | None = None
    exists: bool = True
    insert_after: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.severity:
            object.__setattr__(self, "severity", RULES[self.rule].severity)

    @property
    def path(self) -> str:
        return format_path(self.key_path)

    @property
    def fixable(self) -> bool:
        return self.fix is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape: the five contract keys first, then severity and line."""
        return {
            "rule": self.rule,
            "path": self.path,
            "value": json_safe(self.value),
            "message": self.message,
            "fix": json_safe(self.fix),
            "severity": self.severity,
            "line": self.line,
        }


def format_path(key_path: KeyPath) -> str:
    """``("trainer", "gradient_clip_val")`` -> ``trainer.gradient_clip_val``; list indices as numbers."""
    return ".".join(str(part) for part in key_path)


def json_safe(value: Any) -> Any:
    """Strict-JSON form of a config value: non-finite floats become the strings 'inf', '-inf', 'nan'."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value if not isinstance(value, str) else str(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return str(value)
