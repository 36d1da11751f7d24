"""Input limits (issue 13, item 5): alias bombs, huge files and deep nesting are one line and exit 2,
refused before the parser or the rules spend time or memory on them."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from nanguard.errors import ConfigError
from nanguard.lint import lint_config
from nanguard.lint.limits import MAX_BYTES, MAX_DEPTH


def one_line_refusal(run_lint, path, expected: str) -> None:
    status, out, err = run_lint(path)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err and expected in err


@pytest.mark.parametrize("depth", [6, 9])
def test_yaml_alias_bomb_is_refused(tmp_path, run_lint, depth):
    """A 1 KB file whose aliases expand nine-fold per level (depth 9: 387 million values)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, depth + 1)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nlr: 0.1\n")
    assert path.stat().st_size < 1024
    one_line_refusal(run_lint, path, "alias bomb")


def test_yaml_merge_key_bomb_is_refused(tmp_path, run_lint):
    lines = ["b0: &b0 {k: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}"]
    lines += [f"b{i}: &b{i} [*b{i - 1}, *b{i - 1}, *b{i - 1}, *b{i - 1}, *b{i - 1}]" for i in range(1, 8)]
    path = tmp_path / "merge.yaml"
    path.write_text("\n".join(lines) + "\n")
    one_line_refusal(run_lint, path, "alias bomb")


def test_yaml_self_referencing_alias_does_not_hang_or_crash(tmp_path, run_lint):
    path = tmp_path / "cycle.yaml"
    path.write_text("a: &a [1, *a]\nlr: 0.5\nbetas: [0.9, 0.99]\n")
    status, out, err = run_lint(path)
    assert "Traceback" not in err and (status, err.count("\n")) in ((1, 0), (2, 1))
    assert status == 2 or "lr_high" in out


def test_huge_json_is_refused_without_being_read(tmp_path, run_lint):
    """20 MB of JSON took 175 s and 1.5 GB; it is now refused from its size alone."""
    path = tmp_path / "big.json"
    path.write_text('{"lr": 0.001, "data": [' + "0.5, " * 4_000_000 + "1]}")
    assert path.stat().st_size > 20e6
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="far larger than a training config"):
            lint_config(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1e6  # not read: a few bookkeeping objects, not the file
    one_line_refusal(run_lint, path, "is this a dataset?")


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml", ".py"])
def test_size_limit_for_each_format(tmp_path, run_lint, suffix):
    path = tmp_path / f"train{suffix}"
    path.write_text("# " + "x" * (MAX_BYTES[{'.yaml': 'yaml', '.json': 'json', '.toml': 'toml', '.py': 'python'}[suffix]] + 10))
    one_line_refusal(run_lint, path, "larger than a training config")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep.json", '{"a": ' + "[" * 600 + "]" * 600 + "}"),
        ("flow.yaml", "a: " + "[" * 3000 + "]" * 3000 + "\n"),
        ("block.yaml", "".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "lr: 1\n"),
        ("dashes.yaml", "a:\n" + "- " * 300 + "1\n"),
        ("deep.toml", "a = " + "[" * 600 + "]" * 600 + "\n"),
        ("deep.py", "a = " + "[" * 600 + "]" * 600 + "\n"),
    ],
)
def test_deep_nesting_is_refused_before_parsing(tmp_path, run_lint, name, text):
    """Nesting >= 500 gave a RecursionError traceback; a YAML parser spent 7 s getting there."""
    path = tmp_path / name
    path.write_text(text)
    one_line_refusal(run_lint, path, f"nested more than {MAX_DEPTH} levels deep")


def test_too_many_values_without_aliases(tmp_path, run_lint):
    path = tmp_path / "wide.json"
    path.write_text(json.dumps({"lr": 1e-3, "table": list(range(30_000))}))
    one_line_refusal(run_lint, path, "holds more than 20,000 values")


def test_in_memory_mapping_with_shared_nodes_is_bounded():
    block: list = [1] * 10
    for _ in range(6):
        block = [block] * 10
    with pytest.raises(ConfigError, match="alias bomb"):
        lint_config({"lr": 0.1, "bomb": block})


def test_realistic_configs_are_far_inside_the_limits(tmp_path):
    """A config with a few hundred settings, ten levels deep, lints normally."""
    nested: dict = {"lr": 3e-4, "max_grad_norm": 1.0, "warmup_ratio": 0.03}
    for level in range(10):
        nested = {f"level{level}": nested, **{f"k{level}_{i}": i for i in range(30)}}
    path = tmp_path / "big_but_real.json"
    path.write_text(json.dumps(nested, indent=2))
    assert [f.rule for f in lint_config(path) if f.severity != "info"] == []
