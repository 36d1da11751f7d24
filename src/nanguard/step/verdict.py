"""The verdict on one step, and the only place its device vector is encoded and decoded.

Per step the device produces one small float32 vector (``Layout`` names its entries): the loss, the
total gradient norm, and, when they apply, the weight norm checked before the update, the GradScaler's
``found_inf``, its scale and the clip coefficient. Under torch.distributed every rank's vector is
all-gathered into a ``[world, len]`` matrix. A weight norm taken after the update travels after it.

The rule that turns numbers into flags is written here twice, once in tensor operations for the fused
optimizer (which must decide on the device, without a sync) and once in Python floats for the host
(which reads the numbers back and decides the same way). Limits are rounded to float32 first, so both
compare exactly the same values.
"""

from __future__ import annotations

import math
import struct
from typing import Any, NamedTuple

import torch

FLOAT32_MAX = 3.4028234663852886e38
Layout = tuple[str, ...]
LOSS, NORM, WEIGHTS, SCALER_FOUND, LOSS_SCALE, COEF = ("loss", "norm", "weights", "scaler_found", "loss_scale", "coef")


def as_float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (limits larger than float32's range become FLOAT32_MAX)."""
    if not math.isfinite(value) or abs(value) >= FLOAT32_MAX:
        return math.copysign(FLOAT32_MAX, value) if not math.isnan(value) else FLOAT32_MAX
    return float(struct.unpack("f", struct.pack("f", value))[0])


class Limits(NamedTuple):
    """Thresholds in force at one step, from the detector's statistics: a loss or gradient norm above its
    limit is a spike; gradients are clipped to ``clip``. ``FLOAT32_MAX`` means no limit. (Immutable, like
    every record of a step here; a named tuple because one is built per step, cheaply.)"""

    loss: float = FLOAT32_MAX
    grad: float = FLOAT32_MAX
    clip: float = FLOAT32_MAX

    @classmethod
    def of(cls, loss: float, grad: float, clip: float) -> Limits:
        return cls(as_float32(loss), as_float32(grad), as_float32(clip))

    @property
    def clips(self) -> bool:
        return self.clip < FLOAT32_MAX


def clip_coef(norm: float, limit: float) -> float:
    """The factor clipping applies to the gradients (1.0: none), as ``clip_grad_norm_`` computes it."""
    if limit >= FLOAT32_MAX or not math.isfinite(norm):
        return 1.0
    return min(1.0, limit / (norm + 1e-6))


# ------------------------------------------------------------------------------------- device side
def encode(parts: dict[str, torch.Tensor]) -> tuple[Layout, torch.Tensor]:
    """Stack the step's device scalars into one float32 vector (one op); returns its layout."""
    layout = tuple(parts)
    values = [t if t.dim() == 0 and t.dtype == torch.float32 else t.reshape(()).float() for t in parts.values()]
    return layout, torch.stack(values)


def read_on_host(parts: dict[str, Any]) -> tuple[Layout, list[float]]:
    """One read of the step's scalars, where ``parts[NORM]`` is the list of per-tensor gradient norms: the total
    norm is summed here in double precision (as torch sums float32 on a CPU) and, like a float32 result,
    reads inf above float32's range. Returns the layout and the values as :func:`encode` would have them."""
    norms = parts[NORM]
    if len(parts) == 2:
        values = torch.stack([parts[LOSS], *norms]).tolist()
        others: list[str] = []
    else:
        others = [name for name in parts if name not in (LOSS, NORM)]
        values = torch.stack([parts[LOSS], *norms, *(parts[name].reshape(()).float() for name in others)]).tolist()
    total = math.hypot(*values[1:1 + len(norms)])  # NaN or inf when any norm is (inf wins over NaN: both are bad)
    if total > FLOAT32_MAX:
        total = math.inf
    return (LOSS, NORM, *others), [values[0], total, *values[1 + len(norms):]]


def upper_bounds(layout: Layout, limits: Limits, *, has_loss: bool) -> list[float]:
    """Per entry of the vector, the largest value that lets the update through (the host's rule, as numbers)."""
    bounds = [FLOAT32_MAX] * len(layout)
    if has_loss:
        bounds[0] = limits.loss
    bounds[1] = limits.grad
    if SCALER_FOUND in layout:
        bounds[layout.index(SCALER_FOUND)] = 0.0
    return bounds


def device_found(vector: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """On the device, 1.0 where the step must not be applied (what a fused optimizer's ``found_inf`` wants).

    ``vector`` is one rank's vector or the ``[world, len]`` matrix of all ranks: any rank's fault stops
    every rank. An entry is a fault when it is NaN, infinite, or above its bound from :func:`upper_bounds`
    (``lower`` is ``-FLOAT32_MAX``): clamping changes exactly those entries, so one clamp and one comparison
    decide, in four small kernels and no sync. A GradScaler's own overflow (its ``found_inf`` above 0) also
    stops the update, as the scaler would have.
    """
    return (torch.clamp(vector, min=lower, max=upper) != vector).any().float()


def device_clip_scale(norm: torch.Tensor, limit: float) -> torch.Tensor:
    """1 / :func:`clip_coef` in tensor operations: the factor a fused kernel divides the gradients by."""
    return torch.clamp((norm + 1e-6) / limit, min=1.0)


# ------------------------------------------------------------------------------------- host side
class Verdict(NamedTuple):
    """What the guard concluded about one step, in host floats. ``bad``: the update must not count."""

    step: int
    loss: float | None  # None: no loss was seen this step
    grad_norm: float
    loss_bad: bool = False
    grad_bad: bool = False
    weights_bad: bool = False
    loss_spike: bool = False
    grad_spike: bool = False
    scaler_overflow: bool = False
    post_weights_bad: bool = False
    clip_coef: float = 1.0
    loss_scale: float | None = None
    ranks: tuple[tuple[float, ...], ...] = ()  # per-rank raw vectors under torch.distributed
    layout: Layout = (LOSS, NORM)
    limits: Limits = Limits()

    @property
    def bad(self) -> bool:
        return (self.loss_bad or (self.grad_bad and not self.scaler_overflow) or self.weights_bad
                or self.loss_spike or self.grad_spike)

    @property
    def clipped(self) -> bool:
        return self.clip_coef < 1.0

    @property
    def trigger(self) -> str:
        if self.post_weights_bad or self.weights_bad:
            return "nonfinite_weights"
        if self.loss_bad:
            return "nonfinite_loss"
        if self.grad_bad:
            return "nonfinite_grad"
        if self.loss_spike:
            return "loss_spike"
        if self.grad_spike:
            return "grad_spike"
        return "nonfinite_grad"

    @property
    def bad_rank(self) -> int | None:
        """The rank that saw the fault (non-finite loss first, then gradients or weights, then spikes),
        or None in a single process."""
        if len(self.ranks) <= 1:
            return None
        flags = [_row_flags(row, self.layout, self.limits, has_loss=self.loss is not None) for row in self.ranks]
        for columns in ((0,), (1, 2), (3, 4)):
            for rank, f in enumerate(flags):
                if any(f[c] for c in columns):
                    return rank
        return None

    def with_post_weights_bad(self) -> Verdict:
        return self._replace(post_weights_bad=True)

    def rank_loss(self, rank: int) -> float | None:
        """The loss the given rank saw (the verdict's own loss is the mean over ranks)."""
        if self.loss is None or not (0 <= rank < len(self.ranks)):
            return self.loss
        return self.ranks[rank][0]


def _row_flags(row: tuple[float, ...] | list[float], layout: Layout, limits: Limits, *,
               has_loss: bool) -> tuple[bool, bool, bool, bool, bool, bool]:
    """(loss_bad, grad_bad, weights_bad, loss_spike, grad_spike, scaler_found) of one rank's vector."""
    loss, norm = row[0], row[1]
    loss_bad = has_loss and not math.isfinite(loss)
    grad_bad = not math.isfinite(norm)
    loss_spike = has_loss and not loss_bad and loss > limits.loss
    grad_spike = not grad_bad and norm > limits.grad
    if len(layout) == 2:
        return loss_bad, grad_bad, False, loss_spike, grad_spike, False
    weights_bad = WEIGHTS in layout and not math.isfinite(row[layout.index(WEIGHTS)])
    scaler_found = SCALER_FOUND in layout and row[layout.index(SCALER_FOUND)] > 0
    return loss_bad, grad_bad, weights_bad, loss_spike, grad_spike, scaler_found


class Reading(NamedTuple):
    """How to read one read-back vector: its layout, how many rank vectors it holds, and whether the weight
    norm after the update follows them."""

    layout: Layout
    world: int = 1
    post_weights: bool = False


def decode(step: int, values: list[float], reading: Reading, limits: Limits, *, has_loss: bool,
           scaler_enabled: bool) -> Verdict:
    """The host's reading of a read-back vector (``reading.world`` rank vectors laid end to end).

    Without a ``coef`` entry the clip coefficient is computed here from the norm and the clip limit, as the
    device would have.
    """
    layout, world = reading.layout, reading.world
    width = len(layout)
    rows = [values[r * width:(r + 1) * width] for r in range(world)] if world > 1 else [values]
    flags = [_row_flags(row, layout, limits, has_loss=has_loss) for row in rows]
    if world > 1:
        loss_bad, grad_bad, weights_bad, loss_spike, grad_spike, found = (any(f[i] for f in flags) for i in range(6))
        finite = [row[0] for row in rows if not math.isnan(row[0])]
        loss: float | None = sum(finite) / len(finite) if finite else math.nan
    else:
        loss_bad, grad_bad, weights_bad, loss_spike, grad_spike, found = flags[0]
        loss = values[0]
    overflow = scaler_enabled and ((grad_bad and not loss_bad) or found)
    mine = rows[0]
    verdict = Verdict(
        step=step, loss=loss if has_loss else None, grad_norm=mine[1], loss_bad=loss_bad, grad_bad=grad_bad,
        weights_bad=weights_bad, loss_spike=loss_spike, grad_spike=grad_spike, scaler_overflow=overflow,
        clip_coef=mine[layout.index(COEF)] if COEF in layout else clip_coef(mine[1], limits.clip),
        loss_scale=mine[layout.index(LOSS_SCALE)] if LOSS_SCALE in layout else None,
        ranks=tuple(tuple(row[:width]) for row in rows) if world > 1 else (), layout=layout, limits=limits,
    )
    # A weight check after an update that was not applied says nothing about the update.
    post = reading.post_weights and not math.isfinite(values[-1])
    return verdict._replace(post_weights_bad=True) if post and not (verdict.bad or overflow) else verdict

__all__ = [
    "COEF",
    "FLOAT32_MAX",
    "LOSS",
    "LOSS_SCALE",
    "NORM",
    "SCALER_FOUND",
    "WEIGHTS",
    "Layout",
    "Limits",
    "Reading",
    "Verdict",
    "as_float32",
    "clip_coef",
    "decode",
    "device_clip_scale",
    "device_found",
    "encode",
    "upper_bounds",
]
