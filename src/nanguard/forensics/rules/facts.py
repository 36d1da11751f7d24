"""The evidence the rules read (:class:`Facts`), and the helpers every rule uses to write a diagnosis.

Fixes come from the cause registry (:mod:`nanguard.causes`); the operator tables here say which ops have
a domain or a singular derivative and what the op-specific advice is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from nanguard.causes import fill, fixes_for
from nanguard.events import Diagnosis
from nanguard.forensics.replay import ReplayOutcome
from nanguard.forensics.trace import Birth

# Ops whose result is undefined or infinite outside their domain (log 0, x/0, sqrt(-1), acos(2) ...).
DOMAIN_OPS = frozenset(
    "aten::" + n
    for n in [
        "log",
        "log2",
        "log10",
        "log1p",
        "xlogy",
        "sqrt",
        "rsqrt",
        "div",
        "div_",
        "reciprocal",
        "pow",
        "float_power",
        "acos",
        "asin",
        "atanh",
        "acosh",
        "lgamma",
        "digamma",
        "polygamma",
        "mvlgamma",
        "erfinv",
        "logit",
        "fmod",
        "remainder",
        "atan2",
        "var",
        "std",
        "var_mean",
        "std_mean",
        "special_xlog1py",
        "special_entr",
        "special_ndtri",
        "_log_softmax",
        "logsumexp",
        "linalg_inv",
        "linalg_cholesky",
        "cholesky",
        "inverse",
        "linalg_solve",
    ]
)
# Forward ops whose derivative blows up at the edge of their domain while the value stays finite.
SINGULAR_BACKWARD_OPS = frozenset(
    "aten::" + n
    for n in [
        "sqrt",
        "rsqrt",
        "linalg_vector_norm",
        "norm",
        "frobenius_norm",
        "linalg_norm",
        "pow",
        "float_power",
        "where",
        "acos",
        "asin",
        "atanh",
        "acosh",
        "div",
        "reciprocal",
        "log",
        "log2",
        "log10",
        "log1p",
        "std",
        "var",
        "std_mean",
        "var_mean",
        "cdist",
        "_cdist_forward",
        "linalg_eigh",
        "_linalg_eigh",
        "xlogy",
        "_cdist_forward",
        "_pdist_forward",
        "atan2",
        "hypot",
        "erfinv",
        "renorm",
        "_weight_norm_interface",
        "prod",
        "cumprod",
        "abs",
    ]
)
LOW_PRECISION = ("float16", "bfloat16")
DTYPE_MAX = {"float16": 65504.0, "bfloat16": 3.3895e38, "float32": 3.4028e38, "float64": 1.797e308}


def fmt(value: Any) -> str:
    """Numbers short enough for one evidence line."""
    if isinstance(value, str):
        return value
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return repr(value)
    return f"{value:.4g}"


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return False
    return abs(a - b) <= 1e-3 * max(abs(a), abs(b), 1e-12)


@dataclass
class Facts:
    """Everything the investigation found, in one place for the rules."""

    trigger: str = "nonfinite_loss"
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    state_is_pre_step: bool = True
    update_made_weights_nonfinite: bool = False
    exception: dict[str, Any] | None = None
    batch_nonfinite: list[dict[str, Any]] = field(default_factory=list)
    # Batch fields that look like padding masks (bool or 0/1), for naming the field behind an all-masked row.
    mask_fields: dict[str, Any] = field(default_factory=dict, repr=False)
    extreme_scale: list[dict[str, Any]] = field(default_factory=list)
    labels: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[dict[str, Any]] = field(default_factory=list)
    weights: list[dict[str, Any]] = field(default_factory=list)
    optimizer_state: list[dict[str, Any]] = field(default_factory=list)
    entry_grads: list[dict[str, Any]] = field(default_factory=list)
    eps_underflow: list[dict[str, Any]] = field(default_factory=list)
    update_sim: dict[str, Any] | None = None
    plain: ReplayOutcome | None = None
    traced: ReplayOutcome | None = None
    fp32: ReplayOutcome | None = None
    # How far the float32 replay's loss and gradient norm sit above their running levels (spike_evidence).
    fp32_loss_level: dict[str, float] | None = None
    fp32_grad_level: dict[str, float] | None = None
    births: list[Birth] = field(default_factory=list)
    loss_origin: Birth | None = None
    grad_origin: Birth | None = None
    loss_ops: list[dict[str, Any]] = field(default_factory=list)
    # The names of the forward and loss ops the traced replay ran, in order (births index into it).
    forward_ops: list[str] = field(default_factory=list, repr=False)
    batchnorm_ops: list[dict[str, Any]] = field(default_factory=list)
    batchnorm_training: list[str] = field(default_factory=list)
    error_context: dict[str, Any] | None = None
    low_precision: list[str] = field(default_factory=list)
    # A batch was recorded and checked (False: no tensor reached the recorded call, so nothing about the data).
    batch_checked: bool = False
    # An enabled GradScaler was in use: every replay ran at loss scale 1, so the scale did not cause an overflow.
    under_scaler: bool = False
    loss_spike: dict[str, float] | None = None
    grad_spike: dict[str, float] | None = None
    trend: dict[str, float] | None = None
    checked: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def replay(self) -> ReplayOutcome | None:
        """The most informative replay in the step's own precision: traced if it ran cleanly, else plain."""
        if self.traced is not None and self.traced.error is None:
            return self.traced
        return self.plain if self.plain is not None else self.traced

    @property
    def reproduced(self) -> bool | None:
        """Whether a replay in the step's own precision showed the same problem."""
        # A replay that crashed reproduced nothing (unless the step itself raised, and the replay raised too).
        runs = [r for r in (self.plain, self.traced) if r is not None and (r.error is None or self.exception)
                and (r.error is not None or r.loss is not None or r.grad_norms)]  # an empty re-run shows nothing
        if not runs:
            return None
        if any(not r.finite for r in runs):
            return True
        if self.trigger in ("loss_spike", "grad_spike", "divergence"):
            return any(close(r.loss, self.loss) or close(r.total_grad_norm, self.grad_norm) for r in runs)
        return False


