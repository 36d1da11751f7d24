"""Robust running statistics for spike detection, kept on the device.

An exponential moving mean and variance (alpha=0.97 by default, as ZClip uses) that

* warms up as a cumulative average, so the first steps of a run are not judged against nothing;
* is updated only by accepted steps, and with values clipped to ``mean + clip_z * std`` so a spike that
  got through cannot inflate the scale it is judged against;
* answers with a z-score, a ratio to the mean *and* a ratio to a slowly decaying peak of accepted values:
  all three must be exceeded to call a spike. The z-score alone fires on the tiny variance of a plateau,
  the mean ratio on the heavy tail of small-batch gradient norms; the peak (Megatron-style "far above
  anything seen lately") is what keeps a noisy small-batch run or a warm-up's fast loss drop quiet.
"""

from __future__ import annotations

import torch


class RunningStats:
    def __init__(
        self, *, alpha: float, warmup: int, clip_z: float, peak_ratio: float = 3.0, peak_decay: float = 0.995,
        device: torch.device | str = "cpu",
    ) -> None:
        self.alpha = alpha
        self.warmup = warmup
        self.clip_z = clip_z
        self.peak_ratio = peak_ratio
        self.peak_decay = peak_decay
        self.mean = torch.zeros((), dtype=torch.float32, device=device)
        self.var = torch.zeros((), dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.float32, device=device)
        self.peak = torch.zeros((), dtype=torch.float32, device=device)

    def to(self, device: torch.device) -> RunningStats:
        if self.mean.device != device:
            self.mean, self.var, self.count, self.peak = (t.to(device) for t in (self.mean, self.var, self.count, self.peak))
        return self

    def std(self) -> torch.Tensor:
        # A floor relative to the mean keeps a perfectly flat series from turning 1e-7 noise into z=100.
        return torch.sqrt(self.var) + 1e-3 * self.mean.abs() + 1e-12

    def warm(self) -> torch.Tensor:
        return self.count >= self.warmup

    def zscore(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std()

    def excess_ratio(self, x: torch.Tensor) -> torch.Tensor:
        """How far above the mean ``x`` is, in units of |mean| (1.0 means twice a positive mean)."""
        return (x.float() - self.mean) / (self.mean.abs() + 1e-12)

    def is_spike(self, x: torch.Tensor, z: float, ratio: float) -> torch.Tensor:
        x = x.float()
        above_peak = x > self.peak_ratio * self.peak if self.peak_ratio > 0 else torch.ones_like(self.warm())
        return self.warm() & torch.isfinite(x) & (self.zscore(x) > z) & (self.excess_ratio(x) > ratio - 1.0) & above_peak

    def clip_value(self) -> torch.Tensor:
        return self.mean + self.clip_z * self.std()

    def update(self, x: torch.Tensor, accept: torch.Tensor) -> None:
        x = x.float()
        accept = accept & torch.isfinite(x)
        clipped = torch.where(self.warm(), torch.minimum(x, self.clip_value()), x)
        clipped = torch.where(accept, clipped, self.mean)
        # Cumulative average while warming up, then a fixed-alpha EMA.
        a = torch.clamp(self.count / (self.count + 1.0), max=self.alpha)
        delta = clipped - self.mean
        new_mean = self.mean + (1.0 - a) * delta
        new_var = a * (self.var + (1.0 - a) * delta * delta)
        self.mean = torch.where(accept, new_mean, self.mean)
        self.var = torch.where(accept, new_var, self.var)
        self.count = self.count + accept.float()
        # The peak follows |x| (losses can be negative) and forgets slowly, so old highs stop counting.
        self.peak = torch.where(accept, torch.maximum(self.peak * self.peak_decay, x.abs()), self.peak)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count.clone(), "peak": self.peak.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.mean, self.var, self.count, self.peak = (state[k].to(self.mean.device) for k in ("mean", "var", "count", "peak"))

    def host_summary(self) -> dict[str, float]:
        """Read the statistics (event path only: this synchronises)."""
        return {"mean": float(self.mean), "std": float(self.std()), "count": float(self.count), "peak": float(self.peak)}
