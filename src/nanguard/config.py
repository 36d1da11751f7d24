"""Every knob of the guard in one validated dataclass, plus named presets.

Validation happens in ``__post_init__`` and names the dotted field, so a typo in a preset override or
a YAML file fails at construction with a message that says what would be accepted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from nanguard.errors import ConfigError

ACTIONS_ON_NONFINITE = ("skip", "rollback", "abort", "none")


def _check(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"GuardConfig.{name}={value!r} is invalid: expected {expected}")


@dataclass(kw_only=True)
class SpikeConfig:
    """Robust running statistics for loss and gradient-norm spikes.

    A value counts as a spike only when it is both ``z`` robust standard deviations above the running
    mean *and* ``ratio`` times the running mean: the z-score alone fires on the tiny variance of a
    plateau, the ratio alone on the large variance of noisy small-batch SGD.

    Above ``clip_z`` gradients are clipped (``adaptive_clip``), above ``skip_z`` the step is skipped, and a
    spike at or above ``alarm_z`` is also investigated with a replay (forensics budget permitting); a milder
    one gets the replay-free triage.

    Adaptive clipping (``adaptive_clip``) changes healthy steps, so it is off by default (the ``clip``
    preset turns it on); every clipped step is counted in history.csv, the summary and the report.

    The early-run rule covers the warm-up, when the statistics know too little to judge: after the first
    ``early_min_steps`` accepted steps, a loss ``early_loss_ratio`` times the largest of the first
    ``early_min_steps`` losses (only when those were all positive), or a gradient norm ``early_grad_ratio``
    times the largest of the first norms, is a spike. The default baseline is the very first step (an
    untrained model's loss): a learning rate that ruins the weights in the first update shows at step 1. A run that explodes from its first step is caught
    before the statistics can learn the explosion as normal.
    """

    enabled: bool = True
    warmup_steps: int = 25
    ema_alpha: float = 0.97
    clip_z: float = 2.5
    skip_z: float = 6.0
    alarm_z: float = 12.0
    loss_ratio: float = 2.0
    grad_ratio: float = 4.0
    peak_ratio: float = 3.0
    peak_decay: float = 0.995
    # The loss's peak forgets faster (half-life ~34 steps): a loss back at an untrained model's level after a
    # warm-up's fast drop is an event (a data switch), while gradient norms keep a long memory of their heavy tail.
    loss_peak_decay: float = 0.98
    adaptive_clip: bool = False
    early_min_steps: int = 1
    early_loss_ratio: float = 10.0
    early_grad_ratio: float = 30.0

    def validate(self, prefix: str) -> None:
        _check(self.warmup_steps >= 1, f"{prefix}.warmup_steps", self.warmup_steps, "an integer >= 1")
        _check(0.0 < self.ema_alpha < 1.0, f"{prefix}.ema_alpha", self.ema_alpha, "a float in (0, 1)")
        _check(
            0.0 < self.clip_z <= self.skip_z <= self.alarm_z,
            f"{prefix}.clip_z/skip_z/alarm_z",
            (self.clip_z, self.skip_z, self.alarm_z),
            "0 < clip_z <= skip_z <= alarm_z",
        )
        _check(self.loss_ratio > 1.0, f"{prefix}.loss_ratio", self.loss_ratio, "a float > 1")
        _check(self.grad_ratio > 1.0, f"{prefix}.grad_ratio", self.grad_ratio, "a float > 1")
        _check(self.peak_ratio >= 0.0, f"{prefix}.peak_ratio", self.peak_ratio, "a float >= 0 (0 = no peak test)")
        _check(self.early_min_steps >= 1, f"{prefix}.early_min_steps", self.early_min_steps, "an integer >= 1")
        _check(self.early_loss_ratio > 1.0, f"{prefix}.early_loss_ratio", self.early_loss_ratio, "a float > 1")
        _check(self.early_grad_ratio > 1.0, f"{prefix}.early_grad_ratio", self.early_grad_ratio, "a float > 1")
        _check(0.0 < self.peak_decay <= 1.0, f"{prefix}.peak_decay", self.peak_decay, "a float in (0, 1]")
        _check(0.0 < self.loss_peak_decay <= 1.0, f"{prefix}.loss_peak_decay", self.loss_peak_decay, "a float in (0, 1]")


@dataclass(kw_only=True)
class GuardConfig:
    """How the guard watches and what it does. Build one with :meth:`preset` or directly.

    The escalation ladder is: skip the bad update -> after ``rollback_after`` bad steps in a row (or at
    once when the state itself is non-finite) roll back to the newest good snapshot and back off the
    learning rate -> after ``abort_after`` bad steps in a row, or ``max_rollbacks`` rollbacks, stop with
    an emergency checkpoint.
    """

    on_nonfinite: str = "skip"
    clip_grad_norm: float | None = None
    check_weights_every: int = 50
    spikes: SpikeConfig = field(default_factory=SpikeConfig)
    divergence_window: int = 200
    divergence_ratio: float = 2.0
    snapshot_every: int = 50
    snapshot_keep: int = 2
    snapshot_device: str = "cpu"
    rollback_after: int = 3
    skip_after_rollback: int = 0
    advance_scheduler_on_skip: bool = False
    lr_backoff: float = 0.5
    lr_restore_steps: int = 200
    abort_after: int = 10
    max_rollbacks: int = 5
    sync_mode: str = "auto"
    forensics: bool = True
    forensics_max_events: int = 5
    scaler_overflow_patience: int = 20
    # The stall watch (training that runs on and no longer learns): every ``stall_every`` applied steps it
    # measures on the device how many weights the update left unchanged, and looks for parameters that get
    # no gradient; 0 turns it off (with it the learning-rate-0 watch).
    stall_every: int = 50
    # Replay a GradScaler skip at loss scale 1: an overflow is silent, a NaN that survives is an event.
    scaler_replay: bool = True
    history_every: int = 1
    tensorboard: bool = False
    # W&B / MLflow: None logs there only when the process already has an active run; True always; False never.
    wandb: bool | None = None
    mlflow: bool | None = None
    report: bool = True
    console: bool = True
    out_dir: str = "nanguard_out"

    def __post_init__(self) -> None:
        if isinstance(self.spikes, dict):
            self.spikes = SpikeConfig(**self.spikes)
        _check(
            self.on_nonfinite in ACTIONS_ON_NONFINITE, "on_nonfinite", self.on_nonfinite,
            f"one of {ACTIONS_ON_NONFINITE}",
        )
        _check(
            self.clip_grad_norm is None or (self.clip_grad_norm > 0 and math.isfinite(self.clip_grad_norm)),
            "clip_grad_norm", self.clip_grad_norm, "None or a finite float > 0",
        )
        _check(self.check_weights_every >= 0, "check_weights_every", self.check_weights_every, "an integer >= 0 (0 = never)")
        self.spikes.validate("spikes")
        _check(self.divergence_window >= 10, "divergence_window", self.divergence_window, "an integer >= 10")
        _check(self.divergence_ratio > 1.0, "divergence_ratio", self.divergence_ratio, "a float > 1")
        _check(self.snapshot_every >= 0, "snapshot_every", self.snapshot_every, "an integer >= 0 (0 = no snapshots)")
        _check(self.snapshot_keep >= 1, "snapshot_keep", self.snapshot_keep, "an integer >= 1")
        _check(self.snapshot_device in ("cpu", "same"), "snapshot_device", self.snapshot_device, "'cpu' or 'same'")
        _check(self.rollback_after >= 1, "rollback_after", self.rollback_after, "an integer >= 1")
        _check(self.skip_after_rollback >= 0, "skip_after_rollback", self.skip_after_rollback, "an integer >= 0")
        _check(0.0 < self.lr_backoff <= 1.0, "lr_backoff", self.lr_backoff, "a float in (0, 1]")
        _check(self.lr_restore_steps >= 0, "lr_restore_steps", self.lr_restore_steps, "an integer >= 0")
        _check(self.abort_after >= self.rollback_after, "abort_after", self.abort_after, f"an integer >= rollback_after ({self.rollback_after})")
        _check(self.max_rollbacks >= 0, "max_rollbacks", self.max_rollbacks, "an integer >= 0")
        _check(self.sync_mode in ("auto", "sync", "device"), "sync_mode", self.sync_mode, "'auto', 'sync' or 'device'")
        _check(self.forensics_max_events >= 0, "forensics_max_events", self.forensics_max_events, "an integer >= 0")
        _check(self.scaler_overflow_patience >= 1, "scaler_overflow_patience", self.scaler_overflow_patience, "an integer >= 1")
        _check(self.stall_every >= 0, "stall_every", self.stall_every, "an integer >= 0 (0 = no stall watch)")
        for name in ("wandb", "mlflow"):
            value = getattr(self, name)
            _check(value is None or isinstance(value, bool), name, value, "None (auto), True or False")
        _check(self.history_every >= 1, "history_every", self.history_every, "an integer >= 1")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GuardConfig:
        """``safe`` (default): every protection, and a healthy run stays bit for bit what it was. ``clip``:
        ``safe`` plus adaptive gradient clipping. ``fast``: fewest checks that still skip bad steps.
        ``forensic``: check weights every step, snapshot often, investigate every event."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
        values = dict(PRESETS[name])
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> GuardConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict[str, Any]] = {
    "safe": {},
    # "safe" plus adaptive clipping of gradient norms above clip_z deviations (changes healthy steps).
    "clip": {"spikes": {"adaptive_clip": True}},
    "fast": {"check_weights_every": 500, "snapshot_every": 500, "forensics_max_events": 1, "history_every": 10},
    "forensic": {"check_weights_every": 1, "snapshot_every": 20, "snapshot_keep": 3, "forensics_max_events": 50},
}


def resolve_config(config: GuardConfig | str | dict[str, Any] | None, **overrides: Any) -> GuardConfig:
    """Accept a config object, a preset name, a dict of fields, or None (the ``safe`` preset)."""
    if config is None:
        return GuardConfig.preset("safe", **overrides)
    if isinstance(config, str):
        return GuardConfig.preset(config, **overrides)
    if isinstance(config, dict):
        unknown = set(config) - {f.name for f in dataclasses.fields(GuardConfig)}
        if unknown:
            raise ConfigError(f"GuardConfig has no field(s) {sorted(unknown)}")
        return GuardConfig(**{**config, **overrides})
    if isinstance(config, GuardConfig):
        return config.replace(**overrides) if overrides else config
    raise ConfigError(f"config={config!r} must be a GuardConfig, a preset name or a dict")
