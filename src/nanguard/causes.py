"""The cause registry: everything nanguard knows about each cause, in one entry per cause.

Every other table derives from it: the schema vocabulary of ``events.py``, the escalation policy's
data and state sets, the fixes a diagnosis or a triage prints, and the report's plain words. Adding a
cause is one entry here plus the rule that names it (``forensics/rules/``); a test checks the registry
against ``shared/spec/event.schema.json``.

``family`` orders the diagnosis (DESIGN.md, "Where it was born, and why"): ``data`` (the batch is bad)
before ``state`` (the weights or optimizer were bad before the step) before ``op`` (an operator made
the first non-finite value) before ``driver`` (finite trouble: a spike, a trend, a learning-rate jump).
``none`` is for the two verdicts that are not a cause of their own (transient, undecided).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

Family = Literal["data", "state", "op", "driver", "none"]
FAMILY_ORDER: tuple[Family, ...] = ("data", "state", "op", "driver", "none")

# The one Adam-eps advice (also what ``nanguard lint`` suggests): eps=1e-8 rounds to 0 in float16.
ADAM_EPS_FP16 = 1e-6
_EPS_ADVICE = f"use Adam eps >= {ADAM_EPS_FP16:g} in float16 (eps=1e-8 rounds to 0 there)"


@dataclass(frozen=True)
class Cause:
    """One cause of the taxonomy.

    ``fixes`` are templates filled from the diagnosis (``{tensor}``, ``{module}``, ``{op}`` and the
    rule's own fields); a missing field reads ``?``. ``variants`` are alternative fix lists for a
    special case of the cause (token ids instead of class labels, no replay available).
    """

    name: str
    words: str
    family: Family
    phase: str
    fixes: tuple[str, ...]
    batch_remedy: bool = False  # skipping the batch is the whole remedy
    damages_state: bool = False  # the weights or optimizer state are bad: skipping cannot help, roll back
    variants: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))

    def fix_lines(self, variant: str | None = None, **context: Any) -> list[str]:
        templates = self.variants.get(variant, self.fixes) if variant else self.fixes
        return [fill(template, context) for template in templates]


class _Defaults(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


def fill(template: str, context: Mapping[str, Any]) -> str:
    try:
        return template.format_map(_Defaults({k: _short(v) for k, v in context.items()}))
    except (ValueError, IndexError):
        return template


def _short(value: Any) -> Any:
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.4g}" if math.isfinite(value) else repr(value)
    return value


def _cause(name: str, words: str, family: Family, phase: str, *fixes: str, **options: Any) -> Cause:
    variants = options.pop("variants", {})
    return Cause(name, words, family, phase, tuple(fixes), variants=MappingProxyType(dict(variants)), **options)


_ENTRIES = (
    _cause(
        "input_nonfinite", "a batch tensor holds NaN/Inf", "data", "data",
        "Drop or repair the sample(s) at the source: batch field `{tensor}` holds NaN/Inf (rows {rows}).",
        "Scan the dataset before training: `nanguard scan DATA` finds every non-finite record.",
        "Check the preprocessing that builds `{tensor}` (division by a zero std, log of 0, failed decode).",
        batch_remedy=True,
    ),
    _cause(
        "label_out_of_range", "a class label is outside [0, num_classes)", "data", "data",
        "Fix the label mapping so every target of `{tensor}` is in [0, {classes}) or equals ignore_index.",
        "If the model head is too small, set its number of classes to at least max(label)+1 = {needed}.",
        "Validate targets in the Dataset (`assert 0 <= y < num_classes`) instead of clamping them silently.",
        batch_remedy=True,
        variants={"tokens": (
            "Token ids in `{tensor}` must be < num_embeddings = {classes} of {module}: resize the embedding "
            "(e.g. `model.resize_token_embeddings(len(tokenizer))`) or fix the tokenizer/vocabulary mismatch.",
            "Check special tokens added after the model was built, and the padding id used by the collate function.",
        )},
    ),
    _cause(
        "input_extreme_scale", "input values far outside the scale of the rest of the data", "driver", "data",
        "Normalise batch field `{tensor}` like the rest of the data (its abs-max is {ratio}x the usual).",
        "Find the badly scaled source with `nanguard scan DATA` and fix its units/normalisation.",
        "Robust-normalise or clip inputs in the data pipeline rather than the loss.",
        batch_remedy=True,
    ),
    _cause(
        "weights_nonfinite", "the weights were already non-finite before the step", "state", "state",
        "Roll back to the last finite checkpoint; the weights `{tensor}` are already non-finite.",
        "Find the step that first wrote them: run under `nanguard.Guard` from that checkpoint, or look for code "
        "that edits weights.",
        "Do not `nan_to_num` the weights: the optimizer state is likely poisoned too.",
        damages_state=True,
    ),
    _cause(
        "optimizer_state_nonfinite", "optimizer state (e.g. Adam moments) is non-finite", "state", "state",
        "Roll back to the last finite checkpoint, or reset the optimizer state of `{tensor}`.",
        "Keep optimizer state in float32 (use AMP with fp32 master weights instead of a pure-half model); "
        + _EPS_ADVICE + ".",
        "Skip non-finite steps before `optimizer.step()` (nanguard does this) so the moments stay finite.",
        damages_state=True,
    ),
    _cause(
        "forward_overflow", "an op overflowed its dtype in the forward pass", "op", "forward",
        "{op} in {module} exceeds the {dtype} range (max {dtype_max}): run it in float32 "
        "(`torch.autocast(..., enabled=False)` around {module}) or use bfloat16.",
        "Rescale before the op (normalise inputs, scale attention scores by 1/sqrt(d), use a stable softmax/logsumexp).",
        "With fp16, keep a GradScaler and fp32 master weights; lower the learning rate if activations grow.",
    ),
    _cause(
        "masked_softmax_all_masked", "a softmax row with every entry masked to -inf", "op", "forward",
        "{module}: fill masks with `torch.finfo(dtype).min` instead of -inf, or use "
        "`nanguard.ops.masked_softmax`, which returns 0 for a fully masked row.",
        "Drop empty sequences (rows {rows} have no unmasked position) in the collate function.",
        batch_remedy=True,
    ),
    _cause(
        "masked_target_logit", "the target class's logit is masked to -inf", "op", "loss",
        "The target class's logit is masked to -inf: mask with a large finite negative "
        "(`torch.finfo(dtype).min`) or never mask the target class.",
        "Check the label-to-class mapping of each dataset against its logits mask.",
        batch_remedy=True,
    ),
    _cause(
        "invalid_math_domain", "log/sqrt/div outside their domain (log 0, x/0, sqrt of <0)", "op", "forward",
        "{op} in {module}: {domain_fix}",
        "Compute the quantity in a stable form (log_softmax / logsumexp / `torch.special.xlogy`).",
    ),
    _cause(
        "backward_singularity", "forward finite, but an op's derivative is not", "op", "backward",
        "{op} in {module} has an infinite derivative at this input: {singular_fix}",
        "With `torch.where`, make the untaken branch safe too (compute on a masked/clamped input), "
        "because its gradient is multiplied by 0 and 0*inf = NaN.",
    ),
    _cause(
        "backward_overflow", "a gradient overflowed fp16/bf16", "op", "backward",
        "Use a GradScaler (or lower its init_scale) so fp16 gradients stay in range; or use bfloat16.",
        "Run {module} in float32 under autocast; lower the learning rate if gradients keep growing.",
        # The GradScaler was there and the replay ran at loss scale 1: the values are too large for fp16 as
        # they are, so a scaler setting cannot help.
        variants={"scaled": (
            "The gradients of {module} overflow float16 even at loss scale 1, so no GradScaler setting helps: "
            "normalise the inputs feeding it, or train in bfloat16.",
            "Run {module} in float32 under autocast; lower the learning rate if gradients keep growing.",
        )},
    ),
    _cause(
        "gradient_explosion", "gradients grew far past their running scale", "driver", "backward",
        "Clip gradients (`torch.nn.utils.clip_grad_norm_(params, 1.0)`).",
        "Lower the learning rate or lengthen warmup; check the largest gradient, `{tensor}`.",
        "Add normalisation (LayerNorm/RMSNorm) or residual scaling in {module}.",
    ),
    _cause(
        "loss_spike", "finite loss far above its running scale", "driver", "loss",
        "Inspect the samples of this batch: the loss is {ratio}x its running level with data in range.",
        "Skip spiking batches (nanguard does) and consider a lower learning rate or gradient clipping.",
    ),
    _cause(
        "divergence", "the loss trends upward over many steps (learning rate too high)", "driver", "optimizer",
        "Lower the learning rate (e.g. x0.5; now {lr}) or lengthen warmup: the loss rose {ratio}x.",
        "Clip gradients and check the LR schedule (a restart or a too-high peak).",
    ),
    _cause(
        "level_shift", "the loss moved to a new stable level (a task or data switch)", "driver", "loss",
        "Nothing to fix if the switch at step {step} was intended (a new task, data source or loss weighting): "
        "the guard accepted the new level.",
        "If it was not intended, check what changed in the data or the loss at step {step}.",
    ),
    _cause(
        "learning_rate_spike", "the update used a learning rate far above the schedule's recent values",
        "driver", "optimizer",
        "Check the learning-rate schedule around step {step} (a warm-up or restart multiplier applied twice, "
        "a per-epoch scheduler stepped per batch, a wrong lambda, a unit error).",
        "Roll back to a state from before the jump and keep the learning rate at its earlier level.",
    ),
    _cause(
        "update_overflow", "the optimizer update made the weights non-finite", "state", "optimizer",
        "The optimizer update overflowed {dtype} in `{tensor}`: keep fp32 master weights and optimizer "
        "state (AMP) instead of a pure-half model.",
        _EPS_ADVICE[0].upper() + _EPS_ADVICE[1:] + ", or a bf16-safe optimizer setup.",
        "Lower the learning rate.",
        damages_state=True,
    ),
    _cause(
        "scaled_gradient_misuse", "gradients clipped or measured while still multiplied by the GradScaler's scale",
        "driver", "optimizer",
        "Call `scaler.unscale_(optimizer)` after `scaler.scale(loss).backward()` and before `{call}`; keep "
        "`scaler.step(optimizer)` and `scaler.update()` after it (the step does not unscale twice).",
        "Log or compare gradient norms only after `scaler.unscale_(optimizer)`: before it they are the loss scale "
        "({scale}) times the true norm.",
    ),
    _cause(
        "update_underflow", "the updates no longer change the weights (they round away below the weights' "
        "precision, or are zero): training stalls",
        "state", "optimizer",
        "Keep fp32 master weights: leave the model in float32 and train under `torch.autocast(..., dtype={dtype})` "
        "instead of casting it to {dtype}, so every update lands on an fp32 copy of the weights.",
        "If the weights must stay in {dtype}: keep an fp32 copy and the optimizer state in fp32 (a master-weights "
        "optimizer), or add the update with Kahan summation or stochastic rounding.",
        "Raise the learning rate only as a last resort: an update below half a {dtype} ULP of a weight (about "
        "{half_ulp} at |w| = {weight}) rounds away whatever the schedule says.",
        variants={
            "lr_zero": (
                "Fix the learning-rate schedule ({scheduler}) so it stays above 0 while training goes on: a lambda "
                "that returns 0 from step {since}, integer division in a warm-up or decay, a cosine whose T_max is "
                "shorter than the run.",
                "If a group is meant to be frozen, call `requires_grad_(False)` on its parameters or leave them out "
                "of the optimizer instead of giving it a learning rate of 0.",
            ),
            "no_grad": (
                "{module} runs in forward but no gradient reaches its parameters: remove the `.detach()`, "
                "`torch.no_grad()` or `.data` that cuts its output off from the loss.",
                "If they are meant to stay fixed, call `requires_grad_(False)` on them or leave them out of the "
                "optimizer.",
            ),
        },
    ),
    _cause(
        "batchnorm_degenerate", "batch statistics of a single sample or zero variance", "op", "forward",
        "{module}: batch statistics of {per_channel} value(s) per channel or zero variance; use batch size >= 2 "
        "per device (drop_last=True) or GroupNorm/LayerNorm instead of BatchNorm.",
        "Keep eps > 0 in BatchNorm; use SyncBatchNorm when per-GPU batches are small.",
        batch_remedy=True,
    ),
    _cause(
        "nondeterministic", "a replay of the same step was finite: a transient fault", "none", "unknown",
        "A replay from the same state and batch was finite: the fault is transient (nondeterministic kernels, "
        "hardware, a race, or code that depends on call count/time). Skipping this step is safe.",
        "If it recurs, enable `torch.use_deterministic_algorithms(True)` and check the GPU (ECC errors).",
        batch_remedy=True,
    ),
    _cause(
        "unknown", "the evidence did not decide the cause", "none", "unknown",
        "Inspect the event's details: they list what was checked and what could not be run.",
        "Share the event (events.jsonl) and the report with the maintainers.",
        variants={"no_replay": (
            "No replay was run: pass a closure to `guard.step()` (or raise `forensics_max_events`) so the step can "
            "be replayed under the operator tracer.",
            "Share the event (events.jsonl) and the report with the maintainers.",
        )},
    ),
)

CAUSES: Mapping[str, Cause] = MappingProxyType({entry.name: entry for entry in _ENTRIES})
"""Every cause by name, in the order of the event schema's enum."""

DATA_CAUSES = frozenset(name for name, c in CAUSES.items() if c.batch_remedy)
STATE_CAUSES = frozenset(name for name, c in CAUSES.items() if c.damages_state)
# State that was bad before the step (not made bad by this step's update): the first time says nothing
# about the learning rate.
CORRUPTION_CAUSES = frozenset(name for name in STATE_CAUSES if CAUSES[name].phase == "state")


def cause(name: str) -> Cause:
    """The registry entry for ``name`` (``unknown`` for a name the registry does not have)."""
    return CAUSES.get(name, CAUSES["unknown"])


def fixes_for(name: str, variant: str | None = None, **context: Any) -> list[str]:
    """The fixes of a cause, filled from ``context``."""
    return cause(name).fix_lines(variant, **context)


def family_rank(name: str) -> int:
    """Precedence of a cause's family: lower explains more (data < state < op < driver < none)."""
    return FAMILY_ORDER.index(cause(name).family)


__all__ = [
    "ADAM_EPS_FP16",
    "CAUSES",
    "CORRUPTION_CAUSES",
    "DATA_CAUSES",
    "FAMILY_ORDER",
    "STATE_CAUSES",
    "Cause",
    "cause",
    "family_rank",
    "fill",
    "fixes_for",
]
