"""From evidence to exactly one cause: the rule base and the knowledge base of fixes.

``Facts`` is everything the replays and checks found; ``diagnose`` walks the rules in order of
precedence and the first that matches names the cause. The order encodes what explains what:

1. data (a non-finite batch, a label or token id out of range, a batch of extreme scale) — a bad batch
   makes everything downstream look broken, so it is ruled out first;
2. state (non-finite weights or optimizer buffers, an update that overflowed) — the step itself may be
   innocent;
3. masking (a target on a masked logit, a softmax row masked entirely) — the -inf is deliberate, the
   NaN or inf it leads to is not;
4. math (domain errors, backward singularities, overflows, decided with the fp32 counterfactual,
   degenerate batch norm);
5. a finite replay from identical state: nondeterministic;
6. spikes and divergence with everything finite;
7. unknown, saying what was checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nanguard.events import Diagnosis
from nanguard.forensics.replay import ReplayOutcome
from nanguard.forensics.trace import SOFTMAX_OPS, Birth, root_of

# Ops whose result is undefined or infinite outside their domain (log 0, x/0, sqrt(-1), acos(2) ...).
DOMAIN_OPS = frozenset(
    "aten::" + n
    for n in [
        "log",
        "log2",
        "log10",
        "log1p",
        "xlogy",
        "sqrt",
        "rsqrt",
        "div",
        "div_",
        "reciprocal",
        "pow",
        "float_power",
        "acos",
        "asin",
        "atanh",
        "acosh",
        "lgamma",
        "digamma",
        "polygamma",
        "mvlgamma",
        "erfinv",
        "logit",
        "fmod",
        "remainder",
        "atan2",
        "var",
        "std",
        "var_mean",
        "std_mean",
        "special_xlog1py",
        "special_entr",
        "special_ndtri",
        "_log_softmax",
        "logsumexp",
        "linalg_inv",
        "linalg_cholesky",
        "cholesky",
        "inverse",
        "linalg_solve",
    ]
)
# Forward ops whose derivative blows up at the edge of their domain while the value stays finite.
SINGULAR_BACKWARD_OPS = frozenset(
    "aten::" + n
    for n in [
        "sqrt",
        "rsqrt",
        "linalg_vector_norm",
        "norm",
        "frobenius_norm",
        "linalg_norm",
        "pow",
        "float_power",
        "where",
        "acos",
        "asin",
        "atanh",
        "acosh",
        "div",
        "reciprocal",
        "log",
        "log2",
        "log10",
        "log1p",
        "std",
        "var",
        "std_mean",
        "var_mean",
        "cdist",
        "_cdist_forward",
        "_pdist_forward",
        "atan2",
        "hypot",
        "erfinv",
        "renorm",
        "_weight_norm_interface",
        "prod",
        "cumprod",
        "abs",
    ]
)
LOW_PRECISION = ("float16", "bfloat16")
DTYPE_MAX = {"float16": 65504.0, "bfloat16": 3.3895e38, "float32": 3.4028e38, "float64": 1.797e308}


def fmt(value: Any) -> str:
    """Numbers short enough for one evidence line."""
    if isinstance(value, str):
        return value
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return repr(value)
    return f"{value:.4g}"


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return False
    return abs(a - b) <= 1e-3 * max(abs(a), abs(b), 1e-12)


def _mod(module: str | None) -> str:
    if module is None:
        return "loss code"
    return f"`{module or '<root>'}`"


def _empty_mask_field(f: Facts, rows: Any) -> str | None:
    """The batch field whose rows are all masked out where the softmax saw all -inf (``attention_mask`` row 5)."""
    if not rows or not isinstance(rows, list):
        return None
    for name, mask in f.mask_fields.items():
        try:
            flat = mask.reshape(mask.shape[0], -1).bool()
            if not all(0 <= r < flat.shape[0] for r in rows):
                continue
            # Either convention: attention_mask (1 = keep) has the row all 0, key_padding_mask (True = pad) all 1.
            # Either way the row is uniform where the rest of the batch holds the other value somewhere.
            for padded in (False, True):
                if all(bool((flat[r] == padded).all()) for r in rows):
                    others = [i for i in range(flat.shape[0]) if i not in rows]
                    if not others or any(bool((flat[i] != padded).any()) for i in others):
                        return name
        except (RuntimeError, IndexError, TypeError):
            continue
    return None


@dataclass
class Facts:
    """Everything the investigation found, in one place for the rules."""

    trigger: str = "nonfinite_loss"
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    state_is_pre_step: bool = True
    update_made_weights_nonfinite: bool = False
    exception: dict[str, Any] | None = None
    batch_nonfinite: list[dict[str, Any]] = field(default_factory=list)
    # Batch fields that look like padding masks (bool or 0/1), for naming the field behind an all-masked row.
    mask_fields: dict[str, Any] = field(default_factory=dict, repr=False)
    extreme_scale: list[dict[str, Any]] = field(default_factory=list)
    labels: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[dict[str, Any]] = field(default_factory=list)
    weights: list[dict[str, Any]] = field(default_factory=list)
    optimizer_state: list[dict[str, Any]] = field(default_factory=list)
    entry_grads: list[dict[str, Any]] = field(default_factory=list)
    eps_underflow: list[dict[str, Any]] = field(default_factory=list)
    update_sim: dict[str, Any] | None = None
    plain: ReplayOutcome | None = None
    traced: ReplayOutcome | None = None
    fp32: ReplayOutcome | None = None
    births: list[Birth] = field(default_factory=list)
    loss_origin: Birth | None = None
    grad_origin: Birth | None = None
    loss_ops: list[dict[str, Any]] = field(default_factory=list)
    batchnorm_ops: list[dict[str, Any]] = field(default_factory=list)
    batchnorm_training: list[str] = field(default_factory=list)
    error_context: dict[str, Any] | None = None
    low_precision: list[str] = field(default_factory=list)
    loss_spike: dict[str, float] | None = None
    grad_spike: dict[str, float] | None = None
    trend: dict[str, float] | None = None
    checked: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def replay(self) -> ReplayOutcome | None:
        """The most informative replay in the step's own precision: traced if it ran cleanly, else plain."""
        if self.traced is not None and self.traced.error is None:
            return self.traced
        return self.plain if self.plain is not None else self.traced

    @property
    def reproduced(self) -> bool | None:
        """Whether a replay in the step's own precision showed the same problem."""
        runs = [r for r in (self.plain, self.traced) if r is not None]
        if not runs:
            return None
        if any(not r.finite for r in runs):
            return True
        if self.trigger in ("loss_spike", "grad_spike", "divergence"):
            return any(_close(r.loss, self.loss) or _close(r.total_grad_norm, self.grad_norm) for r in runs)
        return False


