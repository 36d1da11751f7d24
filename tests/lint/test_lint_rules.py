"""The rules on small in-memory configs: thresholds, optimizer families, precision spellings."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanguard.lint import fix_config, lint_config
from nanguard.lint import rules_lr as rules_module
from nanguard.lint.rules import FP16_SMALLEST_SUBNORMAL


def rules_at(config: dict) -> set[tuple[str, str]]:
    return {(f.rule, f.path) for f in lint_config(config)}


def only(config: dict, rule: str) -> list:
    return [f for f in lint_config(config) if f.rule == rule]


# --- lr_high ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "flagged"),
    [
        ({"optimizer": {"type": "AdamW", "params": {"lr": 5e-3}}}, True),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 2e-3}}}, False),  # pretraining-like: below 3e-3
        ({"optimizer": {"type": "SGD", "params": {"lr": 0.5}}}, False),
        ({"optimizer": {"type": "SGD", "params": {"lr": 2.0}}}, True),
        ({"optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9}}, False),
        ({"optim": "lion_32bit", "lr": 2e-3}, True),
        ({"lr": 0.1, "momentum": 0.9}, False),  # sibling hint: SGD
        ({"lr": 0.1, "betas": [0.9, 0.99]}, True),  # sibling hint: Adam
        ({"lr": 0.5}, False),  # unknown optimizer: only > 1.0 is implausible
        ({"lr": "auto"}, False),  # filled in at launch
    ],
)
def test_lr_thresholds_by_family(config, flagged):
    assert bool(only(config, "lr_high")) is flagged


def test_fine_tuning_lowers_the_adam_threshold_to_a_warning():
    pretrain = {"optimizer": {"name": "adamw", "lr": 2e-3}}
    finetune = {**pretrain, "model_name_or_path": "gpt2"}
    assert only(pretrain, "lr_high") == []
    (finding,) = only(finetune, "lr_high")
    assert finding.severity == "warning" and finding.fix == pytest.approx(2e-5)
    assert "the usual rate for full fine-tuning, 100x lower" in finding.message
    (lora,) = only({**finetune, "lora_r": 16}, "lr_high")
    assert lora.fix == pytest.approx(2e-4) and "LoRA/adapter fine-tuning, 10x lower" in lora.message


def test_lr_fix_for_a_7b_full_fine_tune_is_the_recipe_rate_not_a_cap():
    """Regression (issue 16, item 10): a 7B full fine-tune's lr_high fix landed at 1e-3 where the
    recipe uses 2e-5, and "10x lower" was printed for a capped value (0.05 -> 0.003)."""
    recipe = {"model_name_or_path": "meta-llama/Llama-2-7b-hf", "output_dir": "o", "logging_steps": 1}
    (finding,) = only({**recipe, "learning_rate": 1e-2}, "lr_high")
    assert finding.fix == pytest.approx(2e-5)
    (capped,) = only({"optimizer": {"type": "Adam", "params": {"lr": 0.05}}}, "lr_high")
    assert capped.fix == pytest.approx(3e-3) and "17x lower" in capped.message and "10x" not in capped.message


def test_noam_scaled_rate_is_a_multiplier_not_a_learning_rate():
    """NeMo's conformer recipes set lr: 2.0 with a NoamAnnealing scheduler (lr * d_model**-0.5)."""
    nemo = {"model": {"optim": {"name": "adamw", "lr": 2.0, "sched": {"name": "NoamAnnealing", "d_model": 256}}}}
    assert only(nemo, "lr_high") == [] and only(nemo, "no_warmup") == []


def test_lr_fix_is_ten_times_lower_but_never_above_the_threshold():
    (ten_x,) = only({"optimizer": {"type": "Adam", "params": {"lr": 0.02}}}, "lr_high")
    assert ten_x.fix == pytest.approx(2e-3)
    (clamped,) = only({"optimizer": {"type": "Adam", "params": {"lr": 1.0}}}, "lr_high")
    assert clamped.fix == pytest.approx(3e-3)


