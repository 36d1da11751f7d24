"""Forensics: replay the bad step under instruments and name where the bad value was born.

The guard calls :func:`investigate` with an :class:`~nanguard.forensics.request.InvestigationRequest`
once a step has gone wrong. It checks the batch and the training state, replays the step (plain, then
under the operator tracer, then in float32 when low precision is involved), and turns the evidence into
one :class:`~nanguard.events.Diagnosis`. It never raises, and it leaves parameters, buffers, gradients,
optimizer and GradScaler state and RNG states exactly as it found them.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from nanguard.events import Diagnosis
from nanguard.forensics import checks
from nanguard.forensics import replay as replaying
from nanguard.forensics.replay import LOW_PRECISION, ReplayOutcome, float32_mode, low_precision_tensors
from nanguard.forensics.request import InvestigationRequest, StepCapture
from nanguard.forensics.rules import Facts, diagnose
from nanguard.forensics.scale import at_unit_scale, scale_tensor
from nanguard.forensics.trace import OpTracer
from nanguard.state import SavedState, Subjects


@dataclass
class Investigation:
    """The verdict and the evidence behind it (``details`` is JSON-serialisable)."""

    diagnosis: Diagnosis
    details: dict[str, Any] = field(default_factory=dict)


def investigate(request: InvestigationRequest) -> Investigation:
    """Diagnose one bad step. Never raises; restores every piece of state it may have disturbed."""
    start = time.perf_counter()
    facts = Facts(under_scaler=scale_tensor(request.scaler) is not None)
    details: dict[str, Any] = {}
    state: SavedState | None = None
    try:
        batch = dict(request.capture.batch) if request.capture is not None else {}
        subjects = Subjects(request.optimizer, list(request.models), scaler=request.scaler)
        state = SavedState.capture(subjects, scoped=True, tensors=batch.values())
        _gather(request, batch, state, facts, details)
    except Exception as exc:
        facts.failures.append(f"investigation: {type(exc).__name__}: {exc}"[:300])
        details["traceback"] = traceback.format_exc(limit=6)[-2000:]
    finally:
        if state is not None:
            try:
                state.restore()
            except Exception as exc:
                facts.failures.append(f"restore: {type(exc).__name__}: {exc}"[:300])
    try:
        diagnosis = diagnose(facts)
    except Exception as exc:
        diagnosis = Diagnosis(
            cause="unknown",
            phase="unknown",
            evidence=[f"diagnosis failed: {type(exc).__name__}: {exc}"[:300], *facts.failures[:3]],
        )
    _place_modules(details.get("module_stats") or [], facts, diagnosis)
    capture = request.capture
    if capture is not None and capture.eager and facts.replay is not None:
        diagnosis.evidence.append("the model is torch.compile'd: the replay ran its original module (`_orig_mod`) "
                                  "eagerly, so the operators above are the eager ones")
        details["replay_mode"] = "eager"
    details["checks"] = _check_table(facts)
    details["failures"] = facts.failures
    details["seconds"] = round(time.perf_counter() - start, 4)
    return Investigation(diagnosis=diagnosis, details=_jsonable(details))


def _gather(
    request: InvestigationRequest,
    batch: dict[str, Any],
    state: SavedState,
    facts: Facts,
    details: dict[str, Any],
) -> None:
    models = list(request.models)
    params = state.subjects.named_parameters()
    names = {id(p): name for name, p in params}
    facts.trigger = request.trigger
    facts.loss, facts.grad_norm, facts.lr = request.loss, request.grad_norm, request.lr
    facts.state_is_pre_step = request.state_is_pre_step
    facts.update_made_weights_nonfinite = request.update_made_weights_nonfinite
    facts.exception = checks.parse_exception(request.exception)

    # Data.
    facts.batch_nonfinite = checks.batch_nonfinite(batch)
    facts.mask_fields = {
        name: value for name, value in batch.items()
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and (
            value.dtype == torch.bool or (not value.is_floating_point() and not value.is_complex()
                                          and value.numel() and bool(((value == 0) | (value == 1)).all())))
    }
    facts.extreme_scale = checks.batch_scale(batch, request.batch_scale_history)
    details["batch_absmax"] = checks.batch_absmax(batch)
    facts.batch_checked = any(isinstance(v, torch.Tensor) for v in batch.values())
    if facts.batch_checked:
        facts.checked += ["batch finite", "batch scale"]
    # State.
    facts.weights = checks.state_nonfinite(params, "parameter") + checks.state_nonfinite(
        state.subjects.named_buffers(), "buffer"
    )
    facts.optimizer_state = checks.optimizer_state_nonfinite(request.optimizer, names)
    facts.entry_grads = checks.grads_nonfinite(state.grad_pairs(), names)
    facts.eps_underflow = checks.eps_underflow(request.optimizer)
    facts.batchnorm_training = checks.batchnorm_training_modules(models)
    facts.checked += ["weights/buffers finite", "optimizer state finite"]
    # Spikes and trends.
    facts.loss_spike = checks.spike_evidence(request.loss, request.loss_history, request.spike_stats, "loss")
    facts.grad_spike = checks.spike_evidence(
        request.grad_norm, request.grad_norm_history, request.spike_stats, "grad_norm"
    )
    facts.trend = checks.loss_trend(request.loss_history)

    capture = request.capture
    can_replay = capture is not None and callable(capture.rerun)
    if facts.exception is not None and facts.exception["kind"] == "device_assert":
        can_replay = False
        facts.failures.append("no replay: a device-side assert leaves the CUDA context unusable")
    if can_replay:
        assert capture is not None
        _replays(_Replay(request, capture, batch, state, names), facts, details)
    _label_findings(request, batch, facts)


@dataclass
class _Replay:
    """What every replay of one investigation shares."""

    request: InvestigationRequest
    capture: StepCapture
    batch: dict[str, Any]
    state: SavedState
    names: dict[int, str]

    def run(self, label: str, instruments: Any = None) -> ReplayOutcome:
        # Under a GradScaler, replay at loss scale 1: the gradients as they are, not 65,536 times larger.
        instruments = at_unit_scale(self.request.scaler, instruments)
        return replaying.replay(self.capture, self.state, self.names, label=label, instruments=instruments)


def _replays(replay: _Replay, facts: Facts, details: dict[str, Any]) -> None:
    """Plain replay (and a simulated update), traced replay, and a float32 counterfactual when it can decide."""
    request, capture, batch, names = replay.request, replay.capture, replay.batch, replay.names
    runs: list[ReplayOutcome] = []
    if request.exception is None:
        facts.plain = replay.run("plain")
        if _ran_nothing(facts.plain) and capture.recorded is not None:
            # The closure handed to optimizer.step() re-ran no forward or backward: replay the recorded calls.
            facts.failures.append("replay: the closure given to optimizer.step() re-ran nothing (no loss, no "
                                  "gradient); the recorded calls were replayed instead")
            capture = replay.capture = capture.recorded
            facts.plain = replay.run("plain")
        runs.append(facts.plain)
        facts.checked.append("plain replay")
        if facts.plain.error is None and facts.plain.grads_finite and _wants_update_sim(request, facts):
            try:
                facts.update_sim = checks.simulate_update(request.optimizer, names)
                facts.checked.append("simulated optimizer step")
            except Exception as exc:
                facts.failures.append(f"update simulation: {type(exc).__name__}: {exc}"[:300])
    runs.append(_traced(replay, facts, details))
    models = list(request.models)
    low = bool(facts.low_precision) or bool(low_precision_tensors(models, batch)) or capture.autocast_dtype in LOW_PRECISION
    if low and any(not r.finite for r in runs):
        tensors = low_precision_tensors(models, batch)
        facts.fp32 = replay.run("float32", lambda: float32_mode(tensors))
        runs.append(facts.fp32)
        facts.checked.append("float32 counterfactual")
        if facts.fp32.error is None:
            facts.fp32_loss_level = checks.spike_evidence(facts.fp32.loss, request.loss_history,
                                                          request.spike_stats, "loss")
            facts.fp32_grad_level = checks.spike_evidence(facts.fp32.total_grad_norm if facts.fp32.grad_norms
                                                          else None, request.grad_norm_history,
                                                          request.spike_stats, "grad_norm")
    if runs and all(_ran_nothing(r) for r in runs):
        facts.failures.append("replay: the recorded step gave no loss and no gradient, so it reproduced nothing "
                              "(the step's backward was not recorded)")
    details["replays"] = [r.to_dict() for r in runs]
    for r in runs:
        r.loss_tensor = None
        r.exception = None


def _ran_nothing(run: ReplayOutcome) -> bool:
    return run.error is None and run.loss is None and not run.grad_norms


def _traced(replay: _Replay, facts: Facts, details: dict[str, Any]) -> ReplayOutcome:
    """The replay under the operator tracer: where the first bad value was born, and the op records."""
    tracer = OpTracer(list(replay.request.models), replay.batch, replay.request.optimizer)
    traced = facts.traced = replay.run("traced", lambda: tracer)
    facts.checked.append("operator trace")
    facts.births = list(tracer.births)
    facts.loss_ops = tracer.loss_ops
    facts.forward_ops = [name for name, _ in tracer.forward_ops]
    facts.batchnorm_ops = tracer.batchnorm_ops
    facts.error_context = tracer.error_context
    facts.low_precision = sorted(tracer.low_precision)
    facts.loss_origin = tracer.origin_of(traced.loss_tensor) if not traced.loss_finite else None
    if facts.loss_origin is None and traced.loss is not None and not traced.loss_finite:
        facts.loss_origin = tracer.last_origin("loss") or tracer.last_origin("forward")
    if not traced.grads_finite:
        bad = [p for p in replay.state.params if replay.names.get(id(p)) in traced.grad_nonfinite]
        origins = [tracer.origin_of(p.grad) for p in bad]
        facts.grad_origin = next((o for o in origins if o is not None), None) or tracer.last_origin("backward")
    traced.loss_tensor = None  # drop the graph
    details.update(module_stats=[s.to_dict() for s in tracer.module_stats.values()],
                   births=[b.to_dict() for b in facts.births], loss_ops=facts.loss_ops,
                   embedding_ops=tracer.embedding_ops, batchnorm_ops=tracer.batchnorm_ops, ops_traced=tracer.op_count)
    if tracer.error_context:
        details["error_context"] = tracer.error_context
    if tracer.record_errors:
        facts.failures += tracer.record_errors[:4]
    facts.tokens = [dict(e, module=e["module"]) for e in tracer.embedding_ops if e["out_of_range"]]
    return traced


def _wants_update_sim(request: InvestigationRequest, facts: Facts) -> bool:
    return request.optimizer is not None and (
        request.update_made_weights_nonfinite
        or request.trigger == "nonfinite_weights"
        or bool(facts.eps_underflow)
    )


def _label_findings(request: InvestigationRequest, batch: dict[str, Any], facts: Facts) -> None:
    """Class targets out of range, from the traced loss ops or, failing that, from the exception."""
    for op in facts.loss_ops:
        if op.get("out_of_range"):
            classes = op["num_classes"]
            field_name = op.get("field") or _field_holding(batch, op.get("out_of_range_values") or [])
            valid = f"[0, {classes})" if classes is not None else "the class range"
            where = _positions_in(batch, field_name, op["out_of_range_values"] or [])
            facts.labels.append(
                {
                    "field": field_name,
                    "op": op["op"],
                    "module": op.get("module"),
                    "num_classes": classes,
                    "needed": max(op["out_of_range_values"] or [classes]) + 1,
                    "evidence": f"{op['op']}: {op['out_of_range']} target(s) outside {valid} "
                    f"(values {op['out_of_range_values']}, ignore_index {op['ignore_index']}) in "
                    f"`{field_name or 'the target'}`, rows {op['out_of_range_rows']}{where}",
                }
            )
    exc = facts.exception
    if exc is None or facts.labels:
        return
    if exc["kind"] in ("target_out_of_bounds", "class_out_of_range"):
        value = exc.get("value")
        fields = checks.fields_containing(batch, value) if value is not None else []
        # The value can also sit in other fields (token ids): a field named like a target comes first.
        fields.sort(key=lambda name: not any(w in name.lower() for w in ("label", "target")))
        facts.labels.append(
            {
                "field": fields[0] if fields else None,
                "op": "aten::nll_loss_forward" if exc["kind"] == "target_out_of_bounds" else "aten::one_hot",
                "module": None,
                "num_classes": None,
                "needed": value + 1 if value is not None else None,
                "evidence": f"target {value} is out of bounds"
                + (f"; batch field `{fields[0]}` holds it" if fields else "")
                + (_positions_in(batch, fields[0], [value]) if fields and value is not None else ""),
            }
        )
    elif exc["kind"] == "index_out_of_range" and not facts.tokens:
        found = checks.token_problems_static(request.models, batch)
        value = exc.get("value")
        if value is not None:  # the exception names the bad id: fields that hold it come first
            holding = set(checks.fields_containing(batch, value))
            found.sort(key=lambda t: t["field"] not in holding)
        facts.tokens = [dict(t, op="aten::embedding") for t in found]


def _place_modules(stats: list[dict[str, Any]], facts: Facts, diagnosis: Diagnosis) -> None:
    """Each module's ``role`` relative to the birth: ``birth``, ``upstream`` (ran before it and stayed
    clean), ``downstream`` (saw the bad value because it flowed there) or ``clean``."""
    birth = next((b for b in facts.births if b.module == diagnosis.module and b.phase != "input"), None)
    born_at = birth.extra.get("op_index") if birth is not None else None
    for stat in stats:
        first_op = stat.pop("first_op", -1)
        if diagnosis.module is not None and stat["module"] == diagnosis.module and birth is not None:
            stat["role"] = "birth"
        elif stat["forward_nonfinite"] or stat["backward_nonfinite"]:
            stat["role"] = "downstream"
        elif isinstance(born_at, int) and 0 <= first_op < born_at:
            stat["role"] = "upstream"
        else:
            stat["role"] = "clean"


def _positions_in(batch: dict[str, Any], field_name: str | None, values: list[int]) -> str:
    """" at [row, position] [3, 17]" where a batch field holds the bad values (empty for a 1-d field: rows say it)."""
    t = batch.get(field_name) if field_name else None
    if not isinstance(t, torch.Tensor) or t.dim() < 2:
        return ""
    positions = checks.positions_of(t, [int(v) for v in values])
    return f" at [row, position] {', '.join(str(p) for p in positions)}" if positions else ""


def _field_holding(batch: dict[str, Any], values: list[int]) -> str | None:
    """The batch field (by the user's name for it, ``labels``) that holds the out-of-range target values.

    A loss op's own argument name (``target``) is not what the user calls it; a field named like a label
    comes first when token ids hold the same value.
    """
    for value in values[:1]:
        fields = checks.fields_containing(batch, int(value))
        fields.sort(key=lambda name: not any(w in name.lower() for w in ("label", "target")))
        if fields:
            return fields[0]
    return None


def _check_table(facts: Facts) -> list[dict[str, Any]]:
    replay_ = facts.replay
    rows = [
        ("batch finite", not facts.batch_nonfinite, facts.batch_nonfinite),
        ("batch scale in range", not facts.extreme_scale, facts.extreme_scale),
        ("class targets in range", not facts.labels, [{k: v for k, v in x.items()} for x in facts.labels]),
        ("token ids in range", not facts.tokens, facts.tokens),
        ("weights and buffers finite", not facts.weights, facts.weights),
        ("optimizer state finite", not facts.optimizer_state, facts.optimizer_state),
        ("step's gradients finite", not facts.entry_grads, facts.entry_grads),
        ("optimizer eps representable", not facts.eps_underflow, facts.eps_underflow),
    ]
    out = [{"name": n, "ok": ok, "found": found} for n, ok, found in rows]
    if not facts.batch_checked:  # nothing reached the model's recorded call: say so rather than "ok"
        for row in out[:4]:
            row.update(ok=None, found="not checked: no batch was recorded for this step")
    if facts.update_sim is not None:
        became = facts.update_sim.get("became_nonfinite", [])
        out.append({"name": "simulated update finite", "ok": not became, "found": became})
    for r in (facts.plain, facts.traced, facts.fp32):
        if r is not None:
            out.append({"name": f"{r.label} replay finite", "ok": r.finite, "found": r.to_dict()})
    if replay_ is not None and facts.fp32 is not None:
        out.append({"name": "finite in float32", "ok": facts.fp32.finite, "found": None})
    return out


def _jsonable(value: Any) -> Any:
    """Make ``details`` strictly JSON-serialisable: non-finite floats as their repr, tensors summarised."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, torch.Tensor):
        return f"tensor(shape={list(value.shape)}, dtype={value.dtype})"
    return str(value)
