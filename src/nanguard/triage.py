"""A first diagnosis from the signals at hand, for when forensics is off, over budget, or fails.

Everything here runs on the event path only, so it may read tensors back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from nanguard.events import Diagnosis

EXTREME_SCALE_FACTOR = 100.0


def first_nonfinite_parameter(models: Sequence[torch.nn.Module]) -> tuple[str, torch.Tensor] | None:
    for model in models:
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return name, tensor
    return None


def first_nonfinite_optimizer_buffer(optimizer: torch.optim.Optimizer | None, names: Mapping[int, str]) -> tuple[str, str] | None:
    if optimizer is None:
        return None
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return names.get(id(param), "<unnamed parameter>"), key
    return None


def nonfinite_batch_fields(batch: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(field, nan count, inf count) for each floating batch tensor holding non-finite values."""
    found = []
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            nans = int(torch.isnan(value).sum())
            infs = int(torch.isinf(value).sum())
            if nans or infs:
                found.append((name, nans, infs))
    return found


def extreme_scale_fields(batch: Mapping[str, Any], history: Mapping[str, Sequence[float]]) -> list[tuple[str, float, float]]:
    """(field, this batch's abs-max, typical abs-max of earlier batches) where they differ by >= 100x."""
    found = []
    for name, value in batch.items():
        past = [v for v in history.get(name, ()) if math.isfinite(v)]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or len(past) < 3:
            continue
        current = float(value.detach().abs().max()) if value.numel() else 0.0
        typical = sorted(past)[len(past) // 2]
        if math.isfinite(current) and current > EXTREME_SCALE_FACTOR * max(typical, 1e-12):
            found.append((name, current, typical))
    return found


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
    param_names = {id(p): n for m in models for n, p in m.named_parameters()}
    if update_made_weights_nonfinite:
        bad = first_nonfinite_parameter(models)
        return Diagnosis(
            cause="update_overflow", phase="optimizer", tensor=bad[0] if bad else None, confidence=0.7,
            evidence=[f"gradients were finite (grad norm {grad_norm:.4g})" if grad_norm is not None else "gradients were finite",
                      f"after the optimizer step parameter {bad[0] if bad else '?'} is non-finite"],
            fixes=["raise Adam eps (1e-8 rounds to 0 in float16; use >= 1e-6) or keep fp32 master weights",
                   "lower the learning rate"],
        )
    bad_param = first_nonfinite_parameter(models)
    if bad_param is not None:
        name = bad_param[0]
        module = name.rsplit(".", 1)[0] if "." in name else ""
        return Diagnosis(
            cause="weights_nonfinite", phase="state", module=module, tensor=name, confidence=0.9,
            evidence=[f"parameter {name} holds {int((~torch.isfinite(bad_param[1])).sum())} non-finite values before the step"],
            fixes=["roll back to the last finite checkpoint", "find what wrote the value: an earlier update (lower the LR, clip) or code that edits weights"],
        )
    bad_state = first_nonfinite_optimizer_buffer(optimizer, param_names)
    if bad_state is not None:
        return Diagnosis(
            cause="optimizer_state_nonfinite", phase="state", tensor=f"{bad_state[0]}.{bad_state[1]}", confidence=0.85,
            evidence=[f"optimizer buffer {bad_state[1]!r} of {bad_state[0]} is non-finite"],
            fixes=["roll back or reset the optimizer state", "raise Adam eps; keep optimizer state in fp32"],
        )
    nonfinite_inputs = nonfinite_batch_fields(batch)
    if nonfinite_inputs:
        name, nans, infs = nonfinite_inputs[0]
        return Diagnosis(
            cause="input_nonfinite", phase="data", tensor=name, confidence=0.9,
            evidence=[f"batch field {name!r} holds {nans} NaN and {infs} Inf values"],
            fixes=[f"clean the data source of {name!r} (nanguard scan finds the rows)", "filter non-finite samples in the dataset's __getitem__"],
        )
    extreme = extreme_scale_fields(batch, batch_scale_history)
    if extreme and trigger in ("loss_spike", "grad_spike", "nonfinite_loss", "nonfinite_grad"):
        name, current, typical = extreme[0]
        return Diagnosis(
            cause="input_extreme_scale", phase="data", tensor=name, confidence=0.75,
            evidence=[f"batch field {name!r} reaches |x|={current:.4g}, {current / max(typical, 1e-12):.3g}x the typical {typical:.4g} of earlier batches"],
            fixes=[f"normalise {name!r} per source file (one file is likely in other units)", "run nanguard scan on the data folder: it reports scale_mismatch"],
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
        evidence=["checked: weights, optimizer state and batch are finite; no replay was available to trace operators"],
        fixes=["run with the 'forensic' preset, or pass a closure to guard.step() so the step can be replayed"],
    )
