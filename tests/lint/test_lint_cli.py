"""``nanguard lint`` on the command line: output formats, exit status, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nanguard.lint import RULES

from .conftest import CONFIGS


def test_table_output_and_exit_status(run_lint):
    status, out, _ = run_lint(CONFIGS / "lightning_bad.yaml")
    assert status == 1
    assert "lightning_bad.yaml:5  error  fp16_without_loss_scaling" in out
    assert "trainer.gradient_clip_val = (not set)" in out
    assert "5 of 5 problems can be fixed automatically with --fix." in out


def test_clean_exit_zero(run_lint):
    status, out, _ = run_lint(CONFIGS / "deepspeed_clean.json")
    assert status == 0 and "no findings" in out


def test_json_output_shape(run_lint):
    status, out, _ = run_lint(CONFIGS / "deepspeed_bad.json", "--json")
    assert status == 1
    document = json.loads(out)
    assert list(document) == ["findings"]
    for finding in document["findings"]:
        assert {"rule", "path", "value", "message", "fix"} <= set(finding)
        assert finding["rule"] in RULES
    lr = next(f for f in document["findings"] if f["rule"] == "lr_high")
    assert (
        lr["path"] == "optimizer.params.lr" and lr["value"] == 5e-3 and lr["fix"] == 5e-4 and lr["line"] == 6
    )


def test_json_output_is_strict_for_infinite_values(run_lint):
    _, out, _ = run_lint(CONFIGS / "hf_bad.json", "--json")

    def reject(token):
        raise AssertionError(f"non-standard JSON token {token}")

    document = json.loads(out, parse_constant=reject)
    mask = next(f for f in document["findings"] if f["rule"] == "inf_mask_value")
    assert "-Infinity" in mask["message"]  # the value as the file spells it
    assert mask["value"] == "-inf" and mask["fix"] == -1e4


def test_json_with_fix_keeps_stdout_pure_json(config, run_lint):
    status, out, err = run_lint(config("freeform_bad.yaml"), "--fix", "--json")
    assert status == 0 and list(json.loads(out)) == ["findings"]
    assert "wrote" in err and "freeform_bad_fixed.yaml" in err


@pytest.mark.parametrize(
    ("name", "content", "line", "kind"),
    [
        ("bad.yaml", "lr: 1e-3\nmodel:\n  layers: [1, 2\n  heads: 4\n", 4, "YAML"),
        ("dup.yaml", "lr: 1e-3\nwarmup_steps: 10\nlr: 2e-3\n", 3, "YAML"),
        ("bad.json", '{\n  "lr": 1e-3,\n  "eps": 1e-8,\n}\n', 4, "JSON"),
        ("tabs.yml", "a: 1\nb:\n\t- 2\n", 3, "YAML"),
    ],
)
def test_malformed_input_is_one_line_with_file_and_line(tmp_path, run_lint, name, content, line, kind):
    path = tmp_path / name
    path.write_text(content)
    status, out, err = run_lint(path)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"nanguard lint: error: {path}:{line}: could not parse {kind}: ")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.yaml", None, "no such file"),
        ("train.ini", "lr = 1\n", "unknown config extension '.ini'"),
        ("bad.toml", "[optimizer\nlr = 1\n", "could not parse TOML"),
        ("bad.py", "lr = (\n", "could not parse Python"),
        ("empty.yaml", "", "the config is empty"),
        ("list.json", "[1, 2]", "expected a mapping of training settings"),
        ("latin.yaml", b"lr: 1\n# caf\xe9\n", ":2: not UTF-8 text"),
    ],
)
def test_unusable_input(tmp_path, run_lint, name, content, expected):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    status, _, err = run_lint(path)
    assert status == 2 and expected in err and err.count("\n") == 1 and str(path) in err


def test_json_needs_no_ruamel(monkeypatch, run_lint):
    monkeypatch.setitem(sys.modules, "ruamel", None)
    monkeypatch.setitem(sys.modules, "ruamel.yaml", None)
    status, _, _ = run_lint(CONFIGS / "deepspeed_bad.json")
    assert status == 1
    status, _, err = run_lint(CONFIGS / "hf_bad.yaml")
    assert status == 2 and "nanguard[lint]" in err


def test_ignore_option_and_inline_suppression(tmp_path, run_lint):
    path = tmp_path / "train.yaml"
    path.write_text(
        "lr: 0.5  # nanguard: ignore[lr_high]\nbetas: [0.9, 0.99]\ngrad_clip: 0  # nanguard: ignore\n"
    )
    status, out, _ = run_lint(path, "--json")
    assert {f["rule"] for f in json.loads(out)["findings"]} == {"no_warmup"}
    status, out, _ = run_lint(path, "--json", "--ignore", "no_warmup")
    assert status == 0 and json.loads(out) == {"findings": []}
    status, _, err = run_lint(path, "--ignore", "no_such_rule")
    assert status == 2 and "unknown rule(s) no_such_rule" in err


def test_list_rules_documents_every_rule(run_lint):
    status, out, _ = run_lint("--list-rules")
    assert status == 0
    for rule in RULES:
        assert f"{rule} (" in out


def test_usage_errors(run_lint):
    status, _, err = run_lint()
    assert status == 2 and "CONFIG" in err
    status, _, err = run_lint(CONFIGS / "hf_clean.yaml", "--force")
    assert status == 2 and "only apply with --fix" in err


@pytest.mark.slow
def test_python_dash_m_subprocess(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text((CONFIGS / "deepspeed_bad.json").read_text())
    proc = subprocess.run(
        [sys.executable, "-m", "nanguard", "lint", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert {f["rule"] for f in json.loads(proc.stdout)["findings"]} >= {
        "lr_high",
        "fp16_without_loss_scaling",
    }
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "nanguard", "lint", str(broken)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"nanguard lint: error: {broken}:2: could not parse YAML")
