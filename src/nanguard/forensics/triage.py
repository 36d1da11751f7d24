"""A first diagnosis from the signals at hand, for when forensics is off, over budget, or fails.

It uses the same checks as forensics (:mod:`nanguard.forensics.checks`), without any replay. Everything
here runs on the event path only, so it may read tensors back to the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from nanguard.distributed import materialize
from nanguard.events import Diagnosis
from nanguard.forensics import checks


def _named_state(models: Sequence[torch.nn.Module]) -> list[tuple[str, torch.Tensor]]:
    """Parameters and buffers as plain tensors. FSDP2 shards are gathered (a collective: under FSDP every rank
    runs the triage together, see ``Guard._diagnose``)."""
    return [(n, materialize(t.detach())) for m in models for n, t in [*m.named_parameters(), *m.named_buffers()]
            if t.is_floating_point()]


def quick_diagnosis(
    *,
    trigger: str,
    models: Sequence[torch.nn.Module],
    optimizer: torch.optim.Optimizer | None,
    batch: Mapping[str, Any],
    batch_scale_history: Mapping[str, Sequence[float]],
    loss: float | None,
    grad_norm: float | None,
    spike_stats: Mapping[str, float],
    update_made_weights_nonfinite: bool = False,
) -> Diagnosis:
    bad_state = checks.state_nonfinite(_named_state(models), "parameter")
    if update_made_weights_nonfinite:
        name = bad_state[0]["name"] if bad_state else None
        return Diagnosis(
            cause="update_overflow", phase="optimizer", tensor=name, confidence=0.7,
            evidence=[f"gradients were finite (grad norm {grad_norm:.4g})" if grad_norm is not None else "gradients were finite",
                      f"after the optimizer step parameter {name or '?'} is non-finite"],
            fixes=["raise Adam eps (1e-8 rounds to 0 in float16; use >= 1e-6) or keep fp32 master weights",
                   "lower the learning rate"],
        )
    if bad_state:
        first = bad_state[0]
        return Diagnosis(
            cause="weights_nonfinite", phase="state", module=first["module"], tensor=first["name"], confidence=0.9,
            evidence=[f"parameter {first['name']} holds {first['nan']} NaN and {first['inf']} Inf values before the step"],
            fixes=["roll back to the last finite checkpoint", "find what wrote the value: an earlier update (lower the LR, clip) or code that edits weights"],
        )
    names = {id(p): n for m in models for n, p in m.named_parameters()}
    bad_buffers = checks.optimizer_state_nonfinite(optimizer, names)
    if bad_buffers:
        first = bad_buffers[0]
        return Diagnosis(
            cause="optimizer_state_nonfinite", phase="state", module=first["module"], tensor=first["name"], confidence=0.85,
            evidence=[f"optimizer buffer {first['key']!r} of {first['param']} holds {first['nan']} NaN and {first['inf']} Inf values"],
            fixes=["roll back or reset the optimizer state", "raise Adam eps; keep optimizer state in fp32"],
        )
    nonfinite_inputs = checks.batch_nonfinite(dict(batch))
    if nonfinite_inputs:
        first = nonfinite_inputs[0]
        return Diagnosis(
            cause="input_nonfinite", phase="data", tensor=first["field"], confidence=0.9,
            evidence=[f"batch field {first['field']!r} holds {first['nan']} NaN and {first['inf']} Inf values (rows {first['rows']})"],
            fixes=[f"clean the data source of {first['field']!r} (nanguard scan finds the rows)", "filter non-finite samples in the dataset's __getitem__"],
        )
    extreme = checks.batch_scale(dict(batch), {k: list(v) for k, v in batch_scale_history.items()})
    if extreme and trigger in ("loss_spike", "grad_spike", "nonfinite_loss", "nonfinite_grad"):
        first = extreme[0]
        return Diagnosis(
            cause="input_extreme_scale", phase="data", tensor=first["field"], confidence=0.75,
            evidence=[f"batch field {first['field']!r} reaches |x|={first['absmax']:.4g}, {first['ratio']:.3g}x the typical "
                      f"{first['history_median']:.4g} of earlier batches"],
            fixes=[f"normalise {first['field']!r} per source file (one file is likely in other units)",
                   "run nanguard scan on the data folder: it reports scale_mismatch"],
        )
    if trigger == "loss_spike":
        return Diagnosis(
            cause="loss_spike", phase="loss", confidence=0.5,
            evidence=[f"loss {loss:.4g} vs running mean {spike_stats.get('loss_mean', float('nan')):.4g} (std {spike_stats.get('loss_std', float('nan')):.3g})"],
            fixes=["inspect the batch at this step", "lower the learning rate or add warm-up"],
        )
    if trigger == "grad_spike":
        return Diagnosis(
            cause="gradient_explosion", phase="backward", confidence=0.6,
            evidence=[f"grad norm {grad_norm:.4g} vs running mean {spike_stats.get('grad_mean', float('nan')):.4g} (std {spike_stats.get('grad_std', float('nan')):.3g})"],
            fixes=["clip gradients (max_grad_norm=1.0)", "lower the learning rate or lengthen warm-up"],
        )
    if trigger == "divergence":
        return Diagnosis(
            cause="divergence", phase="optimizer", confidence=0.6,
            evidence=["the loss has been trending upward over many steps"],
            fixes=["lower the learning rate (try 10x lower)", "add or lengthen warm-up"],
        )
    phase = {"nonfinite_loss": "forward", "nonfinite_grad": "backward"}.get(trigger, "unknown")
    return Diagnosis(
        cause="unknown", phase=phase, confidence=0.1,
        evidence=["checked: weights, optimizer state and batch are finite; no replay was run to trace operators"],
        fixes=["run with the 'forensic' preset, or pass a closure to guard.step() so the step can be replayed"],
    )
