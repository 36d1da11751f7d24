"""Each supported config shape: planted problems are found at exactly their keys; clean ones pass."""

from __future__ import annotations

import math

import pytest

from nanguard.lint import config_shape, lint_config
from nanguard.lint import rules_lr as rules_module

from .conftest import CONFIGS


def found(name: str) -> set[tuple[str, str]]:
    return {(f.rule, f.path) for f in lint_config(CONFIGS / name)}


@pytest.fixture(autouse=True)
def _transformers_5(monkeypatch):
    """The HF warmup key depends on the installed transformers; pin it so results do not."""
    monkeypatch.setattr(rules_module, "transformers_major", lambda: 5)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("hf_bad.yaml", "huggingface"),
        ("hf_bad.json", "huggingface"),
        ("lightning_bad.yaml", "lightning"),
        ("deepspeed_bad.json", "deepspeed"),
        ("accelerate_bad.yaml", "accelerate"),
        ("freeform_bad.yaml", "freeform"),
    ],
)
def test_shape_is_recognised(name, shape):
    assert config_shape(CONFIGS / name) == shape


def test_huggingface_yaml():
    assert found("hf_bad.yaml") == {
        ("lr_high", "learning_rate"),
        ("no_grad_clipping", "max_grad_norm"),
        ("no_warmup", "warmup_steps"),
        ("nan_inf_filter", "logging_nan_inf_filter"),
        ("bf16_and_fp16_both", "fp16"),
        ("adam_eps_underflow", "adam_epsilon"),
    }
    by_rule = {f.rule: f for f in lint_config(CONFIGS / "hf_bad.yaml")}
    # A BERT fine-tune: the usual full fine-tuning rate, not 10x lower.
    assert by_rule["lr_high"].line == 4 and by_rule["lr_high"].fix == pytest.approx(2e-5)
    assert "learning rate 1e-2 is above" in by_rule["lr_high"].message  # the value as written
    assert by_rule["adam_eps_underflow"].value == pytest.approx(1e-8)
    assert by_rule["adam_eps_underflow"].fix == pytest.approx(1e-6)
    assert by_rule["nan_inf_filter"].severity == "info" and by_rule["nan_inf_filter"].fix is None


def test_huggingface_json_defaults_count():
    """HF defaults: max_grad_norm 1.0 and logging_nan_inf_filter (no finding), no warmup (a finding)."""
    findings = {f.rule: f for f in lint_config(CONFIGS / "hf_bad.json")}
    assert set(findings) == {"no_warmup", "adam_eps_zero", "inf_mask_value"}
    assert findings["no_warmup"].severity == "warning" and not findings["no_warmup"].exists
    assert findings["adam_eps_zero"].path == "adam_epsilon"
    assert findings["inf_mask_value"].path == "attention_mask_fill"
    assert findings["inf_mask_value"].value == -math.inf
    assert findings["inf_mask_value"].fix == -1e4  # fp16 is on: -1e9 would overflow to -inf


def test_lightning():
    assert found("lightning_bad.yaml") == {
        ("fp16_without_loss_scaling", "trainer.precision"),
        ("inf_mask_value", "model.init_args.mask_value"),
        ("lr_high", "optimizer.init_args.lr"),
        ("adam_eps_underflow", "optimizer.init_args.eps"),
        ("no_grad_clipping", "trainer.gradient_clip_val"),
        ("no_warmup", "optimizer.init_args.lr"),
    }
    by_rule = {f.rule: f for f in lint_config(CONFIGS / "lightning_bad.yaml")}
    assert by_rule["fp16_without_loss_scaling"].fix == "16-mixed"
    # The warmup may live in the LightningModule's configure_optimizers: a question, no fix.
    assert by_rule["no_warmup"].severity == "info" and by_rule["no_warmup"].fix is None
    assert "peak learning rate of 0.01 (lr_high suggests 0.001)" in by_rule["no_warmup"].message


def test_deepspeed():
    assert found("deepspeed_bad.json") == {
        ("lr_high", "optimizer.params.lr"),
        ("adam_eps_underflow", "optimizer.params.eps"),
        ("fp16_without_loss_scaling", "fp16.loss_scale"),
        ("no_grad_clipping", "gradient_clipping"),
        ("no_warmup", "optimizer.params.lr"),
    }
    by_rule = {f.rule: f for f in lint_config(CONFIGS / "deepspeed_bad.json")}
    assert by_rule["fp16_without_loss_scaling"].fix == 0 and by_rule["fp16_without_loss_scaling"].line == 10
    # Regression (issue 16, item 10): no WarmupLR is inserted (it was built on the lowered LR and
    # overrode a schedule the script may manage); the missing scheduler is a question.
    assert by_rule["no_warmup"].severity == "info" and by_rule["no_warmup"].fix is None


def test_accelerate():
    assert found("accelerate_bad.yaml") == {("no_grad_clipping", "deepspeed_config.gradient_clipping")}


def test_freeform():
    assert found("freeform_bad.yaml") == {
        ("lr_high", "optimizer.lr"),
        ("no_grad_clipping", "grad_clip"),
        ("inf_mask_value", "attention.mask_fill"),
        ("fp16_without_loss_scaling", "use_loss_scaling"),
        ("no_warmup", "optimizer.lr"),
    }
    warmup = next(f for f in lint_config(CONFIGS / "freeform_bad.yaml") if f.rule == "no_warmup")
    assert warmup.severity == "info" and warmup.fix is None  # may be in the script: a question


@pytest.mark.parametrize(
    "name",
    [
        "hf_clean.yaml",
        "lightning_clean.yaml",
        "deepspeed_clean.json",
        "accelerate_clean.yaml",
        "freeform_clean.yaml",
    ],
)
def test_clean_configs_have_no_findings(name):
    assert lint_config(CONFIGS / name) == []
