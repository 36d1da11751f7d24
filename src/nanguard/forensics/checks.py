"""Checks of the batch, the training state and the update that need no operator trace.

Each check is a plain function over tensors and modules that returns JSON-ready findings (empty when
all is well), so the rules in ``diagnose.py`` can quote their numbers and tests can call them directly.
"""

from __future__ import annotations

import copy
import math
import re
import statistics
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from nanguard.distributed import materialize
from nanguard.forensics.trace import rows_with

# A field counts as extreme when its abs-max is this many times the median of earlier batches.
EXTREME_SCALE_RATIO = 100.0
MIN_SCALE_HISTORY = 3


def _tensor_fields(batch: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in batch.items() if isinstance(v, torch.Tensor) and v.numel()]


def positions_with(mask: torch.Tensor, limit: int = 5) -> list[list[int]]:
    """The first ``limit`` element positions where ``mask`` is set, as index lists (``[row, token]`` for a
    sequence field): rows alone do not say which token or feature to look at."""
    if mask.dim() == 0:
        return [[]] if bool(mask) else []
    return [[int(i) for i in index] for index in mask.nonzero()[:limit].tolist()]


def positions_of(t: torch.Tensor, values: Sequence[int], limit: int = 5) -> list[list[int]]:
    """Where integer field ``t`` holds any of ``values`` (the out-of-range labels an op or exception named)."""
    if t.is_floating_point() or t.dtype == torch.bool or not values:
        return []
    with torch.no_grad():
        return positions_with(torch.isin(t.detach(), torch.tensor(list(values), device=t.device)), limit)