# ------------------------------------------------------------------------------ knowledge base
FIXES: dict[str, list[str]] = {
    "input_nonfinite": [
        "Drop or repair the sample(s) at the source: batch field `{tensor}` holds NaN/Inf (rows {rows}).",
        "Scan the dataset before training: `nanguard scan DATA` finds every non-finite record.",
        "Check the preprocessing that builds `{tensor}` (division by a zero std, log of 0, failed decode).",
    ],
    "label_out_of_range": [
        "Fix the label mapping so every target of `{tensor}` is in [0, {classes}) or equals ignore_index.",
        "If the model head is too small, set its number of classes to at least max(label)+1 = {needed}.",
        "Validate targets in the Dataset (`assert 0 <= y < num_classes`) instead of clamping them silently.",
    ],
    "label_out_of_range:tokens": [
        "Token ids in `{tensor}` must be < num_embeddings = {classes} of {module}: resize the embedding "
        "(e.g. `model.resize_token_embeddings(len(tokenizer))`) or fix the tokenizer/vocabulary mismatch.",
        "Check special tokens added after the model was built, and the padding id used by the collate function.",
    ],
    "input_extreme_scale": [
        "Normalise batch field `{tensor}` like the rest of the data (its abs-max is {ratio}x the usual).",
        "Find the badly scaled source with `nanguard scan DATA` and fix its units/normalisation.",
        "Robust-normalise or clip inputs in the data pipeline rather than the loss.",
    ],
    "weights_nonfinite": [
        "Roll back to the last finite checkpoint; the weights `{tensor}` are already non-finite.",
        "Find the step that first wrote them: run under `nanguard.Guard` from that checkpoint.",
        "Do not `nan_to_num` the weights: the optimizer state is likely poisoned too.",
    ],
    "optimizer_state_nonfinite": [
        "Roll back to the last finite checkpoint, or reset the optimizer state of `{tensor}`.",
        "Keep optimizer state in float32 (use AMP with fp32 master weights instead of a pure-half model).",
        "Skip non-finite steps before `optimizer.step()` (nanguard does this) so the moments stay finite.",
    ],
    "forward_overflow": [
        "{op} in {module} exceeds the {dtype} range (max {dtype_max}): run it in float32 "
        "(`torch.autocast(..., enabled=False)` around {module}) or use bfloat16.",
        "Rescale before the op (normalise inputs, scale attention scores by 1/sqrt(d), use a stable "
        "softmax/logsumexp).",
        "With fp16, keep a GradScaler and fp32 master weights; lower the learning rate if activations grow.",
    ],
    "masked_softmax_all_masked": [
        "{module}: fill masks with `torch.finfo(dtype).min` instead of -inf, or use "
        "`nanguard.ops.masked_softmax`, which returns 0 for a fully masked row.",
        "Drop empty sequences (rows {rows} have no unmasked position) in the collate function.",
    ],
    "masked_target_logit": [
        "The target class's logit is masked to -inf: mask with a large finite negative "
        "(`torch.finfo(dtype).min`) or never mask the target class.",
        "Check the label-to-class mapping of each dataset against its logits mask.",
    ],
    "invalid_math_domain": [
        "{op} in {module}: {domain_fix}",
        "Compute the quantity in a stable form (log_softmax / logsumexp / `torch.special.xlogy`).",
    ],
    "backward_singularity": [
        "{op} in {module} has an infinite derivative at this input: {singular_fix}",
        "With `torch.where`, make the untaken branch safe too (compute on a masked/clamped input), "
        "because its gradient is multiplied by 0 and 0*inf = NaN.",
    ],
    "backward_overflow": [
        "Use a GradScaler (or lower its init_scale) so fp16 gradients stay in range; or use bfloat16.",
        "Run {module} in float32 under autocast; lower the learning rate if gradients keep growing.",
    ],
    "gradient_explosion": [
        "Clip gradients (`torch.nn.utils.clip_grad_norm_(params, 1.0)`), nanguard's Guard can do it adaptively.",
        "Lower the learning rate or lengthen warmup; check the largest gradient, `{tensor}`.",
        "Add normalisation (LayerNorm/RMSNorm) or residual scaling in {module}.",
    ],
    "loss_spike": [
        "Inspect the samples of this batch: the loss is {ratio}x its running level with data in range.",
        "Skip spiking batches (nanguard does) and consider a lower learning rate or gradient clipping.",
    ],
    "divergence": [
        "Lower the learning rate (e.g. x0.5; now {lr}) or lengthen warmup: the loss rose {ratio}x.",
        "Clip gradients and check the LR schedule (a restart or a too-high peak).",
    ],
    "update_overflow": [
        "The optimizer update overflowed {dtype} in `{tensor}`: keep fp32 master weights and optimizer "
        "state (AMP) instead of a pure-half model.",
        "Use eps >= 1e-4 for Adam in float16 (eps=1e-8 rounds to 0), or a bf16-safe optimizer setup.",
        "Lower the learning rate.",
    ],
    "batchnorm_degenerate": [
        "{module}: batch statistics of {per_channel} value(s) per channel or zero variance; use batch size >= 2 "
        "per device (drop_last=True) or GroupNorm/LayerNorm instead of BatchNorm.",
        "Keep eps > 0 in BatchNorm; use SyncBatchNorm when per-GPU batches are small.",
    ],
    "nondeterministic": [
        "A replay from the same state and batch was finite: the fault is transient (nondeterministic kernels, "
        "hardware, a race, or code that depends on call count/time). Skipping this step is safe.",
        "If it recurs, enable `torch.use_deterministic_algorithms(True)` and check the GPU (ECC errors).",
    ],
    "unknown": [
        "Re-run this step with `nanguard.Guard(..., forensics=True)` and inspect the event's details.",
        "Share the event (events.jsonl) and the report with the maintainers.",
    ],
}

