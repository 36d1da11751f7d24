"""Rules of the state family: the weights or the optimizer state were bad before the step, or the update
itself made them non-finite."""

from __future__ import annotations

from nanguard.events import Diagnosis
from nanguard.forensics.rules.facts import Facts, fmt, make, outcome_line


def rule_update_flag(f: Facts) -> Diagnosis | None:
    if not f.update_made_weights_nonfinite:
        return None
    replay = f.replay
    if f.entry_grads or (replay is not None and not replay.grads_finite):
        return None  # non-finite gradients explain non-finite weights better than the update does
    poisoned = [o for o in f.optimizer_state if o["nan"]]
    if poisoned:
        # Moment updates from finite gradients (m = b1*m + (1-b1)*g, v = b2*v + (1-b2)*g*g) can overflow
        # to inf but never make a NaN: a NaN in the buffers was there before this update.
        diagnosis = rule_optimizer_state(f)
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
    return make(
        "update_overflow",
        "optimizer",
        confidence=0.9 if became or f.update_made_weights_nonfinite else 0.6,
        evidence=evidence,
        tensor=tensor,
        module=module,
        reproducible=True,
        fix={"dtype": dtype},
    )


def rule_weights(f: Facts) -> Diagnosis | None:
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
    return make(
        "weights_nonfinite",
        "state",
        confidence=0.95 if f.state_is_pre_step else 0.6,
        evidence=evidence,
        tensor=first["name"],
        module=first["module"],
        reproducible=True,
    )


def rule_optimizer_state(f: Facts) -> Diagnosis | None:
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
    return make(
        "optimizer_state_nonfinite",
        "state",
        confidence=0.93,
        evidence=evidence,
        tensor=first["name"],
        module=first["module"],
        reproducible=True,
    )



def rule_update_sim(f: Facts) -> Diagnosis | None:
    became = (f.update_sim or {}).get("became_nonfinite")
    replay = f.replay
    if not became or replay is None or not replay.finite:
        return None
    return _update_overflow(
        f,
        f"gradients and loss finite ({outcome_line(replay)}), "
        "yet one optimizer step makes weights non-finite",
    )


