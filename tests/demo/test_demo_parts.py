"""The demo's pieces, without a full run: data, model, faults, schedule and the summary wording."""

from __future__ import annotations

import io
import itertools
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanguard.cli import main as cli_main
from nanguard.demo import MIN_STEPS
from nanguard.demo.faults import (
    ALL_PADDING,
    CORRUPT_WEIGHT,
    CORRUPTED_MODULE,
    LR_SPIKE,
    NAN_IN_DATA,
    FaultPlan,
)
from nanguard.demo.model import ModelConfig, TinyLM
from nanguard.demo.run import one_thread
from nanguard.demo.summary import guarded_line, nearest_fault, unguarded_line
from nanguard.demo.task import PAD_ID, VOCAB, decode, make_batches
from nanguard.demo.train import RunResult, Settings, schedule, train


def _model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(ModelConfig(vocab_size=len(VOCAB), seq_len=16))


def test_batches_are_deterministic_and_well_formed() -> None:
    first, again, other = (make_batches(seed, 3, 4, 16) for seed in (5, 5, 6))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, other, strict=True))
    batch = first[0]
    assert torch.equal(batch.input_ids[:, 1:], batch.labels[:, :-1])  # labels are the inputs shifted by one
    assert bool((batch.attention_mask.sum(1) > 0).all())  # no row is empty in clean data
    assert torch.equal(batch.loss_mask, (batch.labels != PAD_ID).float())
    text = decode(batch.input_ids[0].tolist()).rstrip("_")
    for problem in filter(None, text.split(";")[:-1]):
        left, answer = problem.split("=")
        a, b = left.split("+")
        assert int(a) + int(b) == int(answer)


def test_data_faults_strike_only_at_their_step_and_leave_the_clean_batch_alone() -> None:
    plan = FaultPlan.spread_over(100)
    clean = make_batches(0, 1, 4, 16)[0]
    before = clean.clone()

    padded, kind = plan.batch_for(plan.all_padding_step, clean)
    assert kind == ALL_PADDING
    assert int(padded.attention_mask[0].sum()) == 0 and bool((padded.attention_mask[1:].sum(1) > 0).all())

    poisoned, kind = plan.batch_for(plan.nan_in_data_step, clean)
    assert kind == NAN_IN_DATA
    assert int(poisoned.loss_mask.isnan().sum()) == 1

    same, kind = plan.batch_for(plan.all_padding_step + 1, clean)
    assert kind is None and same is clean
    assert all(torch.equal(a, b) for a, b in zip(clean.as_dict().values(), before.as_dict().values(), strict=True))


@torch.no_grad()
def test_each_fault_really_breaks_an_unprotected_step() -> None:
    """Without these the demo would prove nothing: each fault must make the plain loss or weights non-finite."""
    plan = FaultPlan.spread_over(100)
    model = _model()
    clean = make_batches(0, 1, 4, 16)[0]
    assert math.isfinite(float(model(**clean.as_dict())))
    for step in (plan.all_padding_step, plan.nan_in_data_step):
        batch, _ = plan.batch_for(step, clean)
        assert math.isnan(float(model(**batch.as_dict())))

    assert plan.corrupt_weights(plan.corrupt_weight_step - 1, model) is None
    assert plan.corrupt_weights(plan.corrupt_weight_step, model) == CORRUPT_WEIGHT
    weight = model.get_submodule(CORRUPTED_MODULE).weight
    assert int(torch.isinf(weight).sum()) == 1
    assert not math.isfinite(float(model(**clean.as_dict())))


