"""torch.distributed for real: 2 processes on gloo/CPU launched by torchrun, one rank sees the NaN.

Each run is a subprocess with a hard timeout, so a deadlock fails the test instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import read_events

SCRIPT = Path(__file__).resolve().parent / "ddp_train.py"
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 150

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def torchrun(tmp_path: Path, *args: str, module_run: bool = False) -> tuple[list[dict], list[dict[str, torch.Tensor]]]:
    """Run ``ddp_train.py`` on 2 ranks; return each rank's record and final parameters."""
    returncode, stderr = launch(tmp_path, *args, module_run=module_run)
    assert returncode == 0, stderr[-4000:]
    results = tmp_path / "results"
    records = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    weights = [torch.load(results / f"weights{r}.pt") for r in range(2)]
    return records, weights


def launch(tmp_path: Path, *args: str, module_run: bool = False) -> tuple[int, str]:
    """Launch ``ddp_train.py`` on 2 ranks under torchrun; its exit status and stderr."""
    results = tmp_path / "results"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    if module_run:
        command = [*launcher, "-m", "nanguard", "run", "--quiet", "--out", str(tmp_path / "out"), str(SCRIPT),
                   "--results", str(results), *args]
    else:
        command = [*launcher, str(SCRIPT), "--out", str(tmp_path / "out"), "--results", str(results), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # A session of its own, so a deadlocked job is killed with all its ranks, not just the launcher.
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"the 2-rank job did not finish in {TIMEOUT_S}s (deadlock?)\n{stderr[-3000:]}")
    return process.returncode, stderr


def assert_identical(weights: list[dict[str, torch.Tensor]]) -> None:
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
        assert bool(torch.isfinite(weights[0][name]).all()), name


def test_nanguard_run_under_torchrun_skips_on_both_ranks(tmp_path: Path) -> None:
    records, weights = torchrun(tmp_path, "--mode", "run", "--bad-steps", "5", module_run=True)
    assert_identical(weights)
    events = read_events(tmp_path / "out")
    assert [(e["step"], e["rank"], e["action"]) for e in events] == [(5, 1, "skip")]
    assert events[0]["diagnosis"]["cause"] == "input_nonfinite"
    assert records[0]["world"] == 2


def test_guard_api_under_ddp_rolls_back_identically_and_agrees_on_the_cause(tmp_path: Path) -> None:
    # Three bad steps in a row on rank 1 escalate to a rollback (rollback_after=3) on every rank.
    records, weights = torchrun(tmp_path, "--mode", "integration", "--bad-steps", "4,5,6")
    assert_identical(weights)
    seen = [[(e["step"], e["action"], e["rank"], e["cause"]) for e in r["events"]] for r in records]
    assert seen[0] == seen[1]  # same decisions and the same diagnosis on both ranks
    assert [(s, a, r) for s, a, r, _ in seen[0]] == [(4, "skip", 1), (5, "skip", 1), (6, "rollback", 1)]
    assert {cause for *_, cause in seen[0]} == {"input_nonfinite"}
    assert records[0]["summary"]["rollbacks"] == records[1]["summary"]["rollbacks"] == 1
    written = read_events(tmp_path / "out")  # rank 0 wrote them, once each
    assert [(e["step"], e["rank"]) for e in written] == [(4, 1), (5, 1), (6, 1)]
    assert written[0]["loss"] is None and written[0]["loss_repr"] == "nan"  # the bad rank's loss, not rank 0's


def test_replay_through_the_ddp_wrapper_issues_no_collective(tmp_path: Path) -> None:
    # The guard watches the DDP wrapper itself: its replay runs DDP.forward, which would broadcast the
    # BatchNorm buffers from rank 0 while rank 0 waits for the diagnosis. It must finish, and agree.
    records, weights = torchrun(tmp_path, "--mode", "integration", "--guard-wrapper", "--bad-steps", "5")
    assert_identical(weights)
    seen = [[(e["step"], e["action"], e["rank"], e["cause"]) for e in r["events"]] for r in records]
    assert seen[0] == seen[1] == [(5, "skip", 1, "input_nonfinite")]