def batch_nonfinite(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """Float batch fields holding NaN or Inf, with counts and the batch rows that hold them."""
    found = []
    for name, t in _tensor_fields(batch):
        if not (t.is_floating_point() or t.is_complex()):
            continue
        with torch.no_grad():
            nan, inf = torch.stack([t.isnan().sum(), t.isinf().sum()]).tolist()
            if nan or inf:
                bad = ~torch.isfinite(t.detach())
                found.append({"field": name, "nan": int(nan), "inf": int(inf), "numel": t.numel(),
                              "rows": rows_with(bad), "positions": positions_with(bad)})
    return found


def batch_absmax(batch: dict[str, Any]) -> dict[str, float]:
    """abs-max of each float field (the same statistic the guard keeps in ``batch_scale_history``)."""
    out = {}
    for name, t in _tensor_fields(batch):
        if t.is_floating_point():
            with torch.no_grad():
                finite = t.detach()[torch.isfinite(t.detach())]
                out[name] = float(finite.abs().max()) if finite.numel() else 0.0
    return out


def batch_scale(
    batch: dict[str, Any], history: dict[str, list[float]], ratio: float = EXTREME_SCALE_RATIO
) -> list[dict[str, Any]]:
    """Fields whose abs-max is orders of magnitude above the running scale of earlier batches."""
    found = []
    for name, value in batch_absmax(batch).items():
        past = [v for v in history.get(name, []) if math.isfinite(v)]
        if len(past) < MIN_SCALE_HISTORY:
            continue
        median, highest = statistics.median(past), max(past)
        if median <= 0:
            continue
        if value >= ratio * median and value > 10.0 * highest:
            found.append(
                {
                    "field": name,
                    "absmax": value,
                    "history_median": median,
                    "history_max": highest,
                    "ratio": value / median,
                }
            )
    return found


# ------------------------------------------------------------------------------------- exceptions
_EXCEPTION_PATTERNS = (
    ("target_out_of_bounds", re.compile(r"Target (-?\d+) is out of bounds")),
    (
        "class_out_of_range",
        re.compile(r"Class values must be smaller than num_classes|Class values must be non-negative"),
    ),
    (
        "index_out_of_range",
        re.compile(
            r"index out of range in self|index (-?\d+) is out of bounds|Index out of range"
            r"|takes value (-?\d+) which is not in the valid range"
        ),
    ),
    ("batchnorm_single_value", re.compile(r"Expected more than 1 value per channel when training")),
    ("batchnorm_eps", re.compile(r"batch_norm eps must be positive")),
    ("bce_input_range", re.compile(r"all elements of (input|target) should be between 0 and 1")),
    ("device_assert", re.compile(r"device-side assert|CUDA error|an illegal memory access")),
)


def parse_exception(exc: BaseException | None) -> dict[str, Any] | None:
    """Recognise the exceptions that name a data or degenerate-batch fault."""
    if exc is None:
        return None
    text = f"{type(exc).__name__}: {exc}"
    for kind, pattern in _EXCEPTION_PATTERNS:
        match = pattern.search(str(exc))
        if match:
            value = None
            for group in match.groups():
                if group is not None and re.fullmatch(r"-?\d+", group):
                    value = int(group)
            return {"kind": kind, "value": value, "text": text[:300]}
    return {"kind": "other", "value": None, "text": text[:300]}


def fields_containing(batch: dict[str, Any], value: int) -> list[str]:
    """Integer batch fields that hold ``value`` (to name which field an exception's bad id came from)."""
    names = []
    for name, t in _tensor_fields(batch):
        if not t.is_floating_point() and t.dtype != torch.bool and bool((t == value).any()):
            names.append(name)
    return names


def embedding_modules(models: Sequence[torch.nn.Module]) -> list[tuple[str, int]]:
    out = []
    for model in models:
        for name, m in model.named_modules():
            if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
                out.append((name, int(m.num_embeddings)))
    return out


def token_problems_static(models: Sequence[torch.nn.Module], batch: dict[str, Any]) -> list[dict[str, Any]]:
    """Integer fields with ids beyond the smallest embedding table: the fallback when no replay ran."""
    tables = embedding_modules(models)
    if not tables:
        return []
    found = []
    for field_name, t in _tensor_fields(batch):
        if t.is_floating_point() or t.dtype == torch.bool:
            continue
        hi, lo = int(t.max()), int(t.min())
        for module, size in tables:
            if hi >= size or lo < 0:
                bad = int(((t >= size) | (t < 0)).sum())
                found.append(
                    {
                        "field": field_name,
                        "module": module,
                        "num_embeddings": size,
                        "max": hi,
                        "min": lo,
                        "out_of_range": bad,
                    }
                )
                break
    # A labels field larger than an embedding table is usually not a token field: keep only likely ids.
    token_like = [f for f in found if not re.search(r"label|target|^y$", str(f["field"]), re.IGNORECASE)]
    return token_like or found


# ------------------------------------------------------------------------------------- state
def nonfinite_counts(t: torch.Tensor) -> tuple[int, int]:
    t = materialize(t)  # an FSDP2 shard is gathered; every rank runs these checks together there
    if not (t.is_floating_point() or t.is_complex()) or not t.numel():
        return 0, 0
    with torch.no_grad():
        nan, inf = torch.stack([t.isnan().sum(), t.isinf().sum()]).tolist()
    return int(nan), int(inf)


def state_nonfinite(named: Sequence[tuple[str, torch.Tensor]], kind: str) -> list[dict[str, Any]]:
    """Parameters or buffers holding NaN/Inf, by name, with the owning module."""
    found = []
    for name, t in named:
        nan, inf = nonfinite_counts(t.detach())
        if nan or inf:
            module = name.rsplit(".", 1)[0] if "." in name else ""
            found.append(
                {"name": name, "module": module, "kind": kind, "nan": nan, "inf": inf, "numel": t.numel()}
            )
    return found


def optimizer_state_nonfinite(
    optimizer: torch.optim.Optimizer | None, names: dict[int, str]
) -> list[dict[str, Any]]:
    """Optimizer buffers (Adam's ``exp_avg_sq`` and friends) holding NaN/Inf, by parameter name."""
    if optimizer is None:
        return []
    found = []
    for p, values in optimizer.state.items():
        pname = names.get(id(p), "?")
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                nan, inf = nonfinite_counts(value.detach())
                if nan or inf:
                    module = pname.rsplit(".", 1)[0] if "." in pname else ""
                    found.append(
                        {
                            "name": f"{pname}.{key}",
                            "param": pname,
                            "key": key,
                            "module": module,
                            "nan": nan,
                            "inf": inf,
                            "numel": value.numel(),
                        }
                    )
    return found


def grads_nonfinite(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor | None]], names: dict[int, str]
) -> list[dict[str, Any]]:
    found = []
    for p, g in pairs:
        if g is None:
            continue
        nan, inf = nonfinite_counts(g)
        if nan or inf:
            found.append({"name": names.get(id(p), "?"), "nan": nan, "inf": inf, "numel": g.numel()})
    return found