def test_buggy_schedule_multiplies_the_lr_only_in_its_window() -> None:
    plan = FaultPlan.spread_over(100)
    intended = schedule(Settings(steps=100))
    buggy = plan.buggy(intended)
    spiked = [s for s in range(100) if buggy(s) != intended(s)]
    assert spiked == list(range(plan.lr_spike_step, plan.lr_spike_step + plan.lr_spike_steps))
    assert buggy(plan.lr_spike_step) == pytest.approx(100 * intended(plan.lr_spike_step))
    assert FaultPlan.none().faults() == [] and not any(FaultPlan.none().lr_is_spiked(s) for s in range(100))


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=MIN_STEPS, max_value=100_000))
def test_fault_plan_fits_any_allowed_run_length(steps: int) -> None:
    """After warm-up (the spike after the guard's 25-step statistics warm-up), in order, apart, with room to recover."""
    plan = FaultPlan.spread_over(steps)
    order = [plan.all_padding_step, plan.nan_in_data_step, plan.lr_spike_step, plan.corrupt_weight_step]
    assert order[0] >= 20 and plan.lr_spike_step >= 40
    assert all(later - earlier >= 6 for earlier, later in itertools.pairwise(order))
    assert steps - plan.corrupt_weight_step >= 10
    assert [f.kind for f in plan.faults()] == [ALL_PADDING, NAN_IN_DATA, LR_SPIKE, CORRUPT_WEIGHT]


def test_training_is_deterministic() -> None:
    tiny = Settings(steps=4, batch_size=4, seq_len=16, eval_batches=1)
    threads = torch.get_num_threads()
    with one_thread():
        first, second = train(tiny, FaultPlan.none()), train(tiny, FaultPlan.none())
    assert torch.get_num_threads() == threads  # the demo leaves the process's setting as it found it
    assert first.losses == second.losses and first.eval_loss == second.eval_loss
    assert all(map(math.isfinite, first.losses))


def test_events_are_matched_to_the_newest_fault_injected_just_before() -> None:
    injected = [(30, ALL_PADDING), (42, NAN_IN_DATA), (56, LR_SPIKE)]
    assert nearest_fault(30, injected) == (30, ALL_PADDING)
    assert nearest_fault(57, injected) == (56, LR_SPIKE)
    assert nearest_fault(29, injected) is None
    assert nearest_fault(50, injected) is None


def test_summary_lines_say_what_happened() -> None:
    nan = math.nan
    broken = RunResult(guarded=False, losses=[2.0, 1.9, nan, nan], eval_loss=nan, weights_finite=False, seconds=1.0)
    assert unguarded_line(broken) == "without nanguard: loss became NaN at step 2 and never recovered; weights NaN: yes"
    events = [{"step": 2, "trigger": "nonfinite_loss", "action": "skip"},
              {"step": 5, "trigger": "loss_spike", "action": "rollback"}]
    guarded = RunResult(guarded=True, losses=[2.0, 1.9, nan, 1.8], eval_loss=1.75, weights_finite=True, seconds=1.0,
                        events=events)
    reference = RunResult(guarded=False, losses=[2.0], eval_loss=1.7, weights_finite=True, seconds=1.0)
    assert guarded_line(guarded, reference) == (
        "with nanguard:    2 events handled (1 skipped, 1 rolled back), final loss 1.75 (fault-free reference 1.7)")


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "10"], "--steps 10 is too few"),
    (["--out", "{file}"], "is a file"),
])
def test_bad_arguments_get_one_line_errors(tmp_path, capsys, argv: list[str], message: str) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("not a directory")
    code = cli_main(["demo", *[arg.format(file=a_file) for arg in argv]])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("nanguard demo: error: ") and message in err and "\n" not in err


def test_the_command_module_imports_nothing_heavy() -> None:
    """``nanguard --help`` imports the command module to add its arguments: it must not pull in torch."""
    code = "import sys, nanguard.demo; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_demo_reports_the_sub_directory_it_wrote_to_when_the_out_dir_holds_a_users_file(tmp_path) -> None:
    (tmp_path / "report.md").write_text("my own notes\n")
    tiny = Settings(steps=4, batch_size=4, seq_len=16, eval_batches=1)
    with one_thread():
        result = train(tiny, FaultPlan.none(), guard_dir=tmp_path, console=io.StringIO())
    assert result.run_dir is not None and result.run_dir != tmp_path and result.run_dir.parent == tmp_path
    assert (result.run_dir / "report.html").is_file()
    assert (tmp_path / "report.md").read_text() == "my own notes\n"