def test_fsdp2_sharded_gradient_norm_and_lockstep_skip(tmp_path: Path) -> None:
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("FSDP2 (fully_shard) is not available in this torch")
    records, weights = torchrun(tmp_path, "--mode", "integration", "--parallel", "fsdp", "--no-batchnorm", "--bad-steps", "3")
    assert_identical(weights)
    seen = [[(e["step"], e["action"], e["rank"], e["cause"]) for e in r["events"]] for r in records]
    assert seen[0] == seen[1] == [(3, "skip", 1, "input_nonfinite")]
    rows = (tmp_path / "out" / "history.csv").read_text().splitlines()[1:]
    norms = {int(r.split(",")[0]): r.split(",")[3] for r in rows}
    reference = records[0]["reference_norms"]
    for step, value in norms.items():
        if step != 3:  # the guard's norm over local shards equals the norm of the whole gradient
            assert float(value) == pytest.approx(reference[step], rel=1e-5)


@pytest.mark.parametrize("module_run", [True, False], ids=["nanguard-run", "guard-try-finally"])
def test_a_crash_on_rank1_is_recorded_by_rank1_with_its_diagnosis(tmp_path: Path, module_run: bool) -> None:
    """Regression (issue 17 item 2): only rank 0 wrote, ``nonfinite_loss / unknown, rank 0`` from the secondary
    "Connection closed by peer"; with ``try/finally close()`` rank 0 even said every step was finite."""
    returncode, stderr = launch(tmp_path, "--mode", "run" if module_run else "guard", "--crash-step", "4",
                                "--bad-steps", "", module_run=module_run)
    assert returncode != 0 and "IndexError" in stderr
    (event,) = read_events(tmp_path / "out" / "rank1")
    assert (event["step"], event["rank"], event["trigger"], event["action"]) == (4, 1, "exception", "abort")
    assert event["diagnosis"]["cause"] == "label_out_of_range"
    assert json.loads((tmp_path / "out" / "rank1" / "summary.json").read_text())["status"] == "error"
    rank0_events = tmp_path / "out" / "events.jsonl"
    assert not rank0_events.exists() or read_events(tmp_path / "out") == []  # no secondary "peer closed" event
    if (tmp_path / "out" / "summary.json").exists():
        assert json.loads((tmp_path / "out" / "summary.json").read_text())["status"] != "finished"


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-rank launch of ``lightning_ddp_train.py`` (DDP and FSDP2 fits) shared by the Lightning tests."""
    pytest.importorskip("lightning.pytorch")
    out = tmp_path_factory.mktemp("lightning")
    script = Path(__file__).resolve().parent / "lightning_ddp_train.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                          start_new_session=True, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def lightning_weights(out: Path, name: str) -> list[dict[str, torch.Tensor]]:
    return [torch.load(out / f"{name}_weights{r}.pt") for r in range(2)]


def assert_one_skip_at_step5_by_rank1(run_dir: Path) -> None:
    events = read_events(run_dir)
    assert [(e["step"], e["rank"], e["trigger"], e["action"]) for e in events] == [(5, 1, "nonfinite_loss", "skip")]
    assert events[0]["diagnosis"]["cause"] == "input_nonfinite"


def test_lightning_ddp_strategy_on_two_cpu_processes(lightning_runs: Path) -> None:
    """Issue 17 item 5: Lightning ``strategy="ddp"``: one event with rank 1's diagnosis, identical weights."""
    assert_identical(lightning_weights(lightning_runs, "ddp"))
    assert_one_skip_at_step5_by_rank1(lightning_runs / "ddp")


def test_lightning_fsdp2_model_parallel_strategy_on_two_cpu_processes(lightning_runs: Path) -> None:
    """Issue 17 item 5: FSDP2 through Lightning (``ModelParallelStrategy``, ``fully_shard`` in ``configure_model``).

    A healthy fit is bit-identical with and without the callback; a NaN on rank 1 at batch 5 is one skip at
    Lightning's step 5 with rank 1's diagnosis, and both ranks end with equal weights.
    """
    plain, healthy, faulty = (lightning_weights(lightning_runs, f"fsdp2_{name}") for name in ("plain", "healthy", "nan"))
    for weights in (plain, healthy, faulty):
        assert_identical(weights)
    assert all(torch.equal(plain[0][name], healthy[0][name]) for name in plain[0])
    assert not all(torch.equal(plain[0][name], faulty[0][name]) for name in plain[0])  # step 5 was really skipped
    assert read_events(lightning_runs / "fsdp2_healthy") == []
    assert_one_skip_at_step5_by_rank1(lightning_runs / "fsdp2_nan")
    history = (lightning_runs / "fsdp2_nan" / "history.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in history] == list(range(10))  # Lightning's global_step, one row a step
