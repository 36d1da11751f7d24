"""A first diagnosis from the signals at hand, for when forensics is off, over budget, or fails.

It uses the same checks as an investigation (:mod:`nanguard.forensics.checks`) and the same fixes (the
cause registry), without any replay. It runs on the event path only, so it may read tensors back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nanguard.distributed import materialize
from nanguard.events import Diagnosis
from nanguard.forensics import checks
from nanguard.forensics.rules.facts import fmt, make


@dataclass
class Signals:
    """What the guard knows about a bad step without replaying it."""

    trigger: str
    loss: float | None
    grad_norm: float | None
    batch: Mapping[str, Any] = field(default_factory=dict)
    batch_scale_history: Mapping[str, Sequence[float]] = field(default_factory=dict)
    spike_stats: Mapping[str, float] = field(default_factory=dict)
    update_made_weights_nonfinite: bool = False


def _named_state(models: Sequence[torch.nn.Module]) -> list[tuple[str, torch.Tensor]]:
    """Parameters and buffers as plain tensors. FSDP2 shards are gathered (a collective: under FSDP every rank
    runs the triage together, see :mod:`nanguard.forensics.desk`)."""
    return [(n, materialize(t.detach())) for m in models for n, t in [*m.named_parameters(), *m.named_buffers()]
            if t.is_floating_point()]


def quick_diagnosis(signals: Signals, models: Sequence[torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None) -> Diagnosis:
    """The cause the signals and the state checks support, with ``unknown`` saying what was checked."""
    bad_state = checks.state_nonfinite(_named_state(models), "parameter")
    if signals.update_made_weights_nonfinite:
        return _update_overflow(signals, bad_state)
    if bad_state:
        first = bad_state[0]
        return make("weights_nonfinite", "state", confidence=0.9, module=first["module"], tensor=first["name"],
                    evidence=[f"parameter {first['name']} holds {first['nan']} NaN and {first['inf']} Inf values "
                              "before the step"])
    names = {id(p): n for m in models for n, p in m.named_parameters()}
    bad_buffers = checks.optimizer_state_nonfinite(optimizer, names)
    if bad_buffers:
        first = bad_buffers[0]
        return make("optimizer_state_nonfinite", "state", confidence=0.85, module=first["module"], tensor=first["name"],
                    evidence=[f"optimizer buffer {first['key']!r} of {first['param']} holds {first['nan']} NaN and "
                              f"{first['inf']} Inf values"])
    return _from_batch(signals) or _from_trigger(signals)


def _update_overflow(signals: Signals, bad_state: list[dict[str, Any]]) -> Diagnosis:
    name = bad_state[0]["name"] if bad_state else None
    norm = signals.grad_norm
    return make("update_overflow", "optimizer", confidence=0.7, tensor=name,
                module=name.rsplit(".", 1)[0] if name and "." in name else None,
                evidence=[f"gradients were finite (grad norm {fmt(norm)})" if norm is not None else "gradients were finite",
                          f"after the optimizer step parameter {name or '?'} is non-finite"])


def _from_batch(signals: Signals) -> Diagnosis | None:
    nonfinite = checks.batch_nonfinite(dict(signals.batch))
    if nonfinite:
        first = nonfinite[0]
        return make("input_nonfinite", "data", confidence=0.9, tensor=first["field"], fix={"rows": first["rows"]},
                    evidence=[f"batch field {first['field']!r} holds {first['nan']} NaN and {first['inf']} Inf values "
                              f"(rows {first['rows']})"])
    history = {k: list(v) for k, v in signals.batch_scale_history.items()}
    extreme = checks.batch_scale(dict(signals.batch), history)
    if extreme and signals.trigger in ("loss_spike", "grad_spike", "nonfinite_loss", "nonfinite_grad"):
        first = extreme[0]
        return make("input_extreme_scale", "data", confidence=0.75, tensor=first["field"],
                    fix={"ratio": fmt(first["ratio"])},
                    evidence=[f"batch field {first['field']!r} reaches |x|={first['absmax']:.4g}, {first['ratio']:.3g}x the "
                              f"typical {first['history_median']:.4g} of earlier batches"])
    return None


def _from_trigger(signals: Signals) -> Diagnosis:
    stats = signals.spike_stats
    if signals.trigger == "loss_spike":
        ratio = (signals.loss or 0.0) / stats["loss_mean"] if stats.get("loss_mean") else None
        return make("loss_spike", "loss", confidence=0.5, fix={"ratio": fmt(ratio)},
                    evidence=[f"loss {fmt(signals.loss)} vs running mean {fmt(stats.get('loss_mean'))} "
                              f"(std {fmt(stats.get('loss_std'))})"])
    if signals.trigger == "grad_spike":
        return make("gradient_explosion", "backward", confidence=0.6,
                    evidence=[f"grad norm {fmt(signals.grad_norm)} vs running mean {fmt(stats.get('grad_mean'))} "
                              f"(std {fmt(stats.get('grad_std'))})"])
    if signals.trigger == "divergence":
        return make("divergence", "optimizer", confidence=0.6, evidence=["the loss has been trending upward over many steps"])
    phase = {"nonfinite_loss": "forward", "nonfinite_grad": "backward"}.get(signals.trigger, "unknown")
    checked = ("checked: weights, optimizer state and batch are finite" if signals.batch else
               "checked: weights and optimizer state are finite; the batch was not checked (none reached the "
               "model's forward call)")
    return make("unknown", phase, confidence=0.1, variant="no_replay",
                evidence=[f"{checked}; no replay was run to trace operators"])


__all__ = ["Signals", "quick_diagnosis"]