DOMAIN_FIXES = {
    "aten::log": "its input had {zeros} zero(s) and {negatives} negative value(s); use `torch.log(x.clamp_min(eps))` "
    "or log_softmax instead of log(softmax).",
    "aten::div": "the divisor had {divisor_zeros} zero(s) ({zero_over_zero} of them 0/0); divide by "
    "`den.clamp_min(1)` (masked mean: `x.sum() / mask.sum().clamp_min(1)`).",
    "aten::sqrt": "its input had {negatives} negative value(s); use `torch.sqrt(x.clamp_min(0) + eps)`.",
    "aten::pow": "negative base with a fractional exponent or 0 to a negative power; clamp the base.",
    "aten::acos": "clamp its input to [-1 + eps, 1 - eps].",
    "aten::asin": "clamp its input to [-1 + eps, 1 - eps].",
    "aten::var": "variance of a single element (correction=1) is 0/0; use `unbiased=False` or more elements.",
    "aten::std": "std of a single element (correction=1) is 0/0; use `unbiased=False` or more elements.",
}
SINGULAR_FIXES = {
    "aten::sqrt": "use `torch.sqrt(x + eps)`: d sqrt(x)/dx = 1/(2 sqrt(x)) is infinite at 0.",
    "aten::linalg_vector_norm": "the gradient of a norm at 0 is 0/0; use `torch.sqrt((x*x).sum(-1) + eps)` "
    "or `F.normalize(x, eps=...)`.",
    "aten::norm": "the gradient of a norm at 0 is 0/0; use `torch.sqrt((x*x).sum(-1) + eps)`.",
    "aten::pow": "x**p with p < 1 has an infinite derivative at 0; use `(x + eps) ** p`.",
    "aten::where": "the untaken branch is NaN/inf; clamp its input so both branches are finite.",
    "aten::acos": "clamp the input to [-1 + eps, 1 - eps]; the derivative is infinite at +-1.",
    "aten::asin": "clamp the input to [-1 + eps, 1 - eps]; the derivative is infinite at +-1.",
    "aten::div": "the derivative of a/b is infinite where b = 0; clamp the denominator.",
}


def fixes_for(cause: str, **context: Any) -> list[str]:
    out = []
    for template in FIXES.get(cause, FIXES["unknown"]):
        try:
            out.append(template.format_map(_Defaults(context)))
        except (ValueError, IndexError):
            out.append(template)
    return out


class _Defaults(dict):
    def __missing__(self, key: str) -> str:
        return "?"


def _make(
    cause: str,
    phase: str,
    *,
    confidence: float,
    evidence: list[str],
    fix: dict[str, Any] | None = None,
    **where: Any,
) -> Diagnosis:
    context = {k: v for k, v in where.items() if v is not None}
    context.update(fix or {})
    context["module"] = _mod(where.get("module"))
    if "op" in context:
        context["op"] = f"`{context['op']}`"
    return Diagnosis(
        cause=cause,
        phase=phase,
        module=where.get("module"),
        op=where.get("op"),
        tensor=where.get("tensor"),
        reproducible=where.get("reproducible"),
        confidence=confidence,
        evidence=[e for e in evidence if e],
        fixes=fixes_for(cause, **context),
    )


# ------------------------------------------------------------------------------ rules
Rule = Callable[[Facts], "Diagnosis | None"]


def _rule_input_nonfinite(f: Facts) -> Diagnosis | None:
    if not f.batch_nonfinite:
        return None
    first = f.batch_nonfinite[0]
    evidence = [
        f"batch field `{b['field']}`: {b['nan']} NaN, {b['inf']} Inf of {b['numel']} values (rows {b['rows']})"
        for b in f.batch_nonfinite[:4]
    ]
    used = next(
        (b for b in f.births if b.phase == "input" and b.source == f"batch field {first['field']}"), None
    )
    if used is not None and used.extra.get("first_used_by"):
        evidence.append(f"first used by {used.extra['first_used_by']} in {_mod(used.module)}")
    return _make(
        "input_nonfinite",
        "data",
        confidence=0.97,
        evidence=evidence,
        tensor=first["field"],
        module=used.module if used is not None else None,
        reproducible=f.reproduced,
        fix={"rows": first["rows"]},
    )


