"""Where people train: Hugging Face Trainer, Lightning, Accelerate (and torchrun DDP/FSDP through them).

Each integration lives in its own module and imports its framework only when that module is imported,
so ``import nanguard.integrations`` stays as light as ``import nanguard``:

* :mod:`nanguard.integrations.hf` — ``NanguardCallback``, ``guard_trainer(trainer)``  (extra ``hf``)
* :mod:`nanguard.integrations.lightning` — ``NanguardCallback`` (``lightning.pytorch``),
  ``PLNanguardCallback`` (``pytorch_lightning``), ``nanguard_callback(trainer_or_module)``  (extra ``lightning``)
* :mod:`nanguard.integrations.accelerate` — ``guard_accelerator(accelerator, model, optimizer)``  (extra ``accelerate``)

A plain torchrun DDP/FSDP loop needs no integration: ``nanguard.Guard(model, optimizer)`` all-gathers its
verdict so every rank skips or rolls back the same step (see :mod:`nanguard.distributed`, and
``docs/integrations.md`` for the event-path changes still pending in the Guard itself).
"""

__all__ = ["accelerate", "hf", "lightning"]
