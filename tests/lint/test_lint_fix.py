"""``--fix``: a new file beside the input with every fixable finding applied and only those bytes changed."""

from __future__ import annotations

import difflib
import json
import os

import pytest

from nanguard.errors import UsageError
from nanguard.lint import config_shape, fix_config, lint_config
from nanguard.lint import rules_lr as rules_module

ALL_BAD = [
    "hf_bad.yaml",
    "hf_bad.json",
    "lightning_bad.yaml",
    "deepspeed_bad.json",
    "accelerate_bad.yaml",
    "freeform_bad.yaml",
]


def problems(findings):
    return [f for f in findings if f.severity != "info"]


@pytest.fixture(autouse=True, params=[4, 5], ids=["transformers4", "transformers5"])
def _transformers_major(request, monkeypatch):
    monkeypatch.setattr(rules_module, "transformers_major", lambda: request.param)


@pytest.mark.parametrize("name", ALL_BAD)
def test_fixed_file_relints_clean_and_original_is_untouched(config, run_lint, name):
    path = config(name)
    before = path.read_bytes()
    status, _, _ = run_lint(path, "--fix")
    fixed = path.with_name(path.stem + "_fixed" + path.suffix)
    assert path.read_bytes() == before
    assert fixed.exists()
    remaining = lint_config(fixed)
    assert [f for f in remaining if f.fixable] == []
    assert {f.rule for f in problems(remaining)} == {f.rule for f in problems(lint_config(path)) if not f.fixable}
    assert status == (1 if problems(remaining) else 0)
    assert config_shape(fixed) == config_shape(path)


def test_yaml_fix_changes_only_the_fixed_lines_and_flags_stale_comments(config, run_lint):
    """Regression (issue 16, item 9; issue 14, item 6): a comment stayed beside a value the fix changed."""
    path = config("hf_bad.yaml")
    _status, out, _ = run_lint(path, "--fix")
    before = path.read_text().splitlines()
    after = path.with_name("hf_bad_fixed.yaml").read_text().splitlines()
    added = [line for line in difflib.ndiff(before, after) if line.startswith("+ ")]
    removed = [line for line in difflib.ndiff(before, after) if line.startswith("- ")]
    assert len(added) == 5 and len(removed) == 5 - (len(after) - len(before))
    assert "learning_rate: 2e-5   # was 1e-2 before nanguard lint --fix: copied from the SGD baseline" in after
    assert "fp16: false" in after and "max_grad_norm: 1" in after
    # --fix says every value it changed, with the old and the new value.
    assert "wrote " in out and "learning_rate: 1e-2 -> 2e-5  (lr_high)" in out
    assert "max_grad_norm: 0 -> 1  (no_grad_clipping)" in out


def test_lightning_fix_inserts_clipping_into_trainer(config, run_lint):
    path = config("lightning_bad.yaml")
    run_lint(path, "--fix")
    text = path.with_name("lightning_bad_fixed.yaml").read_text()
    assert "  precision: 16-mixed\n  gradient_clip_val: 1.0\n  # clipping: not configured\n" in text
    assert "# Lightning CLI config" in text
    assert "eps: 1.0e-6" in text  # readable as a float by YAML 1.1 (PyYAML) and 1.2 parsers


def test_json_fix_is_a_minimal_text_edit(config, run_lint):
    path = config("deepspeed_bad.json")
    run_lint(path, "--fix")
    text = path.with_name("deepspeed_bad_fixed.json").read_text()
    # Untouched lines keep their exact spelling, including inline arrays and the compact zero block.
    assert '"params": {"lr": 5e-4, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01}' in text
    assert '  "zero_optimization": {"stage": 2}\n}' in text
    assert '  "gradient_accumulation_steps": 4,\n  "gradient_clipping": 1.0,\n' in text
    data = json.loads(text)
    assert list(data) == [
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "optimizer",
        "fp16",
        "zero_optimization",
    ]
    assert data["fp16"]["loss_scale"] == 0


def test_json_nonstandard_infinity_becomes_strict_json(config, run_lint):
    path = config("hf_bad.json")
    run_lint(path, "--fix")
    text = path.with_name("hf_bad_fixed.json").read_text()
    assert "Infinity" not in text
    assert json.loads(text)["attention_mask_fill"] == -1e4