def _rule_label_out_of_range(f: Facts) -> Diagnosis | None:
    if f.labels:
        first = f.labels[0]
        evidence = [lab["evidence"] for lab in f.labels[:4]]
        if f.exception is not None and f.exception["kind"] in ("target_out_of_bounds", "class_out_of_range"):
            evidence.append(f"the step raised {f.exception['text']}")
        return _make(
            "label_out_of_range",
            "data",
            confidence=0.95,
            evidence=evidence,
            tensor=first.get("field"),
            module=first.get("module"),
            op=first.get("op"),
            reproducible=True,
            fix={"classes": first.get("num_classes"), "needed": first.get("needed")},
        )
    if f.tokens:
        first = f.tokens[0]
        evidence = [
            f"token id {t['max']} >= num_embeddings {t['num_embeddings']} of {_mod(t['module'])} "
            f"(field `{t.get('field') or '?'}`, {t['out_of_range']} id(s) out of range)"
            for t in f.tokens[:4]
        ]
        if f.exception is not None:
            evidence.append(f"the step raised {f.exception['text']}")
        diagnosis = _make(
            "label_out_of_range",
            "data",
            confidence=0.9,
            evidence=evidence,
            tensor=first.get("field"),
            module=first.get("module"),
            op=first.get("op"),
            reproducible=True,
        )
        diagnosis.fixes = fixes_for(
            "label_out_of_range:tokens",
            tensor=first.get("field") or "?",
            classes=first["num_embeddings"],
            module=_mod(first.get("module")),
        )
        return diagnosis
    return None


def _rule_extreme_scale(f: Facts) -> Diagnosis | None:
    if not f.extreme_scale:
        return None
    first = max(f.extreme_scale, key=lambda e: e["ratio"])
    evidence = [
        f"batch field `{e['field']}`: abs-max {fmt(e['absmax'])} vs median {fmt(e['history_median'])} of earlier "
        f"batches ({fmt(e['ratio'])}x; previous max {fmt(e['history_max'])})"
        for e in f.extreme_scale[:4]
    ]
    if f.loss is not None:
        evidence.append(f"loss {fmt(f.loss)}")
    return _make(
        "input_extreme_scale",
        "data",
        confidence=0.85,
        evidence=evidence,
        tensor=first["field"],
        reproducible=f.reproduced,
        fix={"ratio": fmt(first["ratio"])},
    )


def _rule_update_flag(f: Facts) -> Diagnosis | None:
    if not f.update_made_weights_nonfinite:
        return None
    replay = f.replay
    if f.entry_grads or (replay is not None and not replay.grads_finite):
        return None  # non-finite gradients explain non-finite weights better than the update does
    poisoned = [o for o in f.optimizer_state if o["nan"]]
    if poisoned:
        # Moment updates from finite gradients (m = b1*m + (1-b1)*g, v = b2*v + (1-b2)*g*g) can overflow
        # to inf but never make a NaN: a NaN in the buffers was there before this update.
        diagnosis = _rule_optimizer_state(f)
        if diagnosis is not None:
            diagnosis.evidence.insert(
                0,
                "finite gradients went into the update and non-finite weights came out; the optimizer's "
                "buffers hold NaN, which finite gradients cannot create",
            )
            return diagnosis
    return _update_overflow(
        f, "the guard saw finite weights and gradients before the update and non-finite weights after it"
    )


def _update_overflow(f: Facts, why: str) -> Diagnosis:
    evidence = [why]
    became = (f.update_sim or {}).get("became_nonfinite", [])
    for b in became[:3]:
        evidence.append(
            f"simulated {f.update_sim['optimizer']} step: `{b['name']}` ({b['dtype']}) -> "  # type: ignore[index]
            f"{b['nan']} NaN, {b['inf']} Inf"
        )
    for e in f.eps_underflow[:2]:
        evidence.append(f"param group {e['group']}: eps={fmt(e['eps'])} rounds to 0 in {e['dtype']}")
    if f.lr is not None:
        evidence.append(f"lr {fmt(f.lr)}")
    tensor = became[0]["name"] if became else (f.weights[0]["name"] if f.weights else None)
    dtype = (
        became[0]["dtype"] if became else (f.eps_underflow[0]["dtype"] if f.eps_underflow else "the dtype")
    )
    module = tensor.rsplit(".", 1)[0] if tensor and "." in tensor else None
    return _make(
        "update_overflow",
        "optimizer",
        confidence=0.9 if became or f.update_made_weights_nonfinite else 0.6,
        evidence=evidence,
        tensor=tensor,
        module=module,
        reproducible=True,
        fix={"dtype": dtype},
    )


def _rule_weights(f: Facts) -> Diagnosis | None:
    if not f.weights:
        return None
    first = f.weights[0]
    evidence = [
        f"{w['kind']} `{w['name']}`: {w['nan']} NaN, {w['inf']} Inf of {w['numel']}" for w in f.weights[:4]
    ]
    if len(f.weights) > 4:
        evidence.append(f"... {len(f.weights)} tensors in all")
    if not f.state_is_pre_step:
        evidence.append("state is after the step's update: the update may have written them")
    return _make(
        "weights_nonfinite",
        "state",
        confidence=0.95 if f.state_is_pre_step else 0.6,
        evidence=evidence,
        tensor=first["name"],
        module=first["module"],
        reproducible=True,
    )


def _rule_optimizer_state(f: Facts) -> Diagnosis | None:
    if not f.optimizer_state:
        return None
    first = f.optimizer_state[0]
    evidence = [
        f"optimizer state `{o['name']}`: {o['nan']} NaN, {o['inf']} Inf of {o['numel']}"
        for o in f.optimizer_state[:4]
    ]
    if f.weights:
        evidence.append(f"{len(f.weights)} parameter/buffer tensor(s) are non-finite too, e.g. `{f.weights[0]['name']}`")
    else:
        evidence.append("parameters are finite; the next update would write these into the weights")
    return _make(
        "optimizer_state_nonfinite",
        "state",
        confidence=0.93,
        evidence=evidence,
        tensor=first["name"],
        module=first["module"],
        reproducible=True,
    )


