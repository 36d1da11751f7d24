"""investigate() must leave the run exactly as it found it, and must never raise."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from nanguard.forensics import InvestigationRequest, StepCapture, investigate
from tests.forensics.helpers import bad_step, closure_for
from tests.forensics.models import CNN, MLP, TinyLM


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8).clone()


def snapshot(models, optimizer, scaler=None) -> dict:
    out: dict = {"tensors": {}, "ids": {}}
    for i, model in enumerate(models):
        for name, p in model.named_parameters():
            out["tensors"][f"{i}.{name}"] = (bits(p), p.dtype, p.data_ptr())
            out["ids"][f"{i}.{name}"] = id(p)
            if p.grad is not None:
                out["tensors"][f"{i}.{name}.grad"] = (bits(p.grad), p.grad.dtype, p.grad.data_ptr())
                out["ids"][f"{i}.{name}.grad"] = id(p.grad)
            else:
                out["ids"][f"{i}.{name}.grad"] = None
        for name, b in model.named_buffers():
            out["tensors"][f"{i}.buffer.{name}"] = (bits(b), b.dtype, b.data_ptr())
        out[f"training{i}"] = [m.training for m in model.modules()]
    if optimizer is not None:
        for j, (p, state) in enumerate(optimizer.state.items()):
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    out["tensors"][f"opt.{j}.{key}"] = (bits(value), value.dtype, value.data_ptr())
                    out["ids"][f"opt.{j}.{key}"] = id(value)
            out["ids"][f"opt.{j}.param"] = id(p)
        out["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if scaler is not None:
        out["scaler"] = (float(scaler.get_scale()), scaler.state_dict())
    out["rng"] = (bytes(torch.get_rng_state().numpy()), random.getstate(), np.random.get_state()[1].tolist())
    return out


def assert_same(before: dict, after: dict) -> None:
    assert before["ids"] == after["ids"]
    assert before.keys() == after.keys()
    for key, (b, dtype, ptr) in before["tensors"].items():
        a, a_dtype, a_ptr = after["tensors"][key]
        assert a_dtype == dtype, key
        assert a_ptr == ptr, f"{key} moved"
        assert torch.equal(a, b), f"{key} changed"
    for key in before:
        if key not in ("tensors", "ids"):
            assert before[key] == after[key], key


def test_investigate_leaves_params_grads_buffers_optimizer_and_rng_bitwise_untouched() -> None:
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2] = False
    model = TinyLM(dropout=0.3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, labels = torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (4, 5))
    good = torch.ones(4, 5, dtype=torch.bool)
    closure = closure_for(
        model, opt, lambda: F.cross_entropy(model(ids, good).flatten(0, 1), labels.flatten())
    )
    closure()
    opt.step()  # real optimizer state
    bad = closure_for(model, opt, lambda: F.cross_entropy(model(ids, mask).flatten(0, 1), labels.flatten()))
    request = bad_step(model, opt, bad, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    torch.rand(3)  # the RNG has moved on since the step: a replay must not rewind it
    random.random()
    np.random.rand()
    before = snapshot([model], opt)
    result = investigate(request)
    assert result.diagnosis.cause == "masked_softmax_all_masked"
    assert_same(before, snapshot([model], opt))


def test_batchnorm_buffers_and_train_flags_survive_replays() -> None:
    model = CNN()
    x, y = torch.randn(3, 1, 5, 5), torch.tensor([0, 1, 2])
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    closure = closure_for(model, None, lambda: F.cross_entropy(model(x), y))
    request = bad_step(model, None, closure, {"x": x, "labels": y})
    before = snapshot([model], None)
    result = investigate(request)
    assert result.diagnosis.cause == "weights_nonfinite"
    assert_same(before, snapshot([model], None))


def test_fp32_counterfactual_puts_half_precision_weights_and_batch_back() -> None:
    model = MLP(d_in=16, hidden=16, classes=4).half()
    with torch.no_grad():
        model.fc1.weight.fill_(1.0)
    x, y = (torch.rand(8, 16) * 1000 + 4500).half(), torch.randint(0, 4, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    closure = closure_for(model, opt, lambda: F.cross_entropy(model(x).float(), y))
    request = bad_step(model, opt, closure, {"x": x, "labels": y}, scaler=scaler)
    x_before = bits(x)
    before = snapshot([model], opt, scaler)
    result = investigate(request)
    assert result.diagnosis.cause == "forward_overflow"
    assert "float32" in [r["label"] for r in result.details["replays"]]
    assert_same(before, snapshot([model], opt, scaler))
    assert x.dtype == torch.float16 and torch.equal(bits(x), x_before)


def test_investigate_never_raises_and_says_what_failed() -> None:
    model = MLP()

    def broken() -> torch.Tensor:
        raise RuntimeError("user closure exploded")

    class Weird(torch.nn.Module):
        def named_parameters(self, *args, **kwargs):  # type: ignore[override]
            raise RuntimeError("cannot list parameters")

    request = InvestigationRequest(
        step=3,
        trigger="nonfinite_loss",
        models=[model],
        optimizer=None,
        capture=StepCapture(rerun=broken, batch={"x": torch.randn(2, 4)}),
    )
    result = investigate(request)
    assert result.diagnosis.cause == "unknown"
    assert any("user closure exploded" in e for e in result.diagnosis.evidence)

    weird = InvestigationRequest(step=0, trigger="nonfinite_loss", models=[Weird()], optimizer=None)
    result = investigate(weird)
    assert result.diagnosis.cause == "unknown"
    assert any("cannot list parameters" in e for e in result.diagnosis.evidence)


def test_no_capture_still_runs_state_checks() -> None:
    model = MLP()
    with torch.no_grad():
        model.fc1.bias[0] = float("nan")
    request = InvestigationRequest(step=0, trigger="nonfinite_weights", models=[model], optimizer=None)
    d = investigate(request).diagnosis
    assert (d.cause, d.tensor) == ("weights_nonfinite", "fc1.bias")