@given(st.floats(min_value=1e-6, max_value=1e3, allow_nan=False))
def test_fixed_lr_never_trips_lr_high_again(lr):
    for config in (
        {"optimizer": {"type": "AdamW", "lr": lr}},
        {"learning_rate": lr, "output_dir": "o", "optim": "sgd"},
    ):
        fixed = fix_config(config).document
        assert [f for f in lint_config(fixed) if f.rule == "lr_high"] == []


# --- no_grad_clipping -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 0.0, None, False, math.inf, "inf", -1.0, "false"])
def test_disabled_clipping_values(value):
    (finding,) = only({"lr": 1e-4, "max_grad_norm": value}, "no_grad_clipping")
    assert finding.path == "max_grad_norm" and finding.fix == 1.0


@pytest.mark.parametrize(
    "config",
    [
        {"lr": 1e-4, "grad_clip": 0.5},
        {"gradient_clipping": "auto"},
        {"lr": 1e-4, "clip_grad": {"max_norm": 35}},
    ],
)
def test_enabled_clipping(config):
    assert only(config, "no_grad_clipping") == []


def test_mmcv_style_clipping_dict_points_at_max_norm():
    (finding,) = only({"lr": 1e-4, "optimizer_config": {"grad_clip": {"max_norm": 0}}}, "no_grad_clipping")
    assert finding.path == "optimizer_config.grad_clip.max_norm"


def test_missing_clipping_depends_on_the_format_default():
    assert (
        only({"output_dir": "o", "learning_rate": 1e-4, "logging_steps": 5}, "no_grad_clipping") == []
    )  # HF: 1.0
    (lightning,) = only({"trainer": {"max_epochs": 1}}, "no_grad_clipping")
    assert lightning.path == "trainer.gradient_clip_val" and not lightning.exists
    (free,) = only({"training": {"lr": 1e-4, "batch_size": 8}}, "no_grad_clipping")
    # Free-form: the clipping may be in the script, so it is a question with no fix.
    assert free.severity == "info" and free.fix is None and "does the training script clip" in free.message
    assert only({"batch_size": 8}, "no_grad_clipping") == []  # not a hyperparameter file


# --- precision ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({"fp16": {"enabled": True, "loss_scale": 1}}, "fp16.loss_scale"),
        ({"trainer": {"precision": "16-true"}}, "trainer.precision"),
        ({"fp16": True, "grad_scaler": False}, "grad_scaler"),
        ({"use_amp": True, "scaler": {"enabled": False}}, "scaler.enabled"),
        ({"amp": {"enabled": True, "opt_level": "O3"}}, "amp.loss_scale"),
    ],
)
def test_fp16_without_loss_scaling(config, path):
    (finding,) = only(config, "fp16_without_loss_scaling")
    assert finding.path == path


def test_scaler_switch_without_fp16_is_not_a_problem():
    assert only({"grad_scaler": False, "precision": "bf16-mixed"}, "fp16_without_loss_scaling") == []


def test_static_loss_scale():
    (finding,) = only({"fp16": {"enabled": True, "loss_scale": 128}}, "loss_scale_static")
    assert finding.fix == 0
    assert only({"fp16": {"enabled": True, "loss_scale": 0}}, "loss_scale_static") == []