def test_existing_fixed_file_is_not_overwritten(config, run_lint):
    path = config("freeform_bad.yaml")
    target = path.with_name("freeform_bad_fixed.yaml")
    target.write_text("mine\n")
    status, _, err = run_lint(path, "--fix")
    assert status == 2 and target.read_text() == "mine\n"
    assert "freeform_bad_fixed.yaml already exists" in err and "--force" in err
    status, _, _ = run_lint(path, "--fix", "--force")
    assert status == 0 and target.read_text() != "mine\n"


def test_output_option_and_refusal_to_overwrite_input(config, run_lint, tmp_path):
    path = config("freeform_bad.yaml")
    status, _, _ = run_lint(path, "--fix", "--output", tmp_path / "elsewhere.yaml")
    assert status == 0 and problems(lint_config(tmp_path / "elsewhere.yaml")) == []
    before = path.read_bytes()
    status, _, err = run_lint(path, "--fix", "--force", "--output", path)
    assert status == 2 and "refusing" in err and path.read_bytes() == before


@pytest.mark.parametrize("where", ["directory", "missing_directory", "read_only_directory"])
def test_fix_output_that_cannot_be_written_is_one_line_exit_2(config, run_lint, tmp_path, monkeypatch, where):
    """Regression (issue 13, item 6): `lint --fix -o <a directory | a missing directory | a read-only
    directory>` printed a 30-line traceback and exited 1."""
    path = config("freeform_bad.yaml")
    if where == "directory":
        output = tmp_path / "out"
        output.mkdir()
    elif where == "missing_directory":
        output = tmp_path / "no" / "such" / "fixed.yaml"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        output = locked / "fixed.yaml"
        if os.access(locked, os.W_OK):  # root ignores permission bits: make the OS refuse instead
            import tempfile

            def refuse(*args, **kwargs):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(tempfile, "mkstemp", refuse)
    status, _, err = run_lint(path, "--fix", "-o", output)
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert str(output.parent if where != "directory" else output) in err
    assert not (output.exists() and output.is_file())


def test_clean_config_writes_nothing(config, run_lint):
    path = config("hf_clean.yaml")
    status, out, _ = run_lint(path, "--fix")
    assert status == 0 and "nothing to fix" in out
    assert not path.with_name("hf_clean_fixed.yaml").exists()


def test_fix_config_on_a_mapping_leaves_the_input_alone():
    original = {
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05}},
        "fp16": {"enabled": True, "loss_scale": 1},
    }
    snapshot = json.loads(json.dumps(original))
    result = fix_config(original)
    assert original == snapshot
    assert result.output_path is None and problems(result.remaining) == []
    assert result.document["optimizer"]["params"]["lr"] == pytest.approx(3e-3)  # 10x lower is still > 3e-3
    assert list(result.document) == ["optimizer", "fp16", "gradient_clipping"]
    assert result.document["fp16"]["loss_scale"] == 0


def test_crlf_line_endings_survive(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_bytes(b"# run\r\nlr: 0.5\r\nbetas: [0.9, 0.99]\r\ngrad_clip: 1.0\r\nwarmup_steps: 10\r\n")
    result = fix_config(path)
    raw = result.output_path.read_bytes()
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    assert b"lr: 0.003\r\n" in raw


def test_fix_config_raises_usage_error_for_existing_output(config):
    path = config("deepspeed_bad.json")
    fix_config(path)
    with pytest.raises(UsageError):
        fix_config(path)


def test_yaml_layout_survives_indentation_anchors_and_document_start(tmp_path):
    path = tmp_path / "run.yaml"
    text = (
        "---\n"
        "# run config\n"
        "train:\n"
        "    lr: 0.05   # adam\n"
        "    betas:\n"
        "      - 0.9\n"
        "      - 0.99\n"
        "    schedule: &sched\n"
        "        kind: cosine\n"
        "    max_grad_norm: 1.0\n"
        "    warmup_ratio: 0.03\n"
        "eval:\n"
        "    schedule: *sched\n"
        '    mask_value: "-inf"\n'
        "    use_cache: False\n"
    )
    path.write_text(text)
    result = fix_config(path)
    assert result.document == text.replace(
        "    lr: 0.05   # adam\n", "    lr: 0.003   # was 0.05 before nanguard lint --fix: adam\n"
    ).replace('mask_value: "-inf"', 'mask_value: "-1e9"')  # a string stays a string: the code may float() it
    assert problems(result.remaining) == []