def _rule_exception(f: Facts) -> Diagnosis | None:
    """Exceptions that name their cause outright (label/token ones are handled by the data rules)."""
    exc = f.exception
    if exc is None:
        return None
    ctx = f.error_context or {}
    if exc["kind"] == "batchnorm_single_value":
        stack = ctx.get("module_stack") or []
        module = next((m for m in reversed(stack) if m in f.batchnorm_training), None)
        module = module if module is not None else (f.batchnorm_training[0] if f.batchnorm_training else None)
        return _make(
            "batchnorm_degenerate",
            "forward",
            confidence=0.95,
            evidence=[
                f"the step raised {exc['text']}",
                "BatchNorm in train mode needs >= 2 values per channel",
            ],
            module=module,
            op="aten::batch_norm",
            reproducible=True,
            fix={"per_channel": 1},
        )
    if exc["kind"] == "batchnorm_eps":
        return _make(
            "batchnorm_degenerate",
            "forward",
            confidence=0.85,
            evidence=[f"the step raised {exc['text']}", "eps = 0 divides by a zero batch variance"],
            module=f.batchnorm_training[0] if f.batchnorm_training else None,
            op="aten::batch_norm",
            reproducible=True,
            fix={"per_channel": "?"},
        )
    if exc["kind"] == "bce_input_range":
        return _make(
            "invalid_math_domain",
            "loss",
            confidence=0.8,
            evidence=[
                f"the step raised {exc['text']}",
                "binary_cross_entropy needs probabilities in [0, 1]: use BCEWithLogitsLoss on logits",
            ],
            op="aten::binary_cross_entropy",
            module=ctx.get("module"),
            reproducible=True,
            fix={"domain_fix": "pass logits to `F.binary_cross_entropy_with_logits` instead."},
        )
    return None


def _loss_op_masked(f: Facts) -> dict[str, Any] | None:
    return next((op for op in f.loss_ops if op.get("masked_targets")), None)


def _rule_masked_target(f: Facts) -> Diagnosis | None:
    record = _loss_op_masked(f)
    replay = f.replay
    if record is None or replay is None or replay.loss_finite:
        return None
    rows = record.get("masked_target_rows", [])
    evidence = [
        f"{record['op']}: {record['masked_targets']} target(s) whose logit is -inf (batch rows {rows}); "
        f"loss {fmt(replay.loss)}",
        "gradients finite" if replay.grads_finite else f"{len(replay.grad_nonfinite)} gradient(s) non-finite",
    ]
    if f.loss_origin is not None and f.loss_origin.intended:
        evidence.append(
            f"the -inf came from {f.loss_origin.where()} (value {f.loss_origin.scalars.get('value', '-inf')})"
        )
    beyond = record.get("targets_beyond_valid_prefix") or []
    if beyond and len(beyond) == min(record["masked_targets"], 16):
        b = beyond[0]
        evidence.insert(
            0,
            f"label {b['target']} >= {b['valid_classes']} valid (unmasked) classes of batch row "
            f"{b['row']}: the label is outside its dataset's class range",
        )
        return _make(
            "label_out_of_range",
            "data",
            confidence=0.8,
            evidence=evidence,
            tensor=record.get("field"),
            op=record["op"],
            module=record.get("module"),
            reproducible=True,
            fix={"classes": b["valid_classes"], "needed": b["target"] + 1},
        )
    return _make(
        "masked_target_logit",
        "loss",
        confidence=0.92,
        evidence=evidence,
        tensor=record.get("field") or "target",
        op=record["op"],
        module=record.get("module"),
        reproducible=True,
    )


def _culprit(f: Facts) -> Birth | None:
    """The birth the step's non-finite result descends from, followed back past derived NaNs."""
    target = f.loss_origin if f.loss_origin is not None else f.grad_origin
    if target is None:
        target = next((b for b in f.births if not b.intended), None)
    if target is None:
        return None
    return root_of(f.births, target)


