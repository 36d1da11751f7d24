"""Facts about the inputs of particular operators: class targets of a loss, batch-norm statistics."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from nanguard.forensics.trace.births import dtype_name, is_float, rows_with, summarize
from nanguard.forensics.trace.ops import CLASS_TARGET_LOSS_OPS, LOSS_OPS, MAX_RECORDS, SOFTMAX_OPS


def class_target_stats(logp: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> dict[str, Any]:
    """Out-of-range class targets, and valid targets whose input entry is -inf (a masked target logit)."""
    class_dim = 1 if logp.dim() >= 2 else 0
    classes = int(logp.shape[class_dim])
    t = target.long()
    ignored = t == ignore_index
    out_of_range = ((t < 0) | (t >= classes)) & ~ignored
    stats: dict[str, Any] = {
        "num_classes": classes,
        "ignore_index": ignore_index,
        "target_min": int(t.min()) if t.numel() else None,
        "target_max": int(t.max()) if t.numel() else None,
        "out_of_range": int(out_of_range.sum()),
        "out_of_range_values": sorted({int(v) for v in t[out_of_range][:16].tolist()}),
        "out_of_range_rows": rows_with(out_of_range),
    }
    valid = ~(ignored | out_of_range)
    safe = torch.where(valid, t, torch.zeros_like(t))
    picked = logp.gather(class_dim, safe.unsqueeze(class_dim)).squeeze(class_dim)
    masked = torch.isneginf(picked) & valid
    stats["masked_targets"] = int(masked.sum())
    stats["masked_target_rows"] = rows_with(masked)
    stats["nan_targets"] = int((torch.isnan(picked) & valid).sum())
    if masked.any() and logp.dim() == 2:
        # Rows whose unmasked classes form a prefix [0, k) and whose target is >= k: a label beyond the
        # classes that row's dataset has (the multi-dataset logits-masking case), not a stray mask.
        beyond = []
        for row in masked.nonzero().flatten()[:16].tolist():
            live = torch.isfinite(logp[row]) | (logp[row] > -math.inf)
            k = int(live.sum())
            if k and bool(live[:k].all()) and int(t[row]) >= k:
                beyond.append({"row": row, "target": int(t[row]), "valid_classes": k})
        stats["targets_beyond_valid_prefix"] = beyond
    return stats


def batchnorm_stats(x: torch.Tensor) -> dict[str, Any]:
    """Values per channel and channels with zero batch variance: the two ways batch statistics degenerate."""
    with torch.no_grad():
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).float()
        per_channel = int(flat.shape[1])
        zero_var = int((flat.var(dim=1, unbiased=False) == 0).sum()) if per_channel else 0
    return {
        "values_per_channel": per_channel,
        "channels": int(x.shape[1]),
        "zero_variance_channels": zero_var,
    }


def op_extra(name: str, tensors: dict[str, torch.Tensor], scalars: dict[str, Any], outs: list[torch.Tensor]) -> dict[str, Any]:
    """What explains a non-finite output of op ``name``: masked rows, zero divisors, batch-norm statistics."""
    extra: dict[str, Any] = {"nonfinite_rows": rows_with(~torch.isfinite(outs[0].detach()))}
    x = tensors.get("self") if "self" in tensors else tensors.get("input")
    if name in SOFTMAX_OPS and x is not None and x.dim() > 0:
        dim = int(scalars.get("dim", -1))
        masked = torch.isneginf(x.detach()).all(dim=dim)
        extra["rows_all_masked"] = int(masked.sum())
        extra["softmax_dim"] = dim
        extra["batch_rows_all_masked"] = rows_with(masked)
    if "scaled_dot_product" in name:
        mask = tensors.get("attn_mask")
        if mask is not None:
            masked = (~mask).all(dim=-1) if mask.dtype == torch.bool else torch.isneginf(mask).all(dim=-1)
            extra["rows_all_masked"] = int(masked.sum())
            extra["batch_rows_all_masked"] = rows_with(masked)
    if name == "aten::div" and "other" in tensors:
        a, b = tensors.get("self"), tensors["other"]
        extra["divisor_zeros"] = int((b == 0).sum())
        if a is not None:
            extra["zero_over_zero"] = int(((a == 0) & (b == 0)).sum())
    if "batch_norm" in name and x is not None and x.dim() >= 2:
        extra.update(batchnorm_stats(x))
    return extra


class InputRecords:
    """Loss targets, embedding ids and batch-norm inputs of a replay, recorded *before* the op can raise."""

    def __init__(self, field_of: Callable[[torch.Tensor], str | None]) -> None:
        self.field_of = field_of
        self.loss_ops: list[dict[str, Any]] = []
        self.embedding_ops: list[dict[str, Any]] = []
        self.batchnorm_ops: list[dict[str, Any]] = []
        self.errors: list[str] = []

    def record(self, name: str, tensors: dict[str, torch.Tensor], scalars: dict[str, Any], module: str | None,
               phase: str) -> None:
        try:
            if name in LOSS_OPS and len(self.loss_ops) < MAX_RECORDS:
                ignore_index = int(scalars.get("ignore_index", -100))
                self.loss_ops.append(self._loss_record(name, tensors, module, phase, ignore_index))
            elif "embedding" in name and "backward" not in name and len(self.embedding_ops) < MAX_RECORDS:
                self._embedding(name, tensors, module)
            elif "batch_norm" in name and len(self.batchnorm_ops) < MAX_RECORDS:
                x = tensors.get("input")
                if x is not None and x.dim() >= 2 and is_float(x):
                    self.batchnorm_ops.append({"op": name, "module": module, **batchnorm_stats(x)})
        except Exception as exc:
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}"[:200])

    def _embedding(self, name: str, tensors: dict[str, torch.Tensor], module: str | None) -> None:
        weight, indices = tensors.get("weight"), tensors.get("indices")
        if weight is None or indices is None or not indices.numel():
            return
        lo, hi = torch.aminmax(indices.detach())
        size = int(weight.shape[0])
        self.embedding_ops.append({
            "op": name, "module": module, "num_embeddings": size, "min": int(lo), "max": int(hi),
            "out_of_range": int(((indices < 0) | (indices >= size)).sum()), "field": self.field_of(indices),
        })

    def _loss_record(self, name: str, tensors: dict[str, torch.Tensor], module: str | None, phase: str,
                     ignore_index: int) -> dict[str, Any]:
        record: dict[str, Any] = {"op": name, "module": module, "phase": phase}
        x, target = tensors.get("self"), tensors.get("target")
        if x is None or target is None:
            return record
        record["input"] = {"shape": list(x.shape), "dtype": dtype_name(x.dtype)}
        record["field"] = self.field_of(target)
        if name in CLASS_TARGET_LOSS_OPS and not target.is_floating_point():
            record.update(class_target_stats(x.detach(), target.detach(), ignore_index))
        else:
            record["target"] = summarize(target)
        return record
