"""Build an InvestigationRequest the way the guard would: run the bad step once, then hand it over."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from nanguard.forensics import InvestigationRequest, RngState, StepCapture


def bad_step(
    models: torch.nn.Module | Sequence[torch.nn.Module],
    optimizer: torch.optim.Optimizer | None,
    closure: Callable[[], torch.Tensor],
    batch: dict[str, Any],
    *,
    trigger: str | None = None,
    **fields: Any,
) -> InvestigationRequest:
    """Run ``closure`` as the training step did (keeping its gradients), and describe it as the guard would."""
    model_list = [models] if isinstance(models, torch.nn.Module) else list(models)
    rng = RngState.capture()
    loss: float | None = None
    exception: BaseException | None = None
    try:
        loss = float(closure().detach().float())
    except Exception as exc:
        exception = exc
    grads = [p.grad for m in model_list for p in m.parameters() if p.grad is not None]
    grad_norm = (
        float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))) if grads else None
    )
    if trigger is None:
        if loss is not None and not math.isfinite(loss):
            trigger = "nonfinite_loss"
        elif grad_norm is not None and not math.isfinite(grad_norm):
            trigger = "nonfinite_grad"
        else:
            trigger = "nonfinite_loss"
    return InvestigationRequest(
        step=fields.pop("step", 0),
        trigger=trigger,
        models=model_list,
        optimizer=optimizer,
        capture=StepCapture(rerun=closure, batch=batch, rng_state=rng),
        loss=loss,
        grad_norm=grad_norm,
        exception=exception,
        **fields,
    )


def closure_for(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    loss_fn: Callable[[], torch.Tensor],
) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss

    return closure