DOMAIN_FIXES = {
    "aten::log": "its input had {zeros} and {negatives}; use `torch.log(x.clamp_min(eps))` "
    "or log_softmax instead of log(softmax).",
    "aten::div": "the divisor had {divisor_zeros} ({zero_over_zero} of them 0/0); divide by "
    "`den.clamp_min(1)` (masked mean: `x.sum() / mask.sum().clamp_min(1)`).",
    "aten::sqrt": "its input had {negatives}; use `torch.sqrt(x.clamp_min(0) + eps)`.",
    "aten::pow": "negative base with a fractional exponent or 0 to a negative power; clamp the base.",
    "aten::acos": "clamp its input to [-1 + eps, 1 - eps].",
    "aten::asin": "clamp its input to [-1 + eps, 1 - eps].",
    "aten::var": "variance of a single element (correction=1) is 0/0; use `unbiased=False` or more elements.",
    "aten::std": "std of a single element (correction=1) is 0/0; use `unbiased=False` or more elements.",
}
SINGULAR_FIXES = {
    "aten::sqrt": "use `torch.sqrt(x + eps)`: d sqrt(x)/dx = 1/(2 sqrt(x)) is infinite at 0.",
    "aten::linalg_vector_norm": "the gradient of a norm at 0 is 0/0; use `torch.sqrt((x*x).sum(-1) + eps)` "
    "or `F.normalize(x, eps=...)`.",
    "aten::norm": "the gradient of a norm at 0 is 0/0; use `torch.sqrt((x*x).sum(-1) + eps)`.",
    "aten::pow": "x**p with p < 1 has an infinite derivative at 0; use `(x + eps) ** p`.",
    "aten::where": "the untaken branch is NaN/inf; clamp its input so both branches are finite.",
    "aten::acos": "clamp the input to [-1 + eps, 1 - eps]; the derivative is infinite at +-1.",
    "aten::asin": "clamp the input to [-1 + eps, 1 - eps]; the derivative is infinite at +-1.",
    "aten::div": "the derivative of a/b is infinite where b = 0; clamp the denominator.",
    "aten::xlogy": "the target of `kl_div` / `xlogy` holds exact zeros and requires grad (d/dy y*log(y) is "
    "infinite at 0): detach the target (`target.detach()`) or clamp it with `clamp_min(eps)`.",
    "aten::linalg_eigh": "the matrix has repeated eigenvalues, where eigh's gradient divides by their "
    "difference (0); add a small jitter (`A + eps * torch.eye(n)`) or avoid differentiating the eigenvectors.",
    "aten::_linalg_eigh": "the matrix has repeated eigenvalues, where eigh's gradient divides by their "
    "difference (0); add a small jitter (`A + eps * torch.eye(n)`) or avoid differentiating the eigenvectors.",
    "aten::_cdist_forward": "cdist's gradient divides by the distance, 0 between identical points; use "
    "`torch.sqrt(((a[:, None] - b[None]) ** 2).sum(-1) + eps)`.",
}



