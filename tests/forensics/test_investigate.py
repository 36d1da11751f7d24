"""One injected fault per cause: replay it through ``investigate`` and check the verdict and where."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanguard.events import CAUSES, Diagnosis
from nanguard.forensics import Investigation, investigate
from tests.forensics.helpers import bad_step, closure_for
from tests.forensics.models import (
    CNN,
    MLP,
    BagClassifier,
    BNHead,
    FlakyOnFirstCall,
    GRUNet,
    TinyLM,
)


def diagnosed(request) -> Diagnosis:
    result = investigate(request)
    assert isinstance(result, Investigation)
    json.dumps(result.details, allow_nan=False)  # the event writer needs strict JSON
    assert result.diagnosis.cause in CAUSES
    assert result.diagnosis.evidence, "every verdict carries evidence"
    assert result.diagnosis.fixes, "every verdict carries fixes"
    return result.diagnosis


def mlp_case(x: torch.Tensor, y: torch.Tensor, **fields):
    model = MLP()
    opt = torch.optim.Adam(model.parameters())
    batch = {"x": x, "labels": y}
    closure = closure_for(model, opt, lambda: F.cross_entropy(model(batch["x"]), batch["labels"]))
    return model, opt, batch, closure


# ----------------------------------------------------------------------------------------- data
def test_nan_in_input_field_is_input_nonfinite() -> None:
    x, y = torch.randn(6, 4), torch.randint(0, 10, (6,))
    x[2, 1] = float("nan")
    model, opt, batch, closure = mlp_case(x, y)
    d = diagnosed(bad_step(model, opt, closure, batch))
    assert (d.cause, d.phase, d.tensor, d.module) == ("input_nonfinite", "data", "x", "fc1")
    assert "rows [2]" in d.evidence[0] and "first at [2, 1]" in d.evidence[0]  # which feature, not only the row


def test_label_equal_to_num_classes_raises_and_is_label_out_of_range() -> None:
    y = torch.randint(0, 10, (6,))
    y[3] = 10
    model, opt, batch, closure = mlp_case(torch.randn(6, 4), y)
    request = bad_step(model, opt, closure, batch)
    assert isinstance(request.exception, IndexError)
    d = diagnosed(request)
    assert (d.cause, d.phase, d.tensor, d.op) == (
        "label_out_of_range",
        "data",
        "labels",
        "aten::nll_loss_forward",
    )
    assert any("[0, 10)" in e and "[10]" in e for e in d.evidence)


def test_an_out_of_range_token_label_is_placed_at_its_row_and_position() -> None:
    """HF-style flattened loss: the evidence names [row, position] in the user's `labels`, not a flat index."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(12, 8), torch.nn.Linear(8, 12))
    opt = torch.optim.Adam(model.parameters())
    ids = torch.randint(0, 12, (3, 7))
    labels = ids.roll(-1, dims=1)
    labels[1, 5] = 12
    batch = {"input_ids": ids, "labels": labels}
    closure = closure_for(model, opt, lambda: F.cross_entropy(model(batch["input_ids"]).view(-1, 12),
                                                                batch["labels"].view(-1)))
    d = diagnosed(bad_step(model, opt, closure, batch))
    assert (d.cause, d.tensor) == ("label_out_of_range", "labels")
    assert any("at [row, position] [1, 5]" in line for line in d.evidence), d.evidence


def test_label_beyond_its_datasets_classes_with_masked_logits_does_not_raise() -> None:
    """Multi-dataset heads mask the classes a dataset lacks; a label past them gives inf, not an error."""
    model = MLP(classes=10)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 9, 4, 5])
    valid = torch.arange(10) < 8  # this dataset has 8 classes; row 3 says class 9

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x).masked_fill(~valid, float("-inf")), y)

    request = bad_step(model, None, closure_for(model, None, loss), {"x": x, "labels": y})
    assert request.exception is None
    d = diagnosed(request)
    assert (d.cause, d.phase, d.tensor) == ("label_out_of_range", "data", "labels")
    assert "label 9 >= 8 valid" in d.evidence[0]


def test_token_id_beyond_embedding_bag_is_label_out_of_range_on_the_token_field() -> None:
    model = BagClassifier(vocab=20)
    tokens, offsets, y = torch.tensor([1, 2, 20, 4, 5]), torch.tensor([0, 2]), torch.tensor([0, 1])
    batch = {"tokens": tokens, "offsets": offsets, "labels": y}
    closure = closure_for(model, None, lambda: F.cross_entropy(model(tokens, offsets), y))
    d = diagnosed(bad_step(model, None, closure, batch))
    assert (d.cause, d.tensor, d.module) == ("label_out_of_range", "tokens", "bag")
    assert any("token id 20 >= num_embeddings 20" in e for e in d.evidence)