def _rule_from_trace(f: Facts) -> Diagnosis | None:
    replay = f.replay
    if replay is None or replay.finite or not f.births:
        return _rule_absorbed_forward_nan(f)
    birth = _culprit(f)
    if birth is None:
        return None
    fp32_finite = f.fp32 is not None and f.fp32.finite
    low = birth.dtype in LOW_PRECISION
    evidence = [_birth_line(birth)]
    parent = f.births[birth.parent] if birth.parent is not None and birth.parent < len(f.births) else None
    if parent is not None:
        evidence.append(
            f"its inputs' inf came from {parent.where()}"
            + (" (a deliberate mask fill)" if parent.intended else "")
        )
    evidence.append(_outcome_line(replay))
    if f.fp32 is not None:
        evidence.append(f"float32 replay: {_outcome_line(f.fp32)}")
    rep = f.reproduced

    if birth.phase == "input":
        source = birth.source or ""
        if source.startswith("parameter ") or source.startswith("buffer "):
            return _make(
                "weights_nonfinite",
                "state",
                confidence=0.9,
                evidence=evidence,
                tensor=source.split(" ", 1)[1],
                module=birth.module,
                reproducible=True,
            )
        if source.startswith("batch field "):
            return _make(
                "input_nonfinite",
                "data",
                confidence=0.9,
                evidence=evidence,
                tensor=source.split(" ", 2)[2],
                module=birth.module,
                reproducible=True,
            )
    op = birth.op or ""
    if op in SOFTMAX_OPS or "scaled_dot_product" in op:
        rows = birth.extra.get("rows_all_masked", 0)
        if rows and (parent is None or parent.intended or parent.phase == "input"):
            evidence.insert(
                1,
                f"{rows} row(s) had every score = -inf (batch rows "
                f"{birth.extra.get('batch_rows_all_masked')})",
            )
            return _make(
                "masked_softmax_all_masked",
                birth.phase,
                confidence=0.95,
                evidence=evidence,
                op=op,
                module=birth.module,
                tensor=_empty_mask_field(f, birth.extra.get("batch_rows_all_masked")),
                reproducible=rep,
                fix={"rows": birth.extra.get("batch_rows_all_masked")},
            )
    bn = _batchnorm_evidence(birth)
    if bn is not None:
        evidence.insert(1, bn["line"])
        return _make(
            "batchnorm_degenerate",
            birth.phase,
            confidence=0.9,
            evidence=evidence,
            op=birth.forward_op if birth.phase == "backward" else op,
            module=birth.module,
            reproducible=rep,
            fix={"per_channel": bn["per_channel"]},
        )
    if birth.phase == "backward":
        return _backward_cause(f, birth, evidence, fp32_finite, low)
    if replay.loss is not None and replay.loss_finite:
        return _absorbed(f, birth)
    # forward / loss
    if low and fp32_finite:
        return _make(
            "forward_overflow",
            birth.phase,
            confidence=0.93,
            evidence=evidence,
            op=op,
            module=birth.module,
            reproducible=rep,
            fix={"dtype": birth.dtype, "dtype_max": fmt(DTYPE_MAX.get(birth.dtype or "", 0))},
        )
    if _is_domain(birth):
        return _make(
            "invalid_math_domain",
            birth.phase,
            confidence=0.92,
            evidence=evidence,
            op=op,
            module=birth.module,
            reproducible=rep,
            fix={"domain_fix": _domain_fix(birth)},
        )
    if _overflow_like(birth):
        if low and f.fp32 is not None and not f.fp32.finite:
            evidence.append("overflows in float32 too: the values themselves are too large")
        return _make(
            "forward_overflow",
            birth.phase,
            confidence=0.7 if not low else 0.8,
            evidence=evidence,
            op=op,
            module=birth.module,
            reproducible=rep,
            fix={"dtype": birth.dtype, "dtype_max": fmt(DTYPE_MAX.get(birth.dtype or "", 0))},
        )
    if parent is not None and parent.intended:
        evidence.append("a -inf mask value reached arithmetic (e.g. -inf * 0 or -inf + inf)")
    return _make(
        "invalid_math_domain",
        birth.phase,
        confidence=0.6,
        evidence=evidence,
        op=op,
        module=birth.module,
        reproducible=rep,
        fix={"domain_fix": _domain_fix(birth)},
    )


def _backward_cause(f: Facts, birth: Birth, evidence: list[str], fp32_finite: bool, low: bool) -> Diagnosis:
    fwd = birth.forward_op
    rep = f.reproduced
    evidence.insert(
        1,
        f"forward of {fwd or '?'} in {_mod(birth.module)} was finite; its backward "
        f"({birth.backward_node}) made the {birth.kind}",
    )
    if low and fp32_finite:
        return _make(
            "backward_overflow",
            "backward",
            confidence=0.9,
            evidence=evidence,
            op=fwd or birth.op,
            module=birth.module,
            reproducible=rep,
        )
    singular = (fwd in SINGULAR_BACKWARD_OPS) or _has_zero_divisor(birth)
    if singular and not _overflow_like(birth):
        return _make(
            "backward_singularity",
            "backward",
            confidence=0.9,
            evidence=evidence,
            op=fwd or birth.op,
            module=birth.module,
            reproducible=rep,
            fix={"singular_fix": SINGULAR_FIXES.get(fwd or "", "add an eps or clamp the input.")},
        )
    if _overflow_like(birth):
        top = _top_grad(f)
        if top:
            evidence.append(top)
        return _make(
            "gradient_explosion",
            "backward",
            confidence=0.75,
            evidence=evidence,
            op=fwd or birth.op,
            module=birth.module,
            reproducible=rep,
        )
    return _make(
        "backward_singularity",
        "backward",
        confidence=0.6,
        evidence=evidence,
        op=fwd or birth.op,
        module=birth.module,
        reproducible=rep,
        fix={"singular_fix": SINGULAR_FIXES.get(fwd or "", "add an eps or clamp the input.")},
    )


def _rule_absorbed_forward_nan(f: Facts) -> Diagnosis | None:
    """Loss finite, gradients not, and a forward NaN/inf that never reached the loss (torch.where)."""
    replay = f.replay
    if replay is None or not replay.loss_finite or replay.grads_finite:
        return None
    if any(b.phase == "backward" and not b.intended for b in f.births):
        return None
    absorbed = next((b for b in f.births if b.phase in ("forward", "loss") and not b.intended), None)
    return _absorbed(f, absorbed) if absorbed is not None else None


def _absorbed(f: Facts, absorbed: Birth) -> Diagnosis:
    replay = f.replay
    assert replay is not None
    evidence = [
        _birth_line(absorbed),
        f"loss {fmt(replay.loss)} is finite: the forward {absorbed.kind} was discarded (e.g. by torch.where), but "
        "its backward multiplies it into the gradient",
        _outcome_line(replay),
    ]
    return _make(
        "backward_singularity",
        "backward",
        confidence=0.85,
        evidence=evidence,
        op=absorbed.op,
        module=absorbed.module,
        reproducible=f.reproduced,
        fix={
            "singular_fix": "its forward value was NaN/inf where torch.where (or a mask) discarded it; "
            + SINGULAR_FIXES.get(absorbed.op or "", "clamp its input so both branches are finite.")
        },
    )


# A vector norm above this squares past float32's largest value: its float32 computation returns inf.
FLOAT32_NORM_OVERFLOW = math.sqrt(DTYPE_MAX["float32"])


