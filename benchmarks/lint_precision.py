"""Prevention on real-world-shaped inputs: lint's precision and recall, and scan's findings, on the corpus.

Run from the repository root: ``python benchmarks/lint_precision.py [--baseline REV]``.

* lint: every config in ``tests/lint/corpus/`` against ``expected.json`` (what a careful reviewer
  expects). Problems (errors and warnings) are scored by (rule, path): precision = right / reported,
  recall = found / expected. Questions (info) are counted apart: they never fail a check.
* scan: every case of ``tests/scan/corpus.py`` (GluonTS, Nixtla, plain CSV, nanoGPT .bin, ...),
  built in a temporary folder and scored by (file, field, check).
* ``--baseline REV`` scores the same corpus with nanguard as of git revision REV (default: the
  branch's base, 407d5b9), side by side, in a subprocess that imports that revision's source.

Asserts nothing; prints Markdown for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import describe_machine, machine_info  # noqa: E402

LINT_CORPUS = ROOT / "tests" / "lint" / "corpus"

_RUNNER = r"""
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
mode, target = sys.argv[2], sys.argv[3]
out = []
if mode == "lint":
    from nanguard.lint import lint_config
    for path in sorted(Path(target).iterdir()):
        if path.name == "expected.json":
            continue
        try:
            out.append([path.name, [[f.rule, f.path, f.severity] for f in lint_config(path)]])
        except Exception as exc:
            out.append([path.name, "refused: " + str(exc).splitlines()[0][:120]])
else:
    from nanguard.scan import scan_paths
    case_folder = Path(target)
    options = json.loads(sys.argv[4])
    try:
        result = scan_paths([case_folder], **options)
        out = [[str(Path(f.file).relative_to(case_folder)), f.field, f.check] for f in result.findings]
    except Exception as exc:  # the baseline refuses some layouts outright (nanoGPT's .bin)
        out = [["(refused)", None, str(exc).splitlines()[0][:100]]]
print(json.dumps(out))
"""


def run_in(source: Path, *args: str) -> object:
    """Run the scoring snippet with the nanguard source at ``source`` first on sys.path."""
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(source), *args], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def export_revision(revision: str, folder: Path) -> Path:
    """``src/`` of ``revision`` extracted with ``git archive`` (read-only: no checkout, no worktree)."""
    data = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "src"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(data)) as archive:
        archive.extractall(folder, filter="data")
    return folder / "src"


def score(found: set, expected: set) -> tuple[int, int, int]:
    return len(found & expected), len(found - expected), len(expected - found)


def lint_scores(source: Path) -> dict[str, object]:
    expected_all = json.loads((LINT_CORPUS / "expected.json").read_text())["configs"]
    results = dict(run_in(source, "lint", str(LINT_CORPUS)))  # type: ignore[arg-type]
    right = wrong = missed = questions = refused = 0
    wrong_list, missed_list = [], []
    for name, expectation in sorted(expected_all.items()):
        expected = {(e["rule"], e["path"]) for e in expectation["findings"] if e["severity"] != "info"}
        got = results.get(name)
        if isinstance(got, str):
            refused += 1
            missed += len(expected)
            missed_list += [f"{name}: {r} at {p} (file refused)" for r, p in expected]
            continue
        problems = {(r, p) for r, p, s in got if s != "info"}
        questions += sum(1 for _, _, s in got if s == "info")
        tp, fp, fn = score(problems, expected)
        right, wrong, missed = right + tp, wrong + fp, missed + fn
        wrong_list += [f"{name}: {r} at {p}" for r, p in sorted(problems - expected)]
        missed_list += [f"{name}: {r} at {p}" for r, p in sorted(expected - problems)]
    return {
        "files": len(expected_all), "right": right, "wrong": wrong, "missed": missed, "questions": questions,
        "refused": refused, "wrong_list": wrong_list, "missed_list": missed_list,
    }


def scan_scores(source: Path) -> dict[str, object]:
    from tests.scan.corpus import CASES

    right = wrong = missed = 0
    wrong_list, missed_list = [], []
    for name, build in sorted(CASES.items()):
        with tempfile.TemporaryDirectory() as folder:
            case = build(Path(folder))
            got = {tuple(item) for item in run_in(source, "scan", folder, json.dumps(case.options))}  # type: ignore[union-attr]
        tp, fp, fn = score(got, case.expected)
        right, wrong, missed = right + tp, wrong + fp, missed + fn
        wrong_list += [f"{name}: {f[2]} in {f[0]}:{f[1]}" for f in sorted(got - case.expected, key=str)]
        missed_list += [f"{name}: {f[2]} in {f[0]}:{f[1]}" for f in sorted(case.expected - got, key=str)]
    return {"cases": len(CASES), "right": right, "wrong": wrong, "missed": missed,
            "wrong_list": wrong_list, "missed_list": missed_list}


def ratio(numerator: int, denominator: int) -> str:
    return f"{100 * numerator / denominator:.0f}%" if denominator else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="407d5b9", help="git revision to compare with ('' to skip)")
    args = parser.parse_args()
    started = time.time()
    columns = [("this tree", ROOT / "src")]
    with tempfile.TemporaryDirectory() as base_folder:
        if args.baseline:
            columns.append((f"baseline {args.baseline}", export_revision(args.baseline, Path(base_folder))))
        lint = {label: lint_scores(src) for label, src in columns}
        scan = {label: scan_scores(src) for label, src in columns}
    print("### lint on the config corpus\n")
    print("| | precision | recall | right | wrong | missed | questions (info) | files refused |")
    print("|---|---|---|---|---|---|---|---|")
    for label, s in lint.items():
        r, w, m = s["right"], s["wrong"], s["missed"]  # type: ignore[misc]
        print(f"| {label} | {ratio(r, r + w)} | {ratio(r, r + m)} | {r} | {w} | {m} | {s['questions']} | {s['refused']} of {s['files']} |")
    print("\n### scan on the dataset corpus\n")
    print("| | precision | recall | right | wrong | missed |")
    print("|---|---|---|---|---|---|")
    for label, s in scan.items():
        r, w, m = s["right"], s["wrong"], s["missed"]  # type: ignore[misc]
        print(f"| {label} | {ratio(r, r + w)} | {ratio(r, r + m)} | {r} | {w} | {m} |")
    for title, table in (("lint", lint), ("scan", scan)):
        for label, s in table.items():
            for kind in ("wrong_list", "missed_list"):
                if s[kind]:
                    print(f"\n{title}, {label}, {kind.split('_')[0]}: " + "; ".join(s[kind]))  # type: ignore[arg-type]
    print(f"\n(ran in {time.time() - started:.0f} s)\n")
    print(describe_machine(machine_info()))


if __name__ == "__main__":
    main()