def test_bf16_and_fp16_both():
    (finding,) = only({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "bf16_and_fp16_both")
    assert finding.path == "fp16.enabled" and finding.fix is False


@pytest.mark.parametrize(
    "pure",
    [
        {"trainer": {"precision": "16-true"}},
        {"torch_dtype": "float16"},
        {"half": True},
        {"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}},
    ],
)
def test_eps_underflow_needs_pure_fp16_weights(pure):
    config = {**pure, "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-4, "eps": 1e-8}}}
    (finding,) = only(config, "adam_eps_underflow")
    assert finding.path == "optimizer.init_args.eps" and finding.fix == pytest.approx(1e-6)


@pytest.mark.parametrize(
    "mixed", [{"fp16": True}, {"trainer": {"precision": "16-mixed"}}, {"fp16_full_eval": True}]
)
def test_eps_is_fine_with_fp32_master_weights(mixed):
    config = {
        **mixed,
        "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-4, "eps": 1e-8}},
    }
    assert only(config, "adam_eps_underflow") == []


@given(st.floats(min_value=1e-12, max_value=1e-3))
def test_eps_threshold_is_the_fp16_subnormal(eps):
    config = {"torch_dtype": "float16", "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "eps": eps}}}
    assert bool(only(config, "adam_eps_underflow")) is (eps < FP16_SMALLEST_SUBNORMAL)


def test_missing_eps_uses_the_default_1e8():
    hf = {"output_dir": "o", "logging_steps": 1, "learning_rate": 1e-4, "torch_dtype": "float16"}
    (finding,) = only(hf, "adam_eps_underflow")
    assert finding.path == "adam_epsilon" and not finding.exists and finding.fix == pytest.approx(1e-6)


def test_zero_eps():
    (finding,) = only({"optimizer": {"type": "Adam", "params": {"lr": 1e-4, "eps": 0}}}, "adam_eps_zero")
    assert finding.fix == pytest.approx(1e-8)


def test_layer_norm_eps_is_not_an_optimizer_eps():
    assert only({"model": {"norm": {"eps": 0}}, "torch_dtype": "float16"}, "adam_eps_zero") == []


# --- masks, logging, warmup ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-math.inf, "-inf", "float('-inf')", "-math.inf", " -Infinity ", math.inf])
def test_infinite_mask_values(value):
    (finding,) = only({"attn": {"mask_value": value}}, "inf_mask_value")
    assert finding.fix == math.copysign(1e9, finding.fix) and math.copysign(1, finding.fix) == math.copysign(
        1, -1 if "-" in str(value) else 1
    )


def test_infinite_values_elsewhere_are_not_masks():
    assert only({"max_grad_norm": 1.0, "threshold": -math.inf}, "inf_mask_value") == []


def test_nan_inf_filter_is_a_note_that_never_fails_nor_fixes():
    """Regression (issue 16, item 7): an info-only finding exited 1, and its fix contradicted
    docs/integrations.md, which keeps the filter on."""
    absent = {"training_args": {"output_dir": "o", "logging_steps": 10, "learning_rate": 1e-5}}
    assert only(absent, "nan_inf_filter") == []
    on = {"training_args": {**absent["training_args"], "logging_nan_inf_filter": True}}
    (finding,) = only(on, "nan_inf_filter")
    assert finding.severity == "info" and finding.fix is None and "Keep it on" in finding.message


@pytest.mark.parametrize(
    "config",
    [
        {"lr": 3e-4, "warmup_steps": 100},
        {"lr": 3e-4, "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 10}}},
        {"optimizer": {"lr": 3e-4}, "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.OneCycleLR"}},
        {"lr": 1e-5},  # too small to need one
        {"lr": 3e-4, "warmup": "auto"},
    ],
)
def test_warmup_present_or_not_needed(config):
    assert only(config, "no_warmup") == []


def test_onecycle_with_zero_warmup_is_flagged():
    config = {"lr": 3e-4, "sched": {"type": "OneCycleLR", "pct_start": 0}}
    (finding,) = only(config, "no_warmup")
    assert finding.path == "sched.pct_start" and finding.fix == pytest.approx(0.03)


@pytest.mark.parametrize(("major", "key"), [(4, "warmup_ratio"), (5, "warmup_steps")])
def test_hf_warmup_key_follows_transformers_version(monkeypatch, major, key):
    monkeypatch.setattr(rules_module, "transformers_major", lambda: major)
    (finding,) = only({"output_dir": "o", "logging_steps": 1, "learning_rate": 3e-4}, "no_warmup")
    assert finding.path == key and finding.fix == pytest.approx(0.03)


def test_hf_warmup_uses_max_steps_when_known():
    (finding,) = only(
        {"output_dir": "o", "logging_steps": 1, "learning_rate": 3e-4, "max_steps": 2000}, "no_warmup"
    )
    assert finding.path == "warmup_steps" and finding.fix == 60


def test_missing_eps_only_for_adam():
    sgd = {
        "output_dir": "o",
        "logging_steps": 1,
        "optim": "sgd",
        "learning_rate": 0.05,
        "torch_dtype": "float16",
    }
    assert only(sgd, "adam_eps_underflow") == []
    lightning = {
        "trainer": {"precision": "16-true"},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4}},
    }
    (finding,) = only(lightning, "adam_eps_underflow")
    assert finding.path == "optimizer.init_args.eps" and finding.insert_after == "lr"
    fixed = fix_config(lightning).document
    assert list(fixed["optimizer"]["init_args"]) == ["lr", "eps"]


# --- every fix passes its own check, on arbitrary configs -------------------------------------------

_KEYS = st.sampled_from(
    [
        "lr",
        "learning_rate",
        "max_lr",
        "optimizer",
        "optim",
        "type",
        "class_path",
        "init_args",
        "params",
        "eps",
        "adam_epsilon",
        "max_grad_norm",
        "grad_clip",
        "gradient_clip_val",
        "gradient_clipping",
        "fp16",
        "bf16",
        "enabled",
        "precision",
        "torch_dtype",
        "loss_scale",
        "use_loss_scaling",
        "warmup_steps",
        "warmup_ratio",
        "max_steps",
        "mask_value",
        "logging_nan_inf_filter",
        "output_dir",
        "logging_steps",
        "trainer",
        "model",
        "scheduler",
        "momentum",
        "opt_level",
        "amp",
    ]
)
_VALUES = st.sampled_from(
    [
        0,
        1,
        128,
        0.0,
        1e-8,
        1e-4,
        3e-3,
        0.05,
        2.0,
        True,
        False,
        None,
        "-inf",
        -math.inf,
        "auto",
        "AdamW",
        "sgd",
        "16-true",
        "16-mixed",
        "bf16-mixed",
        "float16",
        "O3",
        "torch.optim.Adam",
    ]
)
_CONFIGS = st.recursive(_VALUES, lambda inner: st.dictionaries(_KEYS, inner, max_size=5), max_leaves=14)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_KEYS, _CONFIGS, min_size=1, max_size=6))
def test_fixing_any_config_leaves_no_fixable_finding(config):
    result = fix_config(config)
    assert [f for f in result.remaining if f.fixable] == []


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(_KEYS, _CONFIGS, min_size=1, max_size=6), st.sampled_from(["json", "yaml"]))
def test_fixing_any_config_file_leaves_no_fixable_finding(tmp_path_factory, config, fmt):
    from ruamel.yaml import YAML

    path = tmp_path_factory.mktemp("fuzz") / f"train.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(config, indent=2))
    else:
        with path.open("w") as out:
            YAML().dump(config, out)
    before = path.read_bytes()
    result = fix_config(path)
    assert path.read_bytes() == before
    if result.output_path is not None:
        assert [f for f in lint_config(result.output_path) if f.fixable] == []


def test_deepspeed_apex_block_counts_as_fp16():
    config = {"amp": {"enabled": True}, "attention": {"mask_value": "-inf"}}
    (finding,) = only(config, "inf_mask_value")
    assert finding.fix == -1e4


def test_fix_under_a_scalar_section_is_left_to_a_person_instead_of_crashing():
    # Found by hypothesis: `trainer: 0` cannot hold the gradient_clip_val a LightningCLI fix would add.
    config = {"trainer": 0, "model": {"class_path": 0}}
    result = fix_config(config)
    clipping = [f for f in result.remaining if f.rule == "no_grad_clipping"]
    assert clipping and not clipping[0].fixable
    assert "set it by hand" in clipping[0].message
    assert result.document == config