def test_finite_huge_input_is_input_extreme_scale() -> None:
    x, y = torch.randn(6, 4) * 1e9, torch.randint(0, 10, (6,))
    model, opt, batch, closure = mlp_case(x, y)
    request = bad_step(
        model,
        opt,
        closure,
        batch,
        trigger="loss_spike",
        batch_scale_history={"x": [2.0, 2.4, 1.9, 2.2, 2.1]},
        loss_history=[2.3] * 30,
    )
    d = diagnosed(request)
    assert (d.cause, d.phase, d.tensor) == ("input_extreme_scale", "data", "x")


# ----------------------------------------------------------------------------------------- state
def test_weight_set_to_inf_is_weights_nonfinite_in_state() -> None:
    model, opt, batch, closure = mlp_case(torch.randn(5, 4), torch.randint(0, 10, (5,)))
    with torch.no_grad():
        model.fc2.weight[1, 2] = float("inf")
    d = diagnosed(bad_step(model, opt, closure, batch))
    assert (d.cause, d.phase, d.tensor, d.module) == ("weights_nonfinite", "state", "fc2.weight", "fc2")


def test_gru_weight_nan_names_the_recurrent_weight() -> None:
    model = GRUNet()
    x, y = torch.randn(2, 4, 3), torch.randn(2, 1)
    with torch.no_grad():
        model.gru.weight_hh_l0[0, 0] = float("nan")
    closure = closure_for(model, None, lambda: F.mse_loss(model(x), y))
    d = diagnosed(bad_step(model, None, closure, {"x": x, "y": y}))
    assert (d.cause, d.tensor, d.module) == ("weights_nonfinite", "gru.weight_hh_l0", "gru")


def test_adam_exp_avg_sq_nan_is_optimizer_state_nonfinite() -> None:
    model, opt, batch, closure = mlp_case(torch.randn(5, 4), torch.randint(0, 10, (5,)))
    closure()
    opt.step()
    opt.state[model.fc1.weight]["exp_avg_sq"][0, 0] = float("nan")
    d = diagnosed(bad_step(model, opt, closure, batch, trigger="nonfinite_weights"))
    assert (d.cause, d.phase, d.tensor, d.module) == (
        "optimizer_state_nonfinite",
        "state",
        "fc1.weight.exp_avg_sq",
        "fc1",
    )


def test_fp16_adam_with_tiny_eps_is_update_overflow() -> None:
    model = MLP(classes=3).half()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-8)
    x, y = (torch.randn(5, 4) * 0.01).half(), torch.randint(0, 3, (5,))
    closure = closure_for(model, opt, lambda: F.cross_entropy(model(x).float(), y) * 1e-3)
    request = bad_step(
        model,
        opt,
        closure,
        {"x": x, "labels": y},
        trigger="nonfinite_weights",
        update_made_weights_nonfinite=True,
    )
    d = diagnosed(request)
    assert (d.cause, d.phase) == ("update_overflow", "optimizer")
    assert d.tensor is not None and d.tensor.endswith(("weight", "bias"))
    assert any("eps=1e-08 rounds to 0 in float16" in e for e in d.evidence)


# ----------------------------------------------------------------------------------------- masking
def tiny_lm_case(mask: torch.Tensor, ids: torch.Tensor | None = None):
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 11, (4, 5)) if ids is None else ids
    labels = torch.randint(0, 11, (4, 5))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss() -> torch.Tensor:
        return F.cross_entropy(
            model(batch["input_ids"], batch["attention_mask"]).flatten(0, 1), labels.flatten()
        )

    return model, opt, batch, closure_for(model, opt, loss)


def test_all_masked_attention_row_points_at_softmax_in_the_attention_module() -> None:
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2] = False  # a padding-only sequence
    model, opt, batch, closure = tiny_lm_case(mask)
    d = diagnosed(bad_step(model, opt, closure, batch))
    assert (d.cause, d.phase, d.module, d.op) == (
        "masked_softmax_all_masked",
        "forward",
        "blocks.0.attn",
        "aten::_softmax",
    )
    assert d.reproducible is True
    assert any("batch rows [2]" in e for e in d.evidence)
    assert any("masked_fill" in e for e in d.evidence), "the -inf origin is named"


