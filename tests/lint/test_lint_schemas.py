"""--fix writes nothing a config's own loader would reject (issue 16, item 8), and reads nanoGPT's
Python configs and torchtitan's TOML (item 11)."""

from __future__ import annotations

import sys
import textwrap

import pytest

from nanguard.lint import config_shape, fix_config, lint_config

from .loaders import LOADERS


def test_litgpt_config_never_gets_a_trainer_section(tmp_path):
    """Regression: the added `trainer:` section failed jsonargparse
    (`Option 'trainer.gradient_clip_val' is not accepted`)."""
    path = tmp_path / "lora.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            checkpoint_dir: checkpoints/meta-llama/Llama-2-7b-hf
            out_dir: out/lora
            precision: bf16-true
            lora_r: 8
            train:
              global_batch_size: 16
              micro_batch_size: 1
              lr_warmup_steps: 10
              epochs: 1
            optimizer:
              class_path: torch.optim.AdamW
              init_args:
                lr: 0.0003
            """
        )
    )
    assert config_shape(path) == "jsonargparse"
    (clip,) = [f for f in lint_config(path) if f.rule == "no_grad_clipping"]
    assert clip.severity == "info" and clip.fix is None  # litgpt may clip: a question
    result = fix_config(path)
    assert result.output_path is None
    LOADERS["litgpt_lora"](path)  # the input itself is valid for litgpt's own parser


def test_hydra_target_mapping_gets_no_constructor_keywords(tmp_path, monkeypatch):
    """Regression: `max_grad_norm` was inserted beside `_target_`; instantiation then failed with
    `unexpected keyword argument`."""
    hydra_utils = pytest.importorskip("hydra.utils")
    package = tmp_path / "lhmodels"
    package.mkdir()
    (package / "__init__.py").write_text(
        "class LitModule:\n"
        "    def __init__(self, optimizer, compile=False):\n"
        "        self.optimizer, self.compile = optimizer, compile\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "model.yaml"
    path.write_text(
        "_target_: lhmodels.LitModule\n"
        "optimizer:\n"
        "  _target_: torch.optim.Adam\n"
        "  _partial_: true\n"
        "  lr: 0.05\n"
        "compile: false\n"
    )
    result = fix_config(path)
    assert [c.finding.rule for c in result.changes] == ["lr_high"]  # a value change, no new key
    assert all(c.old is not None for c in result.changes)
    module = hydra_utils.instantiate(LOADERS["omegaconf"](result.output_path))
    assert module.optimizer.keywords["lr"] == pytest.approx(0.003)
    sys.modules.pop("lhmodels", None)


def test_new_keys_go_only_where_the_schema_takes_them():
    pure_fp16 = {"trainer": {"precision": "16-true", "gradient_clip_val": 1.0}}
    known = {**pure_fp16, "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4}}}
    (eps,) = [f for f in lint_config(known) if f.rule == "adam_eps_underflow"]
    assert eps.fix == pytest.approx(1e-6) and eps.path == "optimizer.init_args.eps"
    unknown = {**pure_fp16, "optimizer": {"class_path": "mylib.Sophia", "init_args": {"lr": 1e-4, "betas": [0.9, 0.95]}}}
    findings = [f for f in lint_config(unknown) if f.rule == "adam_eps_underflow"]
    assert all(f.fix is None and "by hand" not in f.message for f in findings)


def test_nanogpt_python_config_is_read_without_running_it(tmp_path, run_lint):
    marker = tmp_path / "ran"
    path = tmp_path / "train_fp16.py"
    path.write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
        "learning_rate = 6e-4\nmax_iters = 5000\ndtype = 'float16'\ngrad_clip = 0.0  # off\n"
        "mask_value = float('-inf')\n"
    )
    status, out, _ = run_lint(path)
    assert not marker.exists()  # never executed
    assert status == 1 and "nanogpt config" in out
    found = {f.rule for f in lint_config(path)}
    # dtype='float16' is nanoGPT's autocast dtype (fp32 weights + GradScaler): no eps finding.
    assert found == {"no_grad_clipping", "inf_mask_value"}
    fixed = fix_config(path).output_path.read_text()
    assert "grad_clip = 1.0  # was 0.0 before nanguard lint --fix: off\n" in fixed
    assert "mask_value = -10000.0\n" in fixed or "mask_value = -1e4\n" in fixed


def test_torchtitan_toml_fix_keeps_the_file_and_tomllib_reads_it(tmp_path):
    path = tmp_path / "debug.toml"
    path.write_text('[optimizer]\nname = "AdamW"\nlr = 8e-4\n\n[training]\nsteps = 100\nmax_norm = 0.0  # off\n')
    assert config_shape(path) == "torchtitan"
    result = fix_config(path)
    text = result.output_path.read_text()
    assert text == path.read_text().replace("max_norm = 0.0  # off", "max_norm = 1.0  # was 0.0 before nanguard lint --fix: off")
    assert LOADERS["toml"](result.output_path)["training"]["max_norm"] == 1.0