def _rule_norm_overflow(f: Facts) -> Diagnosis | None:
    """Every gradient entry finite, yet the step's gradient norm was inf: the norm overflowed float32.

    The replay reproduces the step (it is not transient); its gradients are simply so large that the sum
    of their squares passes float32's range. That is a gradient explosion, whatever the dtype.
    """
    replay = f.replay
    if f.trigger != "nonfinite_grad" or replay is None or not replay.finite or not replay.grad_norms:
        return None
    total = replay.total_grad_norm
    if not (total >= FLOAT32_NORM_OVERFLOW):
        return None
    evidence = [
        f"every gradient entry is finite, but their total norm {fmt(total)} overflows float32 "
        f"(above {fmt(FLOAT32_NORM_OVERFLOW)}): the step's grad norm was {fmt(f.grad_norm)}",
    ]
    top = _top_grad(f)
    if top:
        evidence.append(top)
    if f.loss is not None:
        evidence.append(f"loss {fmt(f.loss)}; replay loss {fmt(replay.loss)}")
    name = _top_grad_name(f)
    return _make(
        "gradient_explosion",
        "backward",
        confidence=0.85,
        evidence=evidence,
        tensor=name,
        module=name.rsplit(".", 1)[0] if name and "." in name else None,
        reproducible=True,
    )


def _rule_nondeterministic(f: Facts) -> Diagnosis | None:
    if not f.trigger.startswith("nonfinite") or f.trigger == "nonfinite_input":
        return None
    runs = [r for r in (f.plain, f.traced) if r is not None]
    if not runs or any(not r.finite for r in runs):
        return None
    evidence = [
        f"the step was non-finite ({f.trigger}, loss {fmt(f.loss)}, grad norm {fmt(f.grad_norm)})",
        *[f"{r.label} replay from identical state, batch and RNG: {_outcome_line(r)}" for r in runs],
    ]
    if f.entry_grads:
        evidence.append(
            f"the step's own gradients were non-finite in {len(f.entry_grads)} tensor(s), "
            f"e.g. `{f.entry_grads[0]['name']}`"
        )
    if not f.state_is_pre_step:
        evidence.append("state was not exactly the pre-step state: lower confidence")
    module = (
        f.entry_grads[0]["name"].rsplit(".", 1)[0]
        if f.entry_grads and "." in f.entry_grads[0]["name"]
        else None
    )
    return _make(
        "nondeterministic",
        "unknown",
        confidence=0.8 if f.state_is_pre_step else 0.5,
        evidence=evidence,
        reproducible=False,
        module=module,
    )


def _rule_update_sim(f: Facts) -> Diagnosis | None:
    became = (f.update_sim or {}).get("became_nonfinite")
    replay = f.replay
    if not became or replay is None or not replay.finite:
        return None
    return _update_overflow(
        f,
        f"gradients and loss finite ({_outcome_line(replay)}), "
        "yet one optimizer step makes weights non-finite",
    )


def _rule_spikes(f: Facts) -> Diagnosis | None:
    replay = f.replay
    if f.trigger == "grad_spike" or (
        f.grad_spike and f.grad_spike["ratio"] > 10 and f.trigger != "loss_spike"
    ):
        s = f.grad_spike or {}
        evidence = (
            [
                f"grad norm {fmt(f.grad_norm)} vs running mean {fmt(s.get('mean'))} "
                f"({fmt(s.get('ratio'))}x, z={fmt(s.get('z'))})"
            ]
            if s
            else [f"grad norm {fmt(f.grad_norm)}"]
        )
        top = _top_grad(f)
        if top:
            evidence.append(top)
        evidence.append("batch values finite and in their usual range")
        name = _top_grad_name(f)
        module = name.rsplit(".", 1)[0] if name and "." in name else None
        return _make(
            "gradient_explosion",
            "backward",
            confidence=0.8,
            evidence=evidence,
            tensor=name,
            module=module,
            reproducible=f.reproduced if replay is not None else None,
        )
    if f.trigger == "loss_spike":
        s = f.loss_spike or {}
        evidence = (
            [
                f"loss {fmt(f.loss)} vs running mean {fmt(s.get('mean'))} ({fmt(s.get('ratio'))}x, "
                f"z={fmt(s.get('z'))})"
            ]
            if s
            else [f"loss {fmt(f.loss)}"]
        )
        evidence.append("batch finite, labels in range, no input scale jump, no non-finite op in the replay")
        return _make(
            "loss_spike",
            "loss",
            confidence=0.7,
            evidence=evidence,
            reproducible=f.reproduced,
            fix={"ratio": fmt(s.get("ratio"))},
        )
    if f.trigger == "divergence":
        t = f.trend or {}
        evidence = (
            [
                f"loss mean rose from {fmt(t.get('first'))} to {fmt(t.get('last'))} over "
                f"{fmt(t.get('steps'))} steps ({fmt(t.get('ratio'))}x)"
            ]
            if t
            else ["loss trending upward"]
        )
        if f.lr is not None:
            evidence.append(f"lr {fmt(f.lr)}")
        return _make(
            "divergence",
            "optimizer",
            confidence=0.7,
            evidence=evidence,
            fix={"lr": fmt(f.lr), "ratio": fmt(t.get("ratio"))},
        )
    return None


def _rule_unknown(f: Facts) -> Diagnosis:
    evidence = [f"checked: {', '.join(f.checked) or 'nothing'}"]
    if f.exception is not None:
        evidence.append(f"the step raised {f.exception['text']}")
    for r in (f.plain, f.traced, f.fp32):
        if r is not None:
            evidence.append(f"{r.label} replay: {_outcome_line(r)}")
    ctx = f.error_context
    if ctx:
        evidence.append(
            f"replay raised in {ctx.get('op')} ({ctx.get('phase')}, module {_mod(ctx.get('module'))}, "
            f"stack {ctx.get('module_stack')})"
        )
    evidence += [f"failed: {x}" for x in f.failures[:4]]
    return _make(
        "unknown",
        "unknown",
        confidence=0.1,
        evidence=evidence,
        reproducible=f.reproduced,
        module=ctx.get("module") if ctx else None,
        op=ctx.get("op") if ctx else None,
    )


