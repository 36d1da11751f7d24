"""Rules for finite trouble and for what is not a cause of its own: a gradient norm that overflows float32,
a transient fault, spikes and trends, and ``unknown`` (which says what was checked)."""

from __future__ import annotations

import math

from nanguard.events import Diagnosis
from nanguard.forensics.rules.facts import (
    DTYPE_MAX,
    Facts,
    fmt,
    make,
    mod,
    outcome_line,
    top_grad,
    top_grad_name,
)

# A vector norm above this squares past float32's largest value: its float32 computation returns inf.
FLOAT32_NORM_OVERFLOW = math.sqrt(DTYPE_MAX["float32"])


def rule_norm_overflow(f: Facts) -> Diagnosis | None:
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
    top = top_grad(f)
    if top:
        evidence.append(top)
    if f.loss is not None:
        evidence.append(f"loss {fmt(f.loss)}; replay loss {fmt(replay.loss)}")
    name = top_grad_name(f)
    return make(
        "gradient_explosion",
        "backward",
        confidence=0.85,
        evidence=evidence,
        tensor=name,
        module=name.rsplit(".", 1)[0] if name and "." in name else None,
        reproducible=True,
    )


def rule_nondeterministic(f: Facts) -> Diagnosis | None:
    if not f.trigger.startswith("nonfinite") or f.trigger == "nonfinite_input":
        return None
    runs = [r for r in (f.plain, f.traced) if r is not None]
    if not runs or any(not r.finite for r in runs):
        return None
    if all(r.loss is None and not r.grad_norms for r in runs):
        return None  # the replay produced no loss and no gradient: it re-ran nothing, so it proves nothing
    evidence = [
        f"the step was non-finite ({f.trigger}, loss {fmt(f.loss)}, grad norm {fmt(f.grad_norm)})",
        *[f"{r.label} replay from identical state, batch and RNG: {outcome_line(r)}" for r in runs],
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
    return make(
        "nondeterministic",
        "unknown",
        confidence=0.8 if f.state_is_pre_step else 0.5,
        evidence=evidence,
        reproducible=False,
        module=module,
    )



def rule_spikes(f: Facts) -> Diagnosis | None:
    """Finite trouble: a gradient spike, a loss spike, or a trend (the driver family)."""
    if f.trigger == "grad_spike" or (f.grad_spike and f.grad_spike["ratio"] > 10 and f.trigger != "loss_spike"):
        return _gradient_explosion(f)
    if f.trigger == "loss_spike":
        return _loss_spike(f)
    if f.trigger == "divergence":
        return _divergence(f)
    return None


def _gradient_explosion(f: Facts) -> Diagnosis:
    s = f.grad_spike or {}
    evidence = ([f"grad norm {fmt(f.grad_norm)} vs running mean {fmt(s.get('mean'))} "
                 f"({fmt(s.get('ratio'))}x, z={fmt(s.get('z'))})"] if s else [f"grad norm {fmt(f.grad_norm)}"])
    top = top_grad(f)
    if top:
        evidence.append(top)
    evidence.append("batch values finite and in their usual range" if f.batch_checked
                    else "the batch was not checked (none reached the model's recorded call)")
    name = top_grad_name(f)
    module = name.rsplit(".", 1)[0] if name and "." in name else None
    return make("gradient_explosion", "backward", confidence=0.8, evidence=evidence, tensor=name, module=module,
                reproducible=f.reproduced if f.replay is not None else None)


def _loss_spike(f: Facts) -> Diagnosis:
    s = f.loss_spike or {}
    evidence = ([f"loss {fmt(f.loss)} vs running mean {fmt(s.get('mean'))} ({fmt(s.get('ratio'))}x, "
                 f"z={fmt(s.get('z'))})"] if s else [f"loss {fmt(f.loss)}"])
    ran = f.replay is not None and f.replay.error is None
    data = ("batch finite, labels in range, no input scale jump" if f.batch_checked
            else "the batch was not checked (none reached the model's recorded call)")
    evidence.append(data + (", no non-finite op in the replay" if ran else "; no replay ran, so no operator was checked"))
    return make("loss_spike", "loss", confidence=0.7, evidence=evidence, reproducible=f.reproduced,
                fix={"ratio": fmt(s.get("ratio"))})


def _divergence(f: Facts) -> Diagnosis:
    t = f.trend or {}
    evidence = ([f"loss mean rose from {fmt(t.get('first'))} to {fmt(t.get('last'))} over "
                 f"{fmt(t.get('steps'))} steps ({fmt(t.get('ratio'))}x)"] if t else ["loss trending upward"])
    if f.lr is not None:
        evidence.append(f"lr {fmt(f.lr)}")
    return make("divergence", "optimizer", confidence=0.7, evidence=evidence,
                fix={"lr": fmt(f.lr), "ratio": fmt(t.get("ratio"))})


def rule_unknown(f: Facts) -> Diagnosis:
    evidence = [f"checked: {', '.join(f.checked) or 'nothing'}"]
    if f.exception is not None:
        evidence.append(f"the step raised {f.exception['text']}")
    for r in (f.plain, f.traced, f.fp32):
        if r is not None:
            evidence.append(f"{r.label} replay: {outcome_line(r)}")
    ctx = f.error_context
    if ctx:
        evidence.append(
            f"replay raised in {ctx.get('op')} ({ctx.get('phase')}, module {mod(ctx.get('module'))}, "
            f"stack {ctx.get('module_stack')})"
        )
    evidence += [f"failed: {x}" for x in f.failures[:4]]
    replayed = f.plain is not None or f.traced is not None
    if not replayed:
        evidence.append("no replay was run: no operator was traced")
    return make(
        "unknown",
        "unknown",
        confidence=0.1,
        evidence=evidence,
        reproducible=f.reproduced,
        module=ctx.get("module") if ctx else None,
        op=ctx.get("op") if ctx else None,
        variant=None if replayed else "no_replay",
    )




# The float32 replay this many times its running level (loss or gradient norm) is far off in any precision.
FAR_OFF = 10.0
# Low-precision causes whose fix is the dtype: they lead only when the float32 replay is sound.
PRECISION_CAUSES = frozenset({"forward_overflow", "backward_overflow"})


def driver_over_precision(f: Facts, found: Diagnosis) -> Diagnosis:
    """fp16/bf16 overflowed, but the float32 replay of the step is far off too: the driver leads.

    DESIGN.md, "Where it was born, and why": when the fp32 counterfactual is also far off its running
    level, precision is not the root (a learning rate 100x too high blows up any dtype; fp16 only gets
    there first). The driver (divergence, gradient_explosion, loss_spike) names the cause and leads the
    fixes; the overflow stays in ``contributing`` and the place (phase, module, op) stays the birth's.
    """
    if found.cause not in PRECISION_CAUSES or f.fp32 is None or f.fp32.error is not None:
        return found
    off = _fp32_far_off(f)
    if off is None:
        return found
    loss_far, grads_far, lines = off
    trend = f.trend or {}
    if loss_far and trend.get("ratio", 0.0) >= 2.0:
        cause, fix = "divergence", {"lr": fmt(f.lr), "ratio": fmt(trend["ratio"])}
        lines.append(f"the loss was already climbing: its mean rose from {fmt(trend['first'])} to "
                     f"{fmt(trend['last'])} over the last {fmt(trend['steps'])} steps ({fmt(trend['ratio'])}x)")
    elif grads_far:
        cause, fix = "gradient_explosion", None
    else:
        cause, fix = "loss_spike", {"ratio": fmt((f.fp32_loss_level or {}).get("ratio"))}
    if f.lr is not None:
        lines.append(f"lr {fmt(f.lr)}")
    grads = {k: v for k, v in f.fp32.grad_norms.items() if math.isfinite(v)}
    name = max(grads, key=grads.__getitem__) if grads else None
    driver = make(cause, found.phase, confidence=0.8, evidence=[*lines, *found.evidence[:3]], fix=fix,
                  tensor=name if cause == "gradient_explosion" else None, module=found.module, op=found.op,
                  reproducible=found.reproducible)
    item: dict[str, object] = {"cause": found.cause, "evidence": found.evidence[:3]}
    driver.contributing = [item, *found.contributing]
    driver.fixes += [fix for fix in found.fixes if fix not in driver.fixes]
    return driver


def _fp32_far_off(f: Facts) -> tuple[bool, bool, list[str]] | None:
    """(loss far off, gradients far off, the evidence) of the float32 replay, or None when it looks sound."""
    fp32 = f.fp32
    assert fp32 is not None
    loss_level, grad_level = f.fp32_loss_level, f.fp32_grad_level
    loss_far = bool(fp32.loss_finite and loss_level and loss_level["mean"] > 0 and loss_level["ratio"] >= FAR_OFF)
    norm = fp32.total_grad_norm
    overflowed = bool(fp32.grad_norms) and fp32.grads_finite and norm >= FLOAT32_NORM_OVERFLOW
    grads_far = overflowed or bool(fp32.grads_finite and grad_level and grad_level["mean"] > 0
                                   and grad_level["ratio"] >= FAR_OFF)
    if not (loss_far or grads_far):
        return None
    parts = []
    if loss_far and loss_level:
        parts.append(f"loss {fmt(fp32.loss)}, {fmt(loss_level['ratio'])}x its running level {fmt(loss_level['mean'])}")
    if overflowed:
        parts.append(f"grad norm {fmt(norm)}, past float32's range")
    elif grads_far and grad_level:
        parts.append(f"grad norm {fmt(norm)}, {fmt(grad_level['ratio'])}x its running level {fmt(grad_level['mean'])}")
    dtype = "/".join(f.low_precision) or "low-precision"
    line = (f"the float32 replay of this step is far off too ({'; '.join(parts)}): the {dtype} overflow is a "
            "symptom, not the root; the step runs away in any precision")
    return loss_far, grads_far, [line]
