"""The corpus of real-world-shaped configs: the findings a reviewer expects, and --fix outputs that only
touch the fixed values and that each ecosystem's own loader accepts."""

from __future__ import annotations

import difflib
import json
import math
import shutil
from pathlib import Path

import pytest

from nanguard.lint import fix_config, lint_config
from nanguard.lint.tree import as_number, get_path

from .loaders import LOADERS

CORPUS = Path(__file__).resolve().parent / "corpus"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())["configs"]
NAMES = sorted(EXPECTED)


def test_every_corpus_file_has_expectations():
    files = sorted(p.name for p in CORPUS.iterdir() if p.name != "expected.json")
    assert files == NAMES and len(NAMES) >= 30


@pytest.mark.parametrize("name", NAMES)
def test_findings_are_the_expected_ones(name):
    found = sorted((f.rule, f.path, f.severity) for f in lint_config(CORPUS / name))
    expected = sorted((e["rule"], e["path"], e["severity"]) for e in EXPECTED[name]["findings"])
    assert found == expected


FIXABLE = [name for name in NAMES if any(f.fixable for f in lint_config(CORPUS / name))]


def test_the_corpus_exercises_every_format_of_fix():
    suffixes = {Path(name).suffix for name in FIXABLE}
    assert {".yaml", ".yml", ".json", ".toml", ".py"} <= suffixes


@pytest.mark.parametrize("name", FIXABLE)
def test_fix_changes_only_the_fixed_values_and_the_tool_accepts_it(tmp_path, name):
    source = tmp_path / name
    shutil.copyfile(CORPUS / name, source)
    result = fix_config(source)
    assert result.output_path is not None and not result.refused
    before = source.read_text().splitlines()
    after = result.output_path.read_text().splitlines()
    inserted = sum(1 for change in result.changes if change.old is None)
    assert len(after) == len(before) + inserted
    # Only the changed lines differ, plus one new line per inserted key; in JSON the line before an
    # inserted member gains its comma. Comments, indentation, quoting and spellings are untouched.
    touched = {change.line for change in result.changes}
    removed = [line[2:] for line in difflib.ndiff(before, after) if line.startswith("- ")]
    added = [line[2:] for line in difflib.ndiff(before, after) if line.startswith("+ ")]
    assert len(added) == len(touched) + len([r for r in removed if r + "," in added])
    for change in result.changes:
        assert change.new in after[change.line - 1]
    load = LOADERS[EXPECTED[name]["loader"]]
    original, fixed = load(CORPUS / name), load(result.output_path)
    for change in result.changes:
        value, fix = get_path(fixed, change.finding.key_path), change.finding.fix
        if isinstance(fix, (bool, str)):
            assert str(value) == str(fix)
            continue
        # A number stays a number for the tool; a value the tool read as text (PyYAML reads 1e-9 as a
        # string) keeps that notation, so the fix does not change how the code has to read it.
        was_text = isinstance(get_path(original, change.finding.key_path), str)
        assert isinstance(value, str) == was_text
        assert math.isclose(as_number(value), fix, rel_tol=1e-9)
