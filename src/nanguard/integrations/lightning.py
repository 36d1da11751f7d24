"""Lightning: a ``Callback`` that guards every optimizer step of a ``Trainer``.

::

    from nanguard.integrations.lightning import NanguardCallback        # lightning.pytorch
    trainer = lightning.pytorch.Trainer(callbacks=[NanguardCallback()], ...)

    from nanguard.integrations.lightning import PLNanguardCallback      # pytorch_lightning
    trainer = pytorch_lightning.Trainer(callbacks=[PLNanguardCallback()], ...)

``lightning.pytorch`` and ``pytorch_lightning`` are separate class hierarchies (a callback of one is
refused by the other's Trainer), hence two classes; :func:`nanguard_callback` picks the one that fits a
given Trainer or LightningModule. Each is built on first use, so importing this module imports neither.

How it fits Lightning:

* ``on_fit_start`` runs after the strategy created the optimizers: a guard is put on each
  ``torch.optim.Optimizer`` (the one inside the ``LightningOptimizer``), with the ``LightningModule`` as
  its model, so module names are the user's;
* Lightning steps with ``optimizer.step(closure=...)``; the guard runs the closure exactly once
  (forward, backward, ``on_before_optimizer_step`` with unscaled gradients, gradient clipping), then
  checks the gradients and calls or skips the real update. In a single process the guard keeps the
  closure to replay a bad step; under DDP, or with manual optimization, the closure runs before the
  guard sees the step (a closure can hold collectives, or do nothing at all), and the replay uses the
  recorded ``LightningModule.forward`` call instead;
* step-interval LR schedulers are held on skipped steps; epoch-interval ones are left alone;
* a raise in ``training_step`` reaches ``on_exception``: the first guard writes the ``exception`` event;
* records go to ``<default_root_dir>/nanguard`` unless ``out_dir`` is given; only rank 0 writes;
* the guards' state (statistics, counters, LR multiplier, step count) is part of the callback's
  ``state_dict``, so Lightning saves it in every checkpoint and ``trainer.fit(ckpt_path=...)`` brings it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nanguard import distributed as dist_utils
from nanguard._optional import require
from nanguard.errors import UsageError
from nanguard.integrations._guard import IntegrationGuard, inner_optimizer, run_closure_outside


class _GuardCallbackLogic:
    """The callback's behaviour, shared by the ``lightning.pytorch`` and ``pytorch_lightning`` classes."""

    def __init__(self, *, out_dir: str | Path | None = None, **guard_kwargs: Any) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.guard_kwargs = guard_kwargs
        self.guards: list[IntegrationGuard] = []
        self._restored: list[dict[str, Any]] | None = None
        self._final: list[dict[str, Any]] = []  # the guards' states when fit ended (a checkpoint saved after fit)

    @property
    def guard(self) -> IntegrationGuard | None:
        """The guard of the (first) optimizer while fitting."""
        return self.guards[0] if self.guards else None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.close()
        optimizers = [inner_optimizer(o) for o in trainer.optimizers]
        if not optimizers:
            return
        base = Path(self.out_dir) if self.out_dir is not None else Path(trainer.default_root_dir) / "nanguard"
        wrapper = getattr(trainer.strategy, "model", None)
        wrappers = [wrapper] if wrapper is not None and wrapper is not pl_module else []
        closure_outside = dist_utils.is_distributed() or not getattr(pl_module, "automatic_optimization", True)
        for index, optimizer in enumerate(optimizers):
            out_dir = base if len(optimizers) == 1 else base / f"optimizer{index}"
            guard = IntegrationGuard(pl_module, optimizer, out_dir=out_dir, replay_wrappers=wrappers, **self.guard_kwargs)
            for config in getattr(trainer, "lr_scheduler_configs", []):
                if getattr(config.scheduler, "optimizer", None) is optimizer and config.interval == "step":
                    guard.attach_scheduler(config.scheduler)
            if closure_outside:
                run_closure_outside(guard)
            self.guards.append(guard)
        self._apply_restored()

    def state_dict(self) -> dict[str, Any]:
        """Saved by Lightning in every checkpoint: each guard's :meth:`~nanguard.Guard.state_dict`."""
        return {"guards": [guard.state_dict() for guard in self.guards] if self.guards else list(self._final)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called by Lightning on resume, before or after ``on_fit_start`` depending on the strategy."""
        self._restored = list(state_dict.get("guards", []))
        if self.guards:
            self._apply_restored()

    def _apply_restored(self) -> None:
        if self._restored is None or not self.guards:
            return
        for guard, state in zip(self.guards, self._restored, strict=False):
            guard.load_state_dict(state)
        self._restored = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Lightning has restored ``global_step`` by now: a single guard without saved state counts from it."""
        if len(self.guards) == 1:
            self.guards[0].align_step(int(getattr(trainer, "global_step", 0) or 0))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """``training_step`` (or the data) raised: the first guard writes the ``exception`` event, then all close."""
        if self.guards:
            self.guards[0].record_crash(exception)
        self.close(status="error")

    def close(self, status: str = "finished") -> None:
        guards, self.guards = self.guards, []
        if guards:
            self._final = [guard.state_dict() for guard in guards]
        for guard in guards:
            guard.close(status=status)


_CLASSES: dict[str, type] = {}
_PACKAGES = {"NanguardCallback": "lightning.pytorch", "PLNanguardCallback": "pytorch_lightning"}


def _callback_class(name: str) -> type:
    if name not in _CLASSES:
        package = require(_PACKAGES[name], extra="lightning", feature=f"nanguard.integrations.lightning.{name}",
                          package="lightning" if name == "NanguardCallback" else "pytorch-lightning")
        doc = f"Guards every optimizer step of a ``{_PACKAGES[name]}.Trainer`` (see :mod:`nanguard.integrations.lightning`)."
        _CLASSES[name] = type(name, (_GuardCallbackLogic, package.Callback), {"__doc__": doc, "__module__": __name__})
    return _CLASSES[name]


def __getattr__(name: str) -> Any:
    if name in _PACKAGES:
        return _callback_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def nanguard_callback(trainer_or_module: Any = None, **kwargs: Any) -> Any:
    """A guard callback of the right Lightning flavour for ``trainer_or_module`` (default: ``lightning.pytorch``).

    ``kwargs`` go to the callback: ``out_dir=`` and anything :class:`~nanguard.Guard` accepts.
    """
    if trainer_or_module is None:
        return _callback_class("NanguardCallback")(**kwargs)
    for klass in type(trainer_or_module).__mro__:
        root = klass.__module__.split(".")[0]
        if root == "pytorch_lightning":
            return _callback_class("PLNanguardCallback")(**kwargs)
        if root == "lightning":
            return _callback_class("NanguardCallback")(**kwargs)
    raise UsageError(f"nanguard_callback needs a Lightning Trainer or LightningModule, got {type(trainer_or_module).__name__}")
