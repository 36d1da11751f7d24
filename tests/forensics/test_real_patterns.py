"""Patterns of training code as practitioners write it (issue 11), each run under a Guard in plain PyTorch.

Each test reproduces one way 0.1's forensics went wrong on real scripts: an input outlier pushing a fragile
op past its domain was blamed on the data and the birth dropped; after five events the budget ran out and
every later event of the same fault was ``unknown``.
"""

from __future__ import annotations

import torch
from torch import nn

import nanguard
from tests.conftest import load_schema, read_events


def _mlp(outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, outputs))


def test_outlier_into_handwritten_bce_log_is_the_log_with_the_outlier_contributing(tmp_path):
    model = _mlp(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    for step in range(32):
        x = torch.randn(16, 8)
        y = (x[:, 0] > 0).float()
        if step == 30:
            x[7] = 1e4  # one row far out of range saturates the sigmoid: log(1 - 1) = -inf
        p = torch.sigmoid(model(x).squeeze(-1))
        loss = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    guard.close()
    events = read_events(tmp_path)
    assert [e["step"] for e in events] == [30]
    d = events[0]["diagnosis"]
    assert (d["cause"], d["phase"], d["op"]) == ("invalid_math_domain", "loss", "aten::log")
    assert [c["cause"] for c in d["contributing"]] == ["input_extreme_scale"]
    assert d["contributing"][0]["tensor"] == "x"
    assert "log" in d["fixes"][0]  # the op's fix leads; the outlier's follows
    assert any("Normalise batch field `x`" in fix for fix in d["fixes"][1:])


def _log_of_zero_run(tmp_path, steps: int, **config) -> list[dict]:
    """A loss ``-log(p[:, 2])`` whose class-2 probability is zeroed on every other step from step 4."""
    model = _mlp(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False, **config)
    for step in range(steps):
        x = torch.randn(16, 8)
        if step == steps - 1:
            x[3, 1] = float("nan")  # a different fault at the end: a new signature, investigated
        p = torch.softmax(model(x), -1)
        if step >= 4 and step % 2 == 0:
            p = p * (torch.arange(4) != 2)
        loss = -torch.log(p[:, 2]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    guard.close()
    return read_events(tmp_path)


def test_36_repeated_log_of_zero_events_all_carry_the_investigated_diagnosis(tmp_path):
    events = _log_of_zero_run(tmp_path, steps=4 + 72 + 1, forensics_max_events=2)
    repeated, last = events[:-1], events[-1]
    assert len(repeated) == 36
    causes = {(e["diagnosis"]["cause"], e["diagnosis"]["op"]) for e in repeated}
    assert causes == {("invalid_math_domain", "aten::log")}
    assert repeated[0]["diagnosis"]["same_as_step"] is None
    assert {e["diagnosis"]["same_as_step"] for e in repeated[1:]} == {4}
    assert "was not replayed" in repeated[1]["diagnosis"]["evidence"][0]
    assert repeated[1]["diagnosis"]["reproducible"] is None  # nothing was re-run at that step
    # Only the new signature spent the rest of the budget: the NaN input is investigated, not carried.
    assert (last["diagnosis"]["cause"], last["diagnosis"]["tensor"]) == ("input_nonfinite", "x")
    assert last["diagnosis"]["same_as_step"] is None
    assert last["diagnosis"]["module"] == "0"  # the replay found its first user: only a replay knows that
    import jsonschema

    for event in events:
        jsonschema.validate(event, load_schema())


class _Attention(nn.Module):
    """One attention layer whose key mask can leave a row with nothing to attend to."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 16)
        self.qkv = nn.Linear(16, 48)
        self.head = nn.Linear(16, 11)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.emb(ids)).chunk(3, dim=-1)
        scores = (q @ k.transpose(-1, -2) / 4).masked_fill(~mask[:, None, :], float("-inf"))
        return self.head(torch.softmax(scores, dim=-1) @ v)


def test_compiled_model_is_replayed_eagerly_through_orig_mod(tmp_path):
    """0.1 saw no call of the watched module under torch.compile: a confident ``input_nonfinite`` on 'self'."""
    model = _Attention()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    compiled = torch.compile(model, backend="eager")  # the OptimizedModule path, without inductor's compile time
    for step in range(6):
        ids = torch.randint(0, 11, (4, 6))
        mask = torch.ones(4, 6, dtype=torch.bool)
        if step == 5:
            mask[2] = False
        loss = nn.functional.cross_entropy(compiled(ids, mask).reshape(-1, 11), ids.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    guard.close()
    events = read_events(tmp_path)
    assert [e["step"] for e in events] == [5]
    d = events[0]["diagnosis"]
    assert (d["cause"], d["phase"], d["op"], d["tensor"]) == ("masked_softmax_all_masked", "forward",
                                                              "aten::_softmax", "mask")
    assert any("ran its original module (`_orig_mod`) eagerly" in line for line in d["evidence"])
    assert events[0]["details"]["replay_mode"] == "eager"
    stats = {m["module"]: m for m in events[0]["details"]["module_stats"]}
    assert stats[""]["role"] == "birth"  # the softmax ran in the root module's forward
    assert stats[""]["forward_nonfinite"] >= 1 and stats["emb"]["forward_nonfinite"] == 0
    assert stats["head"]["role"] == "downstream"


def test_two_roots_gru_and_head_replay_a_masked_mean_over_an_all_padding_batch(tmp_path):
    """0.1 replayed nothing when the optimizer held two root modules (and named the GRU's output as batch data)."""
    rnn, head = nn.GRU(4, 8, batch_first=True), nn.Linear(8, 1)
    opt = torch.optim.Adam(list(rnn.parameters()) + list(head.parameters()), lr=1e-3)
    guard = nanguard.Guard([rnn, head], opt, out_dir=tmp_path, console=False, report=False)
    for step in range(8):
        x, lengths = torch.rand(6, 5, 4), torch.randint(1, 6, (6,))
        if step == 7:
            lengths[:] = 0  # every sequence is padding: the masked mean is 0/0
        mask = (torch.arange(5)[None] < lengths[:, None]).float()
        out, _ = rnn(x)
        loss = ((head(out).squeeze(-1) - 1) ** 2 * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    guard.close()
    events = read_events(tmp_path)
    assert [e["step"] for e in events] == [7]
    d = events[0]["diagnosis"]
    assert (d["cause"], d["phase"], d["op"]) == ("invalid_math_domain", "loss", "aten::div")
    assert "clamp_min(1)" in d["fixes"][0]
    assert not any("micro1" in line for line in d["evidence"])  # the GRU's output is not a batch field


def test_three_calls_per_step_kl_div_with_zeros_in_a_target_that_requires_grad(tmp_path):
    """Consistency training: model(weak), model(strong), model(x) in one loss; NaN born in kl_div's backward."""
    model = _mlp(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    for step in range(8):
        x = torch.randn(8, 8)
        weak, strong = x + 0.1 * torch.randn_like(x), x + 0.5 * torch.randn_like(x)
        target = torch.softmax(model(weak), -1)
        if step == 7:
            target = target * (torch.arange(4) != 1)  # exact zeros in a target that requires grad
        log_probs = torch.log_softmax(model(strong), -1)
        loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 4, (8,)))
        loss = loss + torch.nn.functional.kl_div(log_probs, target, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    guard.close()
    events = read_events(tmp_path)
    assert [e["step"] for e in events] == [7]
    d = events[0]["diagnosis"]
    assert (d["cause"], d["phase"], d["op"]) == ("backward_singularity", "backward", "aten::xlogy")
    assert "target" in d["fixes"][0] and "detach" in d["fixes"][0]


def test_eigh_with_repeated_eigenvalues_is_born_in_its_backward(tmp_path):
    """0.1 said "born at constant [input] ... discarded by torch.where", op null: the forward is finite."""
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    for step in range(7):
        x = torch.randn(16, 4)
        h = model(x)
        if step == 6:
            h = h * 0 + torch.nn.functional.pad(torch.randn(16, 1), (0, 3))  # rank one: eigenvalue 0 three times
        eigenvalues, eigenvectors = torch.linalg.eigh(h.T @ h / 16)
        loss = eigenvectors[:, -1].abs().sum() + 0.01 * eigenvalues.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    guard.close()
    events = read_events(tmp_path)
    assert [e["step"] for e in events] == [6]
    d = events[0]["diagnosis"]
    assert (d["cause"], d["phase"]) == ("backward_singularity", "backward")
    assert d["op"] in ("aten::linalg_eigh", "aten::_linalg_eigh")
    assert "repeated eigenvalues" in d["fixes"][0]
    assert not any("torch.where" in line for line in d["evidence"])


class _LogSoftmaxByHand(nn.Module):
    """``log(softmax(x))`` written by hand inside the model, as pytorch/examples-style code sometimes does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.softmax(self.fc(x), dim=-1))


def test_forward_log_of_zero_dropped_by_nll_is_born_in_forward_not_a_mask_fill(tmp_path):
    """0.1 treated log(0) = -inf like a mask fill and reported the birth in LogBackward0 ("add an eps")."""
    model = _LogSoftmaxByHand()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = nanguard.Guard(model, opt, out_dir=tmp_path, console=False, report=False)
    for step in range(6):
        x = torch.randn(16, 8)
        if step == 5:
            x = x * 1e4  # saturates the softmax: the non-target probabilities underflow to exactly 0
        with torch.no_grad():
            y = model.fc(x).argmax(-1)  # the loss picks the finite entries: it stays finite
        loss = torch.nn.functional.nll_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    guard.close()
    events = read_events(tmp_path)
    assert [e["step"] for e in events] == [5]
    d = events[0]["diagnosis"]
    assert (d["cause"], d["phase"], d["module"], d["op"]) == ("invalid_math_domain", "forward", "", "aten::log")
    assert "log_softmax" in d["fixes"][0]


def test_a_replay_that_crashed_never_claims_the_fault_reproduced():
    """0.1 wrote ``reproducible: true`` when the replay itself raised (a crash is not a reproduction)."""
    from nanguard.forensics import investigate
    from tests.forensics.helpers import bad_step

    model = _mlp(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 8)
    calls = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        if calls[0] > 1:
            raise RuntimeError("the data loader's iterator is exhausted")  # only the replay fails
        opt.zero_grad()
        loss = model(x).sum() * float("nan")
        loss.backward()
        return loss

    d = investigate(bad_step(model, opt, closure, {"x": x})).diagnosis
    assert d.reproducible is None
    assert not any("no non-finite op in the replay" in line for line in d.evidence)


def test_a_replay_that_re_ran_nothing_is_not_called_nondeterministic():
    """A recorded step whose backward was not captured re-runs nothing: finite "because empty", not flaky."""
    from nanguard.forensics import investigate
    from tests.forensics.helpers import bad_step

    model = _mlp(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 8)
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] > 1:
            return None  # the replay of a step whose loss and backward were never recorded
        opt.zero_grad()
        loss = model(x).sum() * float("nan")
        loss.backward()
        return loss

    d = investigate(bad_step(model, opt, closure, {"x": x})).diagnosis
    assert d.cause == "unknown"
    assert d.reproducible is None
    assert any("reproduced nothing" in line for line in d.evidence)