def eps_underflow(optimizer: torch.optim.Optimizer | None) -> list[dict[str, Any]]:
    """Param groups whose ``eps`` rounds to 0 in the dtype of their parameters (Adam in pure fp16)."""
    if optimizer is None:
        return []
    found = []
    for i, group in enumerate(optimizer.param_groups):
        eps = group.get("eps")
        if not isinstance(eps, float) or eps <= 0:
            continue
        for dtype in {p.dtype for p in group["params"] if p.is_floating_point()}:
            if float(torch.tensor(eps, dtype=dtype)) == 0.0:
                found.append({"group": i, "eps": eps, "dtype": str(dtype).replace("torch.", "")})
    return found


def simulate_update(optimizer: torch.optim.Optimizer | None, names: dict[int, str]) -> dict[str, Any] | None:
    """One optimizer step on copies of the parameters with the gradients now in ``.grad``.

    Returns which parameters the update would make non-finite, or None when it cannot be simulated.
    The real parameters and optimizer are not touched.
    """
    if optimizer is None:
        return None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(p.grad is not None for p in params):
        return None
    copies: dict[int, torch.Tensor] = {}
    for p in params:
        c = p.detach().clone().requires_grad_(p.requires_grad)
        if p.grad is not None:
            c.grad = p.grad.detach().clone()
        copies[id(p)] = c
    groups = [
        {
            **{k: copy.deepcopy(v) for k, v in g.items() if k != "params"},
            "params": [copies[id(p)] for p in g["params"]],
        }
        for g in optimizer.param_groups
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        factory: Any = type(optimizer)
        try:
            sim = factory(groups, **optimizer.defaults)
        except TypeError:
            sim = factory(groups)
        sim.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        with torch.no_grad():
            sim.step()
    became = []
    for p in params:
        c = copies[id(p)]
        before = nonfinite_counts(p.detach())
        after = nonfinite_counts(c.detach())
        if (after[0] or after[1]) and not (before[0] or before[1]):
            became.append(
                {
                    "name": names.get(id(p), "?"),
                    "nan": after[0],
                    "inf": after[1],
                    "dtype": str(p.dtype).replace("torch.", ""),
                }
            )
    return {"optimizer": type(optimizer).__name__, "became_nonfinite": became}


def batchnorm_training_modules(models: Sequence[torch.nn.Module]) -> list[str]:
    out = []
    for model in models:
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training:
                out.append(name)
    return out


# ------------------------------------------------------------------------------------- spikes
def robust_scale(history: Sequence[float]) -> tuple[float, float] | None:
    """(median, robust std from the MAD) of the finite values, or None with too little history."""
    values = [v for v in history if v is not None and math.isfinite(v)]
    if len(values) < 5:
        return None
    median = statistics.median(values)
    mad = statistics.median(abs(v - median) for v in values)
    return median, max(1.4826 * mad, 1e-12 * max(abs(median), 1.0))


def spike_evidence(
    value: float | None, history: Sequence[float], stats: dict[str, float], key: str
) -> dict[str, float] | None:
    """How far ``value`` is above its running scale: ratio to the mean and a z-score."""
    if value is None or not math.isfinite(value):
        return None
    aliases = (key, "grad", "grad_norm") if key.startswith("grad") else (key,)
    mean = next((stats[f"{k}_mean"] for k in aliases if f"{k}_mean" in stats), None)
    std = next((stats[f"{k}_std"] for k in aliases if f"{k}_std" in stats), None)
    if mean is not None and (not math.isfinite(mean) or mean <= 0):
        mean = None
    if mean is None or std is None:
        scale = robust_scale(history)
        if scale is None:
            return None
        mean, std = scale
    ratio = value / mean if mean else math.inf
    z = (value - mean) / std if std else math.inf
    return {"value": value, "mean": mean, "std": std, "ratio": ratio, "z": z}


def loss_trend(history: Sequence[float]) -> dict[str, float] | None:
    """Mean loss of the first and last quarter of the history and their ratio (>1: rising)."""
    values = [v for v in history if v is not None and math.isfinite(v)]
    if len(values) < 8:
        return None
    quarter = max(2, len(values) // 4)
    first, last = statistics.fmean(values[:quarter]), statistics.fmean(values[-quarter:])
    ratio = last / first if first > 0 else math.inf
    return {"first": first, "last": last, "ratio": ratio, "steps": float(len(values))}