RULES: tuple[Rule, ...] = (
    _rule_input_nonfinite,
    _rule_label_out_of_range,
    _rule_extreme_scale,
    _rule_update_flag,
    _rule_weights,
    _rule_optimizer_state,
    _rule_exception,
    _rule_masked_target,
    _rule_from_trace,
    _rule_update_sim,
    _rule_norm_overflow,
    _rule_nondeterministic,
    _rule_spikes,
)


def diagnose(facts: Facts) -> Diagnosis:
    """The first rule that matches names the cause; ``unknown`` says what was checked."""
    for rule in RULES:
        diagnosis = rule(facts)
        if diagnosis is not None:
            return diagnosis
    return _rule_unknown(facts)


# ------------------------------------------------------------------------------ evidence helpers
def _birth_line(b: Birth) -> str:
    out = b.outputs[0] if b.outputs else {}
    counts = f"{out.get('nan', 0)} NaN, {out.get('posinf', 0)} +inf, {out.get('neginf', 0)} -inf of shape {out.get('shape')}"
    where = f"{b.op} in {_mod(b.module)}" if b.op else f"{b.source}"
    if b.phase == "backward":
        where += f" (backward of {b.forward_op or '?'}, node {b.backward_node})"
    line = f"first {b.kind} born at {where} [{b.phase}, {b.dtype}]: {counts}"
    inputs = [i for i in b.inputs if "absmax" in i or "nan" in i]
    if inputs:
        parts = []
        for i in inputs[:3]:
            bits = [f"absmax {fmt(i.get('absmax'))}"]
            for key in ("zeros", "negatives", "neginf", "posinf"):
                if i.get(key):
                    bits.append(f"{i[key]} {key}")
            parts.append(f"{i['arg']} " + "/".join(bits))
        line += "; inputs: " + ", ".join(parts)
    if b.extra.get("divisor_zeros"):
        line += f"; divisor zeros {b.extra['divisor_zeros']} (0/0: {b.extra.get('zero_over_zero', 0)})"
    if b.extra.get("nonfinite_rows"):
        line += f"; rows {b.extra['nonfinite_rows']}"
    return line


def _outcome_line(r: ReplayOutcome) -> str:
    if r.error:
        return f"raised {r.error}"
    grads = (
        "grads finite"
        if r.grads_finite
        else (f"{len(r.grad_nonfinite)} grad(s) non-finite, e.g. `{next(iter(r.grad_nonfinite))}`")
    )
    return f"loss {fmt(r.loss)}, {grads}, grad norm {fmt(r.total_grad_norm)}"


def _is_domain(b: Birth) -> bool:
    op = b.op or ""
    return op in DOMAIN_OPS or op.rstrip("_") in DOMAIN_OPS


def _has_zero_divisor(b: Birth) -> bool:
    if b.extra.get("divisor_zeros"):
        return True
    return (b.op or "") in ("aten::div", "aten::pow", "aten::reciprocal", "aten::rsqrt") and any(
        i.get("zeros") for i in b.inputs
    )


def _overflow_like(b: Birth) -> bool:
    """inf from finite inputs whose magnitudes are large: overflow, not a domain edge."""
    if b.kind != "inf" or _has_zero_divisor(b):
        return False
    limit = DTYPE_MAX.get(b.dtype or "", 3.4e38)
    absmax = [float(i["absmax"]) for i in b.inputs if isinstance(i.get("absmax"), (int, float))]
    return (bool(absmax) and max(absmax) > min(1e4, math.sqrt(limit))) or b.op in (
        "aten::exp",
        "aten::_to_copy",
    )


def _domain_fix(b: Birth) -> str:
    template = DOMAIN_FIXES.get(
        (b.op or "").rstrip("_"), "keep its input inside the domain (clamp, add eps)."
    )
    values: dict[str, Any] = {
        "divisor_zeros": b.extra.get("divisor_zeros", "?"),
        "zero_over_zero": b.extra.get("zero_over_zero", "?"),
    }
    first = b.inputs[0] if b.inputs else {}
    values.update(zeros=first.get("zeros", "?"), negatives=first.get("negatives", "?"))
    return template.format_map(_Defaults(values))


def _batchnorm_evidence(b: Birth) -> dict[str, Any] | None:
    names = (b.op or "", b.forward_op or "")
    if not any("batch_norm" in n for n in names):
        return None
    per_channel = b.extra.get("values_per_channel")
    zero_var = b.extra.get("zero_variance_channels")
    if per_channel is None:
        return {"line": "batch-norm statistics degenerate", "per_channel": "?"}
    if per_channel > 1 and not zero_var:
        return None
    return {
        "line": f"batch norm over {per_channel} value(s) per channel; {zero_var} of {b.extra.get('channels')} "
        "channel(s) with zero variance",
        "per_channel": per_channel,
    }


def _top_grad_name(f: Facts) -> str | None:
    replay = f.replay
    if replay is None or not replay.grad_norms:
        return None
    return max(replay.grad_norms.items(), key=lambda kv: kv[1] if math.isfinite(kv[1]) else math.inf)[0]


def _top_grad(f: Facts) -> str | None:
    name = _top_grad_name(f)
    if name is None or f.replay is None:
        return None
    return f"largest gradient `{name}`: norm {fmt(f.replay.grad_norms[name])}"
