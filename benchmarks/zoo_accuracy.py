"""Diagnosis accuracy on the fault zoo, in API mode and through ``nanguard run``.

For every scenario of ``nanguard.zoo`` the first event is compared with the scenario's EXPECTED
(step, trigger, cause, phase, module, op, tensor; fields it leaves as None are not scored), and the time
from the faulty step to the written diagnosis is measured in step-times: the wall time between the
history rows of the step before the event and the event's own step (the row is written after the
event), divided by the run's median step time. A crash (no history row) uses the investigation's own
duration instead.

    python benchmarks/zoo_accuracy.py [--modes api,cli] [--only NAME ...] [--out benchmarks/results/zoo_accuracy.md]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import describe_machine, machine_info, markdown_table, write_text_atomic

from nanguard.zoo import EXPECTED_FIELDS, Scenario, load_scenarios
from nanguard.zoo.harness import RunResult, compare, run_api, run_cli

SCORED = ("cause", "phase", "module", "op", "tensor")


def diagnosis_step_times(result: RunResult) -> float | None:
    """Fault step to written diagnosis, in units of the run's median step time."""
    event = result.first_event
    if event is None:
        return None
    rows = [(int(r["step"]), float(r["time"])) for r in result.history if r.get("time") not in (None, "")]
    times = dict(rows)
    steps = sorted(times)
    gaps = [times[b] - times[a] for a, b in itertools.pairwise(steps) if b == a + 1]
    step_time = statistics.median(gaps) if gaps else None
    if not step_time or step_time <= 0:
        return None
    step = int(event["step"])
    if step in times and step - 1 in times:
        return (times[step] - times[step - 1]) / step_time
    seconds = (event.get("details") or {}).get("seconds")
    return 1.0 + float(seconds) / step_time if isinstance(seconds, (int, float)) else None


def run_mode(mode: str, scenarios: list[Scenario], root: Path) -> dict[str, RunResult]:
    if mode == "api":
        return {s.name: run_api(s, root / "api" / s.name) for s in scenarios}
    for s in scenarios:
        (root / "cli" / s.name).mkdir(parents=True, exist_ok=True)
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda s: run_cli(s, root / "cli" / s.name), scenarios)
        return {s.name: r for s, r in zip(scenarios, results, strict=True)}


def _cell(want: Any, got: Any, ok: bool | None) -> str:
    if ok is None:
        return f"({got})" if got not in (None, "") else "-"
    return f"{got}" if ok else f"**{got}** (want {want})"


def table_for(mode: str, scenarios: list[Scenario], results: dict[str, RunResult]) -> tuple[str, dict[str, list[int]]]:
    totals = {f: [0, 0] for f in EXPECTED_FIELDS}
    rows = []
    for s in scenarios:
        result = results[s.name]
        fields = compare(s.expected, result.first_event)
        for name, (_, _, ok) in fields.items():
            if ok is not None:
                totals[name][1] += 1
                totals[name][0] += int(ok)
        latency = diagnosis_step_times(result)
        all_ok = all(ok is not False for _, _, ok in fields.values())
        rows.append([
            s.name, s.cause, "yes" if all_ok else "**no**",
            *(_cell(*fields[f]) for f in ("step", "trigger", *SCORED)),
            f"{latency:.1f}" if latency is not None else "-",
        ])
    header = ["scenario", "expected cause", "all match", "step", "trigger", "cause", "phase", "module", "op", "tensor", "step-times to diagnosis"]
    return markdown_table(header, rows), totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="api,cli")
    parser.add_argument("--only", nargs="*", help="scenario names (default: all)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "zoo_accuracy.md"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    zoo = load_scenarios()
    scenarios = [zoo[n] for n in (args.only or sorted(zoo))]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    sections = []
    summary_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            results = run_mode(mode, scenarios, Path(tmp))
            table, totals = table_for(mode, scenarios, results)
            exact = sum(all(ok is not False for _, _, ok in compare(s.expected, results[s.name].first_event).values()) for s in scenarios)
            latencies = [x for x in (diagnosis_step_times(results[s.name]) for s in scenarios) if x is not None]
            summary_rows.append([mode, f"{exact}/{len(scenarios)}",
                                 *(f"{totals[f][0]}/{totals[f][1]}" for f in EXPECTED_FIELDS),
                                 f"{statistics.median(latencies):.1f}" if latencies else "-",
                                 f"{max(latencies):.1f}" if latencies else "-"])
            title = "API mode (`nanguard.Guard` attached in the script)" if mode == "api" else "zero-code mode (`nanguard run SCRIPT`)"
            sections.append(f"### {title}\n\n{table}\n")
            print(f"{mode}: {exact}/{len(scenarios)} scenarios fully right; " + ", ".join(f"{f} {totals[f][0]}/{totals[f][1]}" for f in EXPECTED_FIELDS), file=sys.stderr)
    info = machine_info()
    summary = markdown_table(["mode", "all fields right", *EXPECTED_FIELDS, "median step-times", "max step-times"], summary_rows)
    text = "\n".join([
        "## Diagnosis accuracy on the fault zoo",
        "",
        f"Command: `python benchmarks/{Path(__file__).name} --modes {args.modes}`",
        "",
        describe_machine(info),
        "",
        f"{len(scenarios)} scenarios (`src/nanguard/zoo/scenarios/`), each an ordinary training script with one "
        "realistic fault. A field counts when the scenario states it (None = not scored). Bold cells are wrong; "
        "values in parentheses are reported but not scored. 'Step-times to diagnosis' is the wall time of the "
        "faulty step including the investigation, in units of the median step time of the run.",
        "",
        summary,
        "",
        *sections,
    ])
    write_text_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