def test_target_logit_masked_to_minus_inf_is_masked_target_logit_in_loss() -> None:
    model = MLP(classes=10)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 3, 4, 5, 6])
    hole = torch.zeros(10, dtype=torch.bool)
    hole[3] = True  # class 3 masked, and row 2's target is 3

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x).masked_fill(hole, float("-inf")), y)

    request = bad_step(model, None, closure_for(model, None, loss), {"x": x, "labels": y})
    assert request.loss == float("inf")
    assert all(torch.isfinite(p.grad).all() for p in model.parameters()), "grads stay finite"
    d = diagnosed(request)
    assert (d.cause, d.phase, d.op, d.tensor) == (
        "masked_target_logit",
        "loss",
        "aten::nll_loss_forward",
        "labels",
    )
    assert d.module is None


# ----------------------------------------------------------------------------------------- math
class LogOfRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.feature = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.body(x)).sum()


def test_log_of_zero_is_invalid_math_domain_at_aten_log() -> None:
    model = LogOfRelu()
    x = torch.randn(6, 4)
    d = diagnosed(bad_step(model, None, closure_for(model, None, lambda: model(x)), {"x": x}))
    assert (d.cause, d.phase, d.op, d.module) == ("invalid_math_domain", "forward", "aten::log", "")
    assert re.search(r"its input had [\d,]+ zeros? and 0 negative values;", d.fixes[0]), d.fixes[0]  # real plurals


def test_masked_mean_zero_over_zero_is_invalid_math_domain_at_aten_div_in_loss() -> None:
    model, opt, batch, _ = mlp_case(torch.randn(6, 4), torch.randint(0, 10, (6,)))

    def loss() -> torch.Tensor:
        per_token = F.cross_entropy(model(batch["x"]), batch["labels"], reduction="none")
        mask = torch.zeros(6)  # every position masked out
        return (per_token * mask).sum() / mask.sum()

    d = diagnosed(bad_step(model, opt, closure_for(model, opt, loss), batch))
    assert (d.cause, d.phase, d.op, d.module) == ("invalid_math_domain", "loss", "aten::div", None)
    assert any("1 zero divisor (1 of them 0/0)" in e for e in d.evidence)


class NormOfPadding(nn.Module):
    """sqrt(sum x^2) of a zero (padding) row: finite forward, infinite derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.pool = Pool()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.pool(self.proj(x) * mask[:, None]).sum()


class Pool(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((h * h).sum(-1))


def test_sqrt_at_zero_is_backward_singularity_attributed_to_forward_op_and_module() -> None:
    model = NormOfPadding()
    x, mask = torch.randn(6, 4), torch.ones(6)
    mask[4] = 0
    request = bad_step(model, None, closure_for(model, None, lambda: model(x, mask)), {"x": x, "mask": mask})
    assert request.trigger == "nonfinite_grad"
    d = diagnosed(request)
    assert (d.cause, d.phase, d.op, d.module) == ("backward_singularity", "backward", "aten::sqrt", "pool")


class WhereSqrt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return torch.where(h > 0, torch.sqrt(h), torch.zeros_like(h)).sum()


def test_where_branch_nan_is_backward_singularity_at_the_discarded_op() -> None:
    model = WhereSqrt()
    x = torch.randn(5, 4)
    d = diagnosed(bad_step(model, None, closure_for(model, None, lambda: model(x)), {"x": x}))
    assert (d.cause, d.phase, d.op, d.module) == ("backward_singularity", "backward", "aten::sqrt", "")


def test_fp16_matmul_overflow_finite_in_fp32_is_forward_overflow() -> None:
    model = MLP(d_in=16, hidden=16, classes=4).half()
    with torch.no_grad():
        model.fc1.weight.fill_(1.0)
    x, y = (torch.rand(8, 16) * 1000 + 4500).half(), torch.randint(0, 4, (8,))  # 16 * 5000 > 65504
    closure = closure_for(model, None, lambda: F.cross_entropy(model(x).float(), y))
    d = diagnosed(bad_step(model, None, closure, {"x": x, "labels": y}))
    assert (d.cause, d.phase, d.module, d.op) == ("forward_overflow", "forward", "fc1", "aten::addmm")
    assert any("float32 replay" in e and "gradients finite" in e for e in d.evidence)


def test_autocast_fp16_overflow_is_forward_overflow() -> None:
    model = MLP(d_in=16, hidden=16, classes=4)
    with torch.no_grad():
        model.fc1.weight.fill_(1.0)
    x, y = torch.rand(8, 16) * 1000 + 4500, torch.randint(0, 4, (8,))

    def loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        return F.cross_entropy(out.float(), y)

    d = diagnosed(bad_step(model, None, closure_for(model, None, loss), {"x": x, "labels": y}))
    assert (d.cause, d.module) == ("forward_overflow", "fc1")


def test_fp16_gradient_overflow_finite_in_fp32_is_backward_overflow() -> None:
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).half()
    with torch.no_grad():
        model[2].weight.fill_(1.0)
    x = torch.randn(8, 16).half()
    closure = closure_for(model, None, lambda: model(x).float().sum() * 60000.0)  # like a large loss scale
    d = diagnosed(bad_step(model, None, closure, {"x": x}))
    assert (d.cause, d.phase, d.module, d.op) == ("backward_overflow", "backward", "2", "aten::addmm")


def test_batchnorm_with_one_sample_is_batchnorm_degenerate() -> None:
    model = BNHead()
    x, y = torch.randn(1, 4), torch.tensor([1])
    closure = closure_for(model, None, lambda: F.cross_entropy(model(x), y))
    d = diagnosed(bad_step(model, None, closure, {"x": x, "labels": y}))
    assert (d.cause, d.module) == ("batchnorm_degenerate", "bn")


def test_batchnorm_without_eps_on_constant_input_is_batchnorm_degenerate() -> None:
    model = CNN()
    model.bn.eps = 0.0
    x, y = torch.zeros(2, 1, 5, 5), torch.tensor([0, 1])  # constant input: zero batch variance
    closure = closure_for(model, None, lambda: F.cross_entropy(model(x), y))
    d = diagnosed(bad_step(model, None, closure, {"x": x, "labels": y}))
    assert (d.cause, d.module) == ("batchnorm_degenerate", "bn")


# ----------------------------------------------------------------------------------------- replay
def test_fault_on_first_call_only_is_nondeterministic() -> None:
    model = FlakyOnFirstCall()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    closure = closure_for(model, None, lambda: F.cross_entropy(model(x), y))
    request = bad_step(model, None, closure, {"x": x, "labels": y})
    assert request.trigger == "nonfinite_loss"
    d = diagnosed(request)
    assert d.cause == "nondeterministic"
    assert d.reproducible is False


def test_dropout_replay_is_faithful_so_a_deterministic_fault_still_reproduces() -> None:
    """With RNG restored, a dropout model's real fault replays and is not mistaken for a transient."""
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1] = False
    model, opt, batch, closure = tiny_lm_case(mask)
    model.drop.p = 0.5
    d = diagnosed(bad_step(model, opt, closure, batch))
    assert d.cause == "masked_softmax_all_masked"
    assert d.reproducible is True