def mod(module: str | None) -> str:
    """How a module reads in evidence: ``None`` -> "the loss code", ``''`` -> "the root module", ``'0.fc'`` ->
    "`model[0].fc`" (a child of a Sequential root reads as the indexing that reaches it)."""
    if module is None:
        return "the loss code"
    if not module:
        return "the root module"
    head, _, rest = module.partition(".")
    if head.isdigit():
        return f"`model[{head}]" + (f".{rest}`" if rest else "`")
    return f"`{module}`"


def count(n: int, word: str, plural: str | None = None) -> str:
    """``count(1, "zero")`` -> "1 zero", ``count(67160, "zero")`` -> "67,160 zeros"; NaN/-inf do not inflect."""
    if n == 1 or word in ("NaN", "Inf", "-inf", "+inf"):
        return f"{n:,} {word}"
    return f"{n:,} {plural or word + 's'}"


def value(v: float | None) -> str:
    """A loss or norm as people write it: NaN, inf, 3.42."""
    if v is None:
        return "none"
    return "NaN" if v != v else fmt(v)


def nonfinite_counts(nan: int, posinf: int, neginf: int, numel: int | None) -> str:
    """ "1 Inf among 16,384 values", not "0 NaN, 1 Inf of 16384"."""
    parts = [count(n, w) for n, w in ((nan, "NaN"), (posinf, "+inf"), (neginf, "-inf")) if n]
    text = ", ".join(parts) or "no non-finite value"
    return text + (f" among {numel:,} values" if numel else "")


def make(
    cause: str,
    phase: str,
    *,
    confidence: float,
    evidence: list[str],
    fix: dict[str, Any] | None = None,
    variant: str | None = None,
    **where: Any,
) -> Diagnosis:
    """A diagnosis whose fixes are the registry's, filled from where it was born and the rule's ``fix`` fields."""
    context = {k: v for k, v in where.items() if v is not None}
    context.update(fix or {})
    context["module"] = mod(where.get("module"))
    if "op" in context:
        context["op"] = f"`{context['op']}`"
    return Diagnosis(
        cause=cause,
        phase=phase,
        module=where.get("module"),
        op=where.get("op"),
        tensor=where.get("tensor"),
        reproducible=where.get("reproducible"),
        confidence=confidence,
        evidence=[e for e in evidence if e],
        fixes=fixes_for(cause, variant, **context),
    )


def birth_line(b: Birth, parent: Birth | None = None) -> str:
    """Where the first bad value was born and what its inputs held, as an engineer would say it."""
    out = b.outputs[0] if b.outputs else {}
    shape = out.get("shape") or []
    numel = math.prod(shape) if shape else None
    counts = nonfinite_counts(out.get("nan", 0), out.get("posinf", 0), out.get("neginf", 0), numel)
    where = f"{b.op} in {mod(b.module)}" if b.op else f"{b.source}"
    if b.phase == "backward":
        where += f" (the backward of {b.forward_op or '?'}, {b.backward_node})"
    line = f"first {'NaN' if b.kind == 'nan' else 'inf'} born at {where} ({b.phase}, {b.dtype}): {counts}"
    inputs = [i for i in b.inputs if "absmax" in i or "nan" in i][:3]
    masks = parent is not None and parent.intended
    for i in inputs:
        name = "its input" if len(inputs) == 1 else f"its input `{i['arg']}`"
        held = [count(i[key], word, plural) for key, word, plural in (
            ("nan", "NaN", None), ("neginf", "-inf", None), ("posinf", "+inf", None), ("zeros", "zero", None),
            ("negatives", "negative value", None)) if i.get(key)]
        if held and masks and i.get("neginf"):
            held[held.index(count(i["neginf"], "-inf"))] += " (mask fills)"
        largest = f"largest |x| {fmt(i.get('absmax'))}"
        line += f"; {name} held {', '.join(held)}, {largest}" if held else f"; {name}'s {largest}"
    if b.extra.get("divisor_zeros"):
        zz = b.extra.get("zero_over_zero", 0)
        line += f"; {count(b.extra['divisor_zeros'], 'zero divisor')}" + (f" ({zz:,} of them 0/0)" if zz else "")
    if b.extra.get("nonfinite_rows"):
        line += f"; batch rows {b.extra['nonfinite_rows']}"
    return line


