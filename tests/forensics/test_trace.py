"""The operator tracer on its own: births, attribution to modules and forward ops, loss targets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nanguard.forensics.trace import OpTracer, class_target_stats, root_of
from tests.forensics.models import MLP, TinyLM


def test_mask_fill_is_an_intended_inf_birth_and_parent_of_the_softmax_nan() -> None:
    model = TinyLM()
    ids = torch.randint(0, 11, (3, 4))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    with OpTracer([model], {"input_ids": ids}) as tracer:
        loss = model(ids, mask).sum()
    fill = next(b for b in tracer.births if b.op == "aten::masked_fill")
    assert fill.kind == "inf" and fill.intended and fill.module == "blocks.0.attn"
    nan = next(b for b in tracer.births if b.kind == "nan")
    assert (nan.op, nan.module, nan.phase, nan.parent) == (
        "aten::_softmax",
        "blocks.0.attn",
        "forward",
        fill.index,
    )
    assert nan.extra["batch_rows_all_masked"] == [1]
    assert tracer.origin_of(loss) is nan
    assert root_of(tracer.births, nan) is nan, "the walk back stops at a deliberate fill"


def test_nan_from_an_accidental_inf_walks_back_to_the_inf() -> None:
    x = torch.tensor([0.0, 1.0])
    with OpTracer([]) as tracer:
        y = torch.log(x)  # -inf
        z = y - y  # -inf - -inf = nan
    log = next(b for b in tracer.births if b.op == "aten::log")
    sub = next(b for b in tracer.births if b.op == "aten::sub")
    assert (log.kind, sub.kind, sub.parent) == ("inf", "nan", log.index)
    assert root_of(tracer.births, tracer.origin_of(z)) is log


def test_backward_birth_is_attributed_to_forward_op_and_module() -> None:
    class Pool(nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return torch.sqrt((h * h).sum(-1))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 4)
            self.pool = Pool()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pool(self.proj(x) * torch.tensor([1.0, 0.0])[:, None]).sum()

    net = Net()
    with OpTracer([net]) as tracer:
        net(torch.randn(2, 3)).backward()
    backward = [b for b in tracer.births if b.phase == "backward"]
    assert backward, "the infinite derivative of sqrt at 0 is seen in backward"
    first = backward[0]
    assert (first.forward_op, first.module, first.backward_node) == ("aten::sqrt", "pool", "SqrtBackward0")
    assert first.extra["divisor_zeros"] == 1


def test_write_only_arguments_are_not_inputs() -> None:
    out = torch.full((2,), float("nan"))  # stale contents of an out= buffer
    with OpTracer([]) as tracer:
        torch.log(torch.zeros(2), out=out)
    assert [(b.kind, b.op) for b in tracer.births] == [("inf", "aten::log")]


def test_in_place_op_compares_against_its_input_before_the_write() -> None:
    with OpTracer([]) as tracer:
        h = torch.zeros(3)
        h.log_()
    assert [(b.kind, b.op) for b in tracer.births] == [("inf", "aten::log_")]


def test_allocation_ops_are_not_births() -> None:
    with OpTracer([]) as tracer:
        buf = torch.empty(1000)
        buf.fill_(2.0)
        (buf * 3).sum()
    assert tracer.births == []


def test_loss_op_records_targets_even_when_labels_are_not_batch_fields() -> None:
    model = MLP(classes=5)
    x = torch.randn(4, 4)
    targets = torch.tensor([0, 1, -100, 4])
    with OpTracer([model], {"x": x}) as tracer:
        F.cross_entropy(model(x), targets).backward()
    (record,) = tracer.loss_ops
    assert record["op"] == "aten::nll_loss_forward" and record["phase"] == "loss" and record["module"] is None
    assert (record["num_classes"], record["out_of_range"], record["field"]) == (5, 0, None)


def test_module_stats_report_activation_and_gradient_scale_with_dtype() -> None:
    model = MLP()
    x = torch.randn(4, 4) * 100
    with OpTracer([model], {"x": x}) as tracer:
        model(x).sum().backward()
    stats = {name: s.to_dict() for name, s in tracer.module_stats.items()}
    fc1 = stats["fc1"]
    with torch.no_grad():
        expected = float(model.fc1(x).abs().max())
    assert math.isclose(fc1["act_absmax"], expected, rel_tol=1e-5)
    assert fc1["dtype"] == "float32" and fc1["grad_absmax"] > 0 and fc1["nonfinite"] == 0


def test_exception_context_keeps_the_failing_module_stack() -> None:
    model = MLP(classes=3)
    with OpTracer([model]) as tracer:
        try:
            F.cross_entropy(model(torch.randn(2, 4)), torch.tensor([0, 7]))
        except IndexError:
            pass
    assert tracer.error_context is not None
    assert tracer.error_context["op"] == "aten::nll_loss_forward"
    assert tracer.loss_ops[0]["out_of_range_values"] == [7]


def test_tracer_removes_its_hooks() -> None:
    model = MLP()
    with OpTracer([model]):
        model(torch.randn(1, 4))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@settings(max_examples=40, deadline=None)
@given(
    classes=st.integers(2, 6),
    targets=st.lists(st.integers(-3, 8), min_size=1, max_size=8),
    masked_class=st.integers(0, 5),
)
def test_class_target_stats_counts_match_a_direct_count(
    classes: int, targets: list[int], masked_class: int
) -> None:
    logits = torch.randn(len(targets), classes)
    if masked_class < classes:
        logits[:, masked_class] = -math.inf
    logp = torch.log_softmax(logits, dim=1)
    stats = class_target_stats(logp, torch.tensor(targets), ignore_index=-1)
    out = [t for t in targets if t != -1 and not 0 <= t < classes]
    masked = [t for t in targets if t == masked_class and t < classes]
    assert stats["out_of_range"] == len(out)
    assert stats["out_of_range_values"] == sorted(set(out))
    assert stats["masked_targets"] == len(masked)


def test_module_stats_never_count_an_intended_mask_fill() -> None:
    """A ``masked_fill(-inf)`` the user asked for is not a non-finite output of the module that made it."""
    from nanguard.forensics.trace import OpTracer

    class Masker(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.masked_fill(x < 0, float("-inf"))

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Masker())
    x = torch.randn(3, 4)
    with OpTracer([model], {"x": x}, None) as tracer:
        model(x).exp().sum()
    stats = {name: s.to_dict() for name, s in tracer.module_stats.items()}
    assert stats["1"]["forward_nonfinite"] == 0 and stats["1"]["backward_nonfinite"] == 0
