"""Rules of the op family: an operator made the first non-finite value (a domain error, a singular
derivative, an overflow, a fully masked softmax row, a masked target, a degenerate batch norm)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nanguard.events import Diagnosis
from nanguard.forensics.rules.facts import (
    DTYPE_MAX,
    LOW_PRECISION,
    SINGULAR_BACKWARD_OPS,
    SINGULAR_FIXES,
    Facts,
    batchnorm_evidence,
    birth_line,
    count,
    domain_fix,
    fmt,
    has_zero_divisor,
    is_domain,
    make,
    mod,
    outcome_line,
    overflow_like,
    top_grad,
)
from nanguard.forensics.trace import SOFTMAX_OPS, Birth, root_of


def rule_exception(f: Facts) -> Diagnosis | None:
    """Exceptions that name their cause outright (label/token ones are handled by the data rules)."""
    exc = f.exception
    if exc is None:
        return None
    ctx = f.error_context or {}
    if exc["kind"] == "batchnorm_single_value":
        stack = ctx.get("module_stack") or []
        module = next((m for m in reversed(stack) if m in f.batchnorm_training), None)
        module = module if module is not None else (f.batchnorm_training[0] if f.batchnorm_training else None)
        return make(
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
        return make(
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
        return make(
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


def rule_masked_target(f: Facts) -> Diagnosis | None:
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
        return make(
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
    return make(
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


@dataclass
class _Trace:
    """The birth a rule explains, and what the evidence lines already say about it."""

    birth: Birth
    parent: Birth | None
    evidence: list[str]

    @property
    def op(self) -> str:
        return self.birth.op or ""


def rule_from_trace(f: Facts) -> Diagnosis | None:
    """The replay made a non-finite value: name the op (and module, phase) where it was born."""
    replay = f.replay
    if replay is None or replay.finite or not f.births:
        return rule_absorbed_forward_nan(f)
    birth = _culprit(f)
    if birth is None:
        return None
    parent = _parent(f, birth)
    trace = _Trace(birth, parent, [birth_line(birth, parent)])
    if trace.parent is not None:
        trace.evidence.append(f"its inputs' inf came from {trace.parent.where()}"
                              + (" (a deliberate mask fill)" if trace.parent.intended else ""))
    trace.evidence.append(f"the replay: {outcome_line(replay)}")
    if f.fp32 is not None:
        trace.evidence.append(f"the float32 replay: {outcome_line(f.fp32)}")
    for rule in (_born_in_inputs, _born_in_masked_softmax, _born_in_batchnorm):
        diagnosis = rule(f, trace)
        if diagnosis is not None:
            return diagnosis
    domain = _discarded_domain_birth(f, birth)
    if domain is not None:
        return _domain_in_forward(f, domain)
    if birth.phase == "backward":
        fp32_finite = f.fp32 is not None and f.fp32.finite
        return _backward_cause(f, birth, trace.evidence, fp32_finite, birth.dtype in LOW_PRECISION)
    if replay.loss is not None and replay.loss_finite:
        return _absorbed(f, birth)
    return _forward_cause(f, trace)


def _parent(f: Facts, birth: Birth) -> Birth | None:
    return f.births[birth.parent] if birth.parent is not None and birth.parent < len(f.births) else None


def _born_in_inputs(f: Facts, trace: _Trace) -> Diagnosis | None:
    """The non-finite value came in with a parameter or a batch field."""
    birth = trace.birth
    if birth.phase != "input":
        return None
    source = birth.source or ""
    if source.startswith(("parameter ", "buffer ")):
        return make("weights_nonfinite", "state", confidence=0.9, evidence=trace.evidence,
                    tensor=source.split(" ", 1)[1], module=birth.module, reproducible=True)
    if source.startswith("batch field "):
        return make("input_nonfinite", "data", confidence=0.9, evidence=trace.evidence,
                    tensor=source.split(" ", 2)[2], module=birth.module, reproducible=True)
    if source == "constant" and not birth.intended:
        # Neither a parameter, a buffer nor a recorded batch field, yet non-finite before any op of the step
        # made it: data fed straight to a sub-module (a GAN's real images into its discriminator).
        trace.evidence.insert(1, "the tensor has no name nanguard could find: it did not pass through the "
                                 "watched model's forward as an argument")
        return make("input_nonfinite", "data", confidence=0.6, evidence=trace.evidence, module=birth.module,
                    reproducible=True)
    return None


def _born_in_masked_softmax(f: Facts, trace: _Trace) -> Diagnosis | None:
    birth, parent = trace.birth, trace.parent
    if not (trace.op in SOFTMAX_OPS or "scaled_dot_product" in trace.op):
        return None
    rows = birth.extra.get("rows_all_masked", 0)
    if not rows or not (parent is None or parent.intended or parent.phase == "input"):
        return None
    batch_rows = birth.extra.get("batch_rows_all_masked")
    in_rows = ""
    if isinstance(batch_rows, list) and batch_rows:
        in_rows = f", in batch row{'s' if len(batch_rows) > 1 else ''} {', '.join(str(r) for r in batch_rows)}"
    trace.evidence.insert(1, f"{count(rows, 'softmax row')} {'was' if rows == 1 else 'were'} fully masked "
                             f"(every score -inf){in_rows}")
    return make("masked_softmax_all_masked", birth.phase, confidence=0.95, evidence=trace.evidence, op=trace.op,
                module=birth.module, tensor=_empty_mask_field(f, batch_rows), reproducible=f.reproduced,
                fix={"rows": batch_rows})


def _born_in_batchnorm(f: Facts, trace: _Trace) -> Diagnosis | None:
    birth = trace.birth
    bn = batchnorm_evidence(birth)
    if bn is None:
        return None
    trace.evidence.insert(1, bn["line"])
    return make("batchnorm_degenerate", birth.phase, confidence=0.9, evidence=trace.evidence,
                op=birth.forward_op if birth.phase == "backward" else trace.op, module=birth.module,
                reproducible=f.reproduced, fix={"per_channel": bn["per_channel"]})


def _forward_cause(f: Facts, trace: _Trace) -> Diagnosis:
    """Born in forward or in the loss: an overflow (decided with the fp32 counterfactual) or a domain error."""
    birth, evidence, op = trace.birth, trace.evidence, trace.op
    low = birth.dtype in LOW_PRECISION
    rep = f.reproduced
    overflow_fix = {"dtype": birth.dtype, "dtype_max": fmt(DTYPE_MAX.get(birth.dtype or "", 0))}
    if low and f.fp32 is not None and f.fp32.finite:
        return make("forward_overflow", birth.phase, confidence=0.93, evidence=evidence, op=op, module=birth.module,
                    reproducible=rep, fix=overflow_fix)
    if is_domain(birth):
        return make("invalid_math_domain", birth.phase, confidence=0.92, evidence=evidence, op=op,
                    module=birth.module, reproducible=rep, fix={"domain_fix": domain_fix(birth)})
    if overflow_like(birth):
        if low and f.fp32 is not None and not f.fp32.finite:
            evidence.append("overflows in float32 too: the values themselves are too large")
        return make("forward_overflow", birth.phase, confidence=0.8 if low else 0.7, evidence=evidence, op=op,
                    module=birth.module, reproducible=rep, fix=overflow_fix)
    if trace.parent is not None and trace.parent.intended:
        evidence.append("a -inf mask value reached arithmetic (e.g. -inf * 0 or -inf + inf)")
    return make("invalid_math_domain", birth.phase, confidence=0.6, evidence=evidence, op=op, module=birth.module,
                reproducible=rep, fix={"domain_fix": domain_fix(birth)})


def _backward_cause(f: Facts, birth: Birth, evidence: list[str], fp32_finite: bool, low: bool) -> Diagnosis:
    fwd = birth.forward_op
    rep = f.reproduced
    evidence.insert(
        1,
        f"forward of {fwd or '?'} in {mod(birth.module)} was finite; its backward "
        f"({birth.backward_node}) made the {birth.kind}",
    )
    singular_fix = {"singular_fix": SINGULAR_FIXES.get(fwd or "", "add an eps or clamp the input.")}
    if low and fp32_finite:
        cause, confidence, fix = "backward_overflow", 0.9, None
    elif ((fwd in SINGULAR_BACKWARD_OPS) or has_zero_divisor(birth)) and not overflow_like(birth):
        cause, confidence, fix = "backward_singularity", 0.9, singular_fix
    elif overflow_like(birth):
        top = top_grad(f)
        if top:
            evidence.append(top)
        cause, confidence, fix = "gradient_explosion", 0.75, None
    else:
        cause, confidence, fix = "backward_singularity", 0.6, singular_fix
    variant = "scaled" if cause == "backward_overflow" and f.under_scaler else None
    return make(cause, "backward", confidence=confidence, evidence=evidence, op=fwd or birth.op, module=birth.module,
                reproducible=rep, fix=fix, variant=variant)


def _discarded_domain_birth(f: Facts, culprit: Birth) -> Birth | None:
    """A forward ``log(0) = -inf`` that a gather or index dropped before the loss, whose backward made the NaN.

    The first bad value is that forward inf (not a mask fill: nobody asked for it), so the place and the
    cause are the forward op's: ``invalid_math_domain``, fixed by log_softmax. A ``torch.where`` that
    discards the branch on purpose is the backward singularity it always was (its fix is a safe branch).
    """
    if f.replay is None or not f.replay.loss_finite:
        return None
    first = next((b for b in f.births if not b.intended and b.phase != "input"), None)
    if first is None or first.phase not in ("forward", "loss") or first.kind != "inf" or not is_domain(first):
        return None
    if culprit is not first and not (culprit.phase == "backward" and culprit.forward_op == first.op):
        return None
    index = first.extra.get("op_index")
    later = f.forward_ops[index + 1:] if isinstance(index, int) else f.forward_ops
    if any(name in ("aten::where", "aten::where.self", "aten::masked_fill") for name in later):
        return None
    return first


def _domain_in_forward(f: Facts, birth: Birth) -> Diagnosis:
    replay = f.replay
    assert replay is not None
    evidence = [birth_line(birth), f"the {birth.kind} never reached the loss (loss {fmt(replay.loss)}), but "
                f"{birth.op}'s backward turned it into NaN gradients", f"the replay: {outcome_line(replay)}"]
    return make("invalid_math_domain", birth.phase, confidence=0.9, evidence=evidence, op=birth.op,
                module=birth.module, reproducible=f.reproduced, fix={"domain_fix": domain_fix(birth)})


def rule_absorbed_forward_nan(f: Facts) -> Diagnosis | None:
    """Loss finite, gradients not, and a forward NaN/inf that never reached the loss (torch.where)."""
    replay = f.replay
    if replay is None or not replay.loss_finite or replay.grads_finite:
        return None
    if any(b.phase == "backward" and not b.intended for b in f.births):
        return None
    absorbed = next((b for b in f.births if b.phase in ("forward", "loss") and not b.intended), None)
    if absorbed is not None and _discarded_domain_birth(f, absorbed) is absorbed:
        return _domain_in_forward(f, absorbed)
    return _absorbed(f, absorbed) if absorbed is not None else None


def _absorbed(f: Facts, absorbed: Birth) -> Diagnosis:
    replay = f.replay
    assert replay is not None
    evidence = [
        birth_line(absorbed),
        f"loss {fmt(replay.loss)} is finite: the forward {absorbed.kind} was discarded (e.g. by torch.where), but "
        "its backward multiplies it into the gradient",
        f"the replay: {outcome_line(replay)}",
    ]
    return make(
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