def outcome_line(r: ReplayOutcome) -> str:
    if r.error:
        return f"raised {r.error}"
    grads = (
        "gradients finite"
        if r.grads_finite
        else f"{count(len(r.grad_nonfinite), 'gradient')} non-finite (e.g. `{next(iter(r.grad_nonfinite))}`)"
    )
    return f"loss {value(r.loss)}, {grads}, grad norm {value(r.total_grad_norm)}"


def is_domain(b: Birth) -> bool:
    op = b.op or ""
    return op in DOMAIN_OPS or op.rstrip("_") in DOMAIN_OPS


def has_zero_divisor(b: Birth) -> bool:
    if b.extra.get("divisor_zeros"):
        return True
    return (b.op or "") in ("aten::div", "aten::pow", "aten::reciprocal", "aten::rsqrt") and any(
        i.get("zeros") for i in b.inputs
    )


def overflow_like(b: Birth) -> bool:
    """inf from finite inputs whose magnitudes are large: overflow, not a domain edge."""
    if b.kind != "inf" or has_zero_divisor(b):
        return False
    limit = DTYPE_MAX.get(b.dtype or "", 3.4e38)
    absmax = [float(i["absmax"]) for i in b.inputs if isinstance(i.get("absmax"), (int, float))]
    return (bool(absmax) and max(absmax) > min(1e4, math.sqrt(limit))) or b.op in (
        "aten::exp",
        "aten::_to_copy",
    )


def domain_fix(b: Birth) -> str:
    template = DOMAIN_FIXES.get(
        (b.op or "").rstrip("_"), "keep its input inside the domain (clamp, add eps)."
    )
    def counted(n: Any, word: str, plural: str | None = None) -> str:
        return count(n, word, plural) if isinstance(n, int) else f"? {plural or word + 's'}"

    first = b.inputs[0] if b.inputs else {}
    zero_over_zero = b.extra.get("zero_over_zero")
    values: dict[str, Any] = {
        "divisor_zeros": counted(b.extra.get("divisor_zeros"), "zero"),
        "zero_over_zero": f"{zero_over_zero:,}" if isinstance(zero_over_zero, int) else "?",
        "zeros": counted(first.get("zeros", 0), "zero"),
        "negatives": counted(first.get("negatives", 0), "negative value"),
    }
    return fill(template, values)


def batchnorm_evidence(b: Birth) -> dict[str, Any] | None:
    names = (b.op or "", b.forward_op or "")
    if not any("batch_norm" in n for n in names):
        return None
    per_channel = b.extra.get("values_per_channel")
    zero_var = b.extra.get("zero_variance_channels")
    if per_channel is None:
        return {"line": "batch-norm statistics degenerate", "per_channel": "?"}
    if per_channel > 1 and not zero_var:
        return None
    return {
        "line": f"batch norm over {per_channel} value(s) per channel; {zero_var} of {b.extra.get('channels')} "
        "channel(s) with zero variance",
        "per_channel": per_channel,
    }


def top_grad_name(f: Facts) -> str | None:
    replay = f.replay
    if replay is None or not replay.grad_norms:
        return None
    return max(replay.grad_norms.items(), key=lambda kv: kv[1] if math.isfinite(kv[1]) else math.inf)[0]


def top_grad(f: Facts) -> str | None:
    name = top_grad_name(f)
    if name is None or f.replay is None:
        return None
    return f"largest gradient `{name}`: norm {fmt(f.replay.grad_norms[name])}"