# ----------------------------------------------------------------------------------------- spikes
def gru_case(scale: float = 1.0):
    model = GRUNet()
    x, y = torch.randn(2, 4, 3), torch.randn(2, 1)
    return model, {"x": x, "y": y}, closure_for(model, None, lambda: F.mse_loss(model(x), y) * scale)


def test_grad_spike_is_gradient_explosion_naming_the_largest_gradient() -> None:
    model, batch, closure = gru_case(scale=1e4)
    request = bad_step(
        model,
        None,
        closure,
        batch,
        trigger="grad_spike",
        grad_norm_history=[1.0] * 20,
        spike_stats={"grad_mean": 1.0, "grad_std": 0.1},
    )
    d = diagnosed(request)
    assert (d.cause, d.phase) == ("gradient_explosion", "backward")
    assert d.tensor in {name for name, _ in model.named_parameters()}


def test_loss_spike_with_data_in_range_is_loss_spike() -> None:
    model, batch, closure = gru_case()
    d = diagnosed(
        bad_step(
            model,
            None,
            closure,
            batch,
            trigger="loss_spike",
            loss_history=[0.01] * 20,
            batch_scale_history={"x": [2.0] * 5, "y": [2.0] * 5},
        )
    )
    assert (d.cause, d.phase, d.reproducible) == ("loss_spike", "loss", True)


def test_divergence_quotes_the_trend_and_lr() -> None:
    model, batch, closure = gru_case()
    history = [0.1 + 0.01 * i for i in range(100)]
    d = diagnosed(bad_step(model, None, closure, batch, trigger="divergence", loss_history=history, lr=0.1))
    assert d.cause == "divergence"
    assert any(e == "lr 0.1" for e in d.evidence)


@pytest.mark.parametrize("trigger", ["nonfinite_loss", "nonfinite_grad"])
def test_finite_replay_of_a_non_finite_trigger_is_never_blamed_on_data(trigger: str) -> None:
    model, batch, closure = gru_case()
    d = diagnosed(bad_step(model, None, closure, batch, trigger=trigger))
    assert d.cause == "nondeterministic"
