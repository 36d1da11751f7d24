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
    """Statistics of one or several signals at once (the guard keeps loss and grad norm in one 2-vector,
    so a step costs the same handful of small kernels whatever it watches)."""

    def __init__(
        self, *, alpha: float, warmup: int, clip_z: float, peak_ratio: float = 3.0, peak_decay: float = 0.995,
        size: int | tuple[int, ...] = (), device: torch.device | str = "cpu",
    ) -> None:
        self.alpha = alpha
        self.warmup = warmup
        self.clip_z = clip_z
        self.peak_ratio = peak_ratio
        self.peak_decay = peak_decay
        shape = (size,) if isinstance(size, int) else size
        self.mean = torch.zeros(shape, dtype=torch.float32, device=device)
        self.var = torch.zeros(shape, dtype=torch.float32, device=device)
        self.count = torch.zeros(shape, dtype=torch.float32, device=device)
        self.peak = torch.zeros(shape, dtype=torch.float32, device=device)

    def to(self, device: torch.device) -> RunningStats:
        if self.mean.device != device:
            self.mean, self.var, self.count, self.peak = (t.to(device) for t in (self.mean, self.var, self.count, self.peak))
        return self

    def std(self) -> torch.Tensor:
        # A floor relative to the mean keeps a perfectly flat series from turning 1e-7 noise into z=100.
        return torch.sqrt(self.var) + 1e-3 * self.mean.abs() + 1e-12

    def warm(self) -> torch.Tensor:
        return self.count >= self.warmup

    def is_spike(self, x: torch.Tensor, z: float, ratio: float | torch.Tensor) -> torch.Tensor:
        x = x.float()
        excess = x - self.mean
        spike = self.warm() & torch.isfinite(x) & (excess > z * self.std()) & (excess > (ratio - 1.0) * (self.mean.abs() + 1e-12))
        if self.peak_ratio > 0:
            spike = spike & (x > self.peak_ratio * self.peak)
        return spike

    def clip_value(self) -> torch.Tensor:
        return self.mean + self.clip_z * self.std()

    def update(self, x: torch.Tensor, accept: torch.Tensor) -> None:
        x = x.float()
        accept = accept & torch.isfinite(x)
        warm = self.warm()
        clipped = torch.where(warm, torch.minimum(x, self.clip_value()), x)
        # Cumulative average while warming up, then a fixed-alpha EMA.
        a = torch.clamp(self.count / (self.count + 1.0), max=self.alpha)
        delta = torch.where(accept, clipped - self.mean, torch.zeros_like(x))
        step = torch.where(accept, 1.0 - a, torch.zeros_like(a))
        self.mean = self.mean + step * delta
        self.var = torch.where(accept, a * (self.var + (1.0 - a) * delta * delta), self.var)
        self.count = self.count + accept.float()
        # The peak follows |x| (losses can be negative) and forgets slowly, so old highs stop counting.
        self.peak = torch.where(accept, torch.maximum(self.peak * self.peak_decay, x.abs()), self.peak)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count.clone(), "peak": self.peak.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.mean, self.var, self.count, self.peak = (state[k].to(self.mean.device) for k in ("mean", "var", "count", "peak"))

    def host_summary(self, index: int | None = None) -> dict[str, float]:
        """Read the statistics (event path only: this synchronises)."""
        pick = (lambda t: t) if index is None else (lambda t: t[index])
        return {"mean": float(pick(self.mean)), "std": float(pick(self.std())), "count": float(pick(self.count)),
                "peak": float(pick(self.peak))}
