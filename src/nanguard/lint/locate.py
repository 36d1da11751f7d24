"""What a config says, independent of how it is spelled: its format, optimizer, precision and length.

Each function here reads the parsed tree and returns plain facts (key paths and values); the rules
decide what is wrong with them. Formats are recognised by *sections*, because real files mix them:
Hugging Face TrainingArguments nested under ``training_args:``, a DeepSpeed dict inside HF args, an
Accelerate config with a ``deepspeed_config`` block.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nanguard.lint import vocabulary as vocab
from nanguard.lint.findings import KeyPath
from nanguard.lint.tree import as_bool, as_number, as_text, get_path, is_deferred, key_name, parent_name, walk


@dataclass(frozen=True)
class Sections:
    """Where each known format lives in the tree (``()`` = the root; None = not present)."""

    huggingface: KeyPath | None = None
    lightning: bool = False
    deepspeed: KeyPath | None = None
    accelerate: bool = False
    jsonargparse: bool = False  # class_path/init_args without a Lightning trainer (litgpt)
    hydra: bool = False  # _target_ or a defaults list: keys become constructor arguments
    nanogpt: bool = False  # a nanoGPT config/*.py (train.py supplies every default)
    torchtitan: bool = False  # a torchtitan train config (TOML)

    @property
    def shape(self) -> str:
        """The name of the format the file as a whole is written in."""
        for name, present in (
            ("nanogpt", self.nanogpt),
            ("torchtitan", self.torchtitan),
            ("deepspeed", self.deepspeed == ()),
            ("lightning", self.lightning),
            ("huggingface", self.huggingface is not None),
            ("accelerate", self.accelerate),
            ("jsonargparse", self.jsonargparse),
            ("hydra", self.hydra),
        ):
            if present:
                return name
        return "freeform"

    @property
    def defaults_elsewhere(self) -> bool:
        """True when settings this file leaves out have defaults in code nanguard cannot see."""
        return self.shape in ("freeform", "jsonargparse", "hydra", "accelerate")


def find_sections(data: Mapping[Any, Any], fmt: str = "mapping") -> Sections:
    lightning = _is_lightning(data)
    keys = _lower_keys(data)
    return Sections(
        huggingface=_huggingface_section(data),
        lightning=lightning,
        deepspeed=_deepspeed_section(data),
        accelerate=len(keys & vocab.ACCELERATE_MARKER_KEYS) >= 1,
        jsonargparse=not lightning and any(key_name(p) == "class_path" for p, _, _ in walk(data)),
        hydra="defaults" in keys or any(key_name(p) == "_target_" for p, _, _ in walk(data)),
        nanogpt=fmt == "python",
        torchtitan=fmt == "toml" and bool(keys & {"optimizer", "training", "lr_scheduler", "job"}),
    )


def _lower_keys(mapping: Mapping[Any, Any]) -> set[str]:
    return {str(key).lower() for key in mapping}


def _huggingface_section(data: Mapping[Any, Any]) -> KeyPath | None:
    if len(_lower_keys(data) & vocab.HF_MARKER_KEYS) >= 2:
        return ()
    for key, value in data.items():
        if isinstance(value, Mapping) and len(_lower_keys(value) & vocab.HF_MARKER_KEYS) >= 2:
            return (key,)
    return None


def _is_lightning(data: Mapping[Any, Any]) -> bool:
    """A Lightning Trainer section, or a LightningCLI model/data class (an optimizer class alone is any
    jsonargparse CLI's, litgpt's for one, whose schema has no trainer section)."""
    trainer = data.get("trainer")
    if isinstance(trainer, Mapping) and "_target_" not in trainer:
        return True
    return any(
        isinstance(data.get(section), Mapping) and "class_path" in data[section] for section in ("model", "data")
    )


def _deepspeed_section(data: Mapping[Any, Any]) -> KeyPath | None:
    if _looks_like_deepspeed(data):
        return ()
    for path, value, _ in walk(data):
        if len(path) <= 3 and key_name(path) in vocab.DEEPSPEED_SECTION_KEYS and isinstance(value, Mapping):
            return path
    return None


def _looks_like_deepspeed(mapping: Mapping[Any, Any]) -> bool:
    if _lower_keys(mapping) & vocab.DEEPSPEED_MARKER_KEYS:
        return True
    optimizer = mapping.get("optimizer")
    if isinstance(optimizer, Mapping) and "type" in optimizer and "params" in optimizer:
        return True
    return any(isinstance(mapping.get(k), Mapping) and "enabled" in mapping[k] for k in ("fp16", "bf16"))


# --- optimizer family -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """Learning-rate thresholds of one optimizer family (see the lr_high and no_warmup rule docs)."""

    name: str
    lr_error: float
    lr_warn_fine_tuning: float | None
    warmup_from: float | None
    has_eps: bool


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("adam", 3e-3, 1e-3, 1e-4, True),
        Family("lion", 1e-3, 3e-4, 3e-5, False),
        Family("adafactor", 1e-2, None, 1e-4, True),
        Family("lamb", 2e-2, None, 1e-4, True),
        Family("rmsprop", 1e-2, None, 1e-4, True),
        Family("adagrad", 0.1, None, None, True),
        Family("sgd", 1.0, None, 0.1, False),
        Family("unknown", 1.0, None, 1e-4, True),
    )
}


def family_of_name(name: str) -> str:
    """'torch.optim.AdamW', 'adamw_torch_fused', 'FusedAdam', 'paged_adamw_8bit' -> 'adam', etc."""
    text = name.lower()
    for needle, family in (
        ("lion", "lion"),
        ("lamb", "lamb"),
        ("adafactor", "adafactor"),
        ("adagrad", "adagrad"),
        ("rmsprop", "rmsprop"),
        ("adam", "adam"),
        ("sgd", "sgd"),
        ("nesterov", "sgd"),
    ):
        if needle in text:
            return family
    return "unknown"


def optimizer_family(data: Mapping[Any, Any], key_path: KeyPath, sections: Sections) -> str:
    """The family of the optimizer a learning rate (or eps) at ``key_path`` belongs to.

    The nearest declaration wins, walking up from the key: an optimizer name at some level
    (``optim: adamw_torch``), or the class of an optimizer mapping (``optimizer: {type: AdamW}``);
    then sibling hints (``betas`` -> Adam, ``momentum`` -> SGD); then Hugging Face's default AdamW.
    """
    for depth in range(len(key_path) - 1, -1, -1):
        mapping = get_path(data, key_path[:depth])
        if isinstance(mapping, Mapping):
            declared = _declared_family(mapping, key_name(key_path[:depth]))
            if declared is not None:
                return declared
    siblings = {str(k).lower() for k in get_path(data, key_path[:-1], {})}
    if siblings & vocab.ADAM_HINT_KEYS:
        return "adam"
    if siblings & vocab.SGD_HINT_KEYS:
        return "sgd"
    if sections.huggingface is not None or sections.nanogpt:
        return "adam"  # TrainingArguments' and nanoGPT's train.py's default is AdamW
    return "unknown"


def _declared_family(mapping: Mapping[Any, Any], own_key: str) -> str | None:
    for key, value in mapping.items():
        if str(key).lower() not in vocab.OPTIMIZER_NAME_KEYS:
            continue
        if isinstance(value, str) and not is_deferred(value):
            return family_of_name(value)
        if isinstance(value, Mapping):
            name = _class_name(value)
            if name is not None:
                return family_of_name(name)
    if "optim" in own_key:
        name = _class_name(mapping)
        if name is not None:
            return family_of_name(name)
    return None


def _class_name(mapping: Mapping[Any, Any]) -> str | None:
    for key in vocab.CLASS_NAME_KEYS:
        value = mapping.get(key)
        if isinstance(value, str) and not is_deferred(value):
            return value
    return None


def is_optimizer_scope(key_path: KeyPath) -> bool:
    """True when some key on the path names an optimizer section (``optimizer``, ``optim_args``...)."""
    return any(isinstance(part, str) and "optim" in part.lower() for part in key_path[:-1])


# --- run length and intent --------------------------------------------------------------------------


def total_steps(data: Mapping[Any, Any]) -> tuple[str, int] | None:
    """The first positive ``max_steps``-like setting as (key name, steps); HF's -1 means unset."""
    for path, value, _ in walk(data):
        name = key_name(path)
        number = as_number(value)
        known = name in vocab.TOTAL_STEP_KEYS or (name == "steps" and parent_name(path) in ("training", "train"))
        if known and number is not None and number >= 1 and number.is_integer():
            return name, int(number)
    return None


def total_epochs(data: Mapping[Any, Any]) -> float | None:
    for path, value, _ in walk(data):
        number = as_number(value)
        if key_name(path) in vocab.EPOCH_KEYS and number is not None and number > 0:
            return number
    return None


def uses_adapters(data: Mapping[Any, Any]) -> bool:
    """LoRA/QLoRA/PEFT adapters (axolotl ``adapter: lora``, LLaMA-Factory ``finetuning_type: lora``,
    ``lora_r``/``peft_config`` keys)."""
    for path, value, _ in walk(data):
        name = key_name(path)
        if name in vocab.ADAPTER_KEYS and value not in (None, False, 0, ""):
            return True
        text = as_text(value)
        if name in ("adapter", "finetuning_type", "peft_type", "method") and text in vocab.ADAPTER_VALUES:
            return True
    return False


def looks_like_fine_tuning(data: Mapping[Any, Any], sections: Sections) -> bool:
    """HF TrainingArguments, or a key saying the run starts from pretrained weights or trains adapters."""
    if sections.huggingface is not None:
        return True
    for path, value, _ in walk(data):
        if key_name(path) not in vocab.FINE_TUNING_KEYS or value is None:
            continue
        if isinstance(value, Mapping) or as_bool(value) is True:
            return True
        if isinstance(value, bool) or as_bool(value) is False:
            continue
        text = as_text(value)
        if text is not None and text not in vocab.NOT_FINE_TUNING_VALUES and as_bool(value) is not False:
            return True
    return False


# --- precision ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    key_path: KeyPath
    value: Any


@dataclass(frozen=True)
class ScalingProblem:
    """A loss-scaling setting that is off or static; ``fix`` None when its right value is not known."""

    key_path: KeyPath
    value: Any
    kind: str  # "off" or "static"
    fix: Any
    reason: str
    exists: bool = True
    insert_after: str | None = None


@dataclass
class Precision:
    fp16: list[Setting] = field(default_factory=list)  # anything that makes training use float16
    fp16_switches: list[Setting] = field(default_factory=list)  # the boolean ones, which a fix can turn off
    bf16: list[Setting] = field(default_factory=list)
    pure_fp16: list[Setting] = field(default_factory=list)  # weights or master weights held in float16
    scaling: list[ScalingProblem] = field(default_factory=list)


def read_precision(data: Mapping[Any, Any]) -> Precision:
    """Every precision and loss-scaling setting in the tree, read with each format's meaning."""
    facts = Precision()
    for path, value, parent in walk(data):
        if not isinstance(parent, Mapping):
            continue
        name = key_name(path)
        if name in vocab.FP16_SWITCH_KEYS | vocab.BF16_SWITCH_KEYS:
            _read_switch(facts, path, value, fp16=name in vocab.FP16_SWITCH_KEYS)
        elif name in vocab.PRECISION_KEYS:
            _read_precision_text(facts, path, value)
        elif name in vocab.AMP_SWITCH_KEYS:
            _read_amp(facts, path, value, parent)
        elif name == "opt_level":
            _read_apex_level(facts, path, value, parent)
        elif (name in vocab.PURE_FP16_SWITCH_KEYS and as_bool(value) is True) or (
            _is_weight_dtype(name, path) and as_text(value) in vocab.FP16_DTYPE_VALUES
        ):
            facts.pure_fp16.append(Setting(path, value))
            facts.fp16.append(Setting(path, value))
        elif name in vocab.AMP_DTYPE_KEYS and as_text(value) in vocab.FP16_DTYPE_VALUES:
            facts.fp16.append(Setting(path, value))  # float16 autocast: fp32 weights, mixed precision
    if facts.fp16:
        facts.scaling = _read_scaling(data)
    return facts


def _read_switch(facts: Precision, path: KeyPath, value: Any, *, fp16: bool) -> None:
    if isinstance(value, Mapping):  # DeepSpeed: {"fp16": {"enabled": true, ...}}
        if "enabled" not in value:
            return
        path, value = (*path, "enabled"), value["enabled"]
    if as_bool(value) is not True:
        return
    setting = Setting(path, value)
    if fp16:
        facts.fp16.append(setting)
        facts.fp16_switches.append(setting)
    else:
        facts.bf16.append(setting)


def _read_precision_text(facts: Precision, path: KeyPath, value: Any) -> None:
    text = as_text(value)
    if text in vocab.FP16_PURE_VALUES:
        facts.fp16.append(Setting(path, value))
        facts.pure_fp16.append(Setting(path, value))
    elif text in vocab.FP16_MIXED_VALUES:
        facts.fp16.append(Setting(path, value))
    elif text in vocab.BF16_VALUES:
        facts.bf16.append(Setting(path, value))


def _read_amp(facts: Precision, path: KeyPath, value: Any, parent: Mapping[Any, Any]) -> None:
    if isinstance(value, Mapping):  # DeepSpeed's apex block: {"amp": {"enabled": true, "opt_level": "O1"}}
        if "opt_level" not in value and as_bool(value.get("enabled")) is True:
            facts.fp16.append(Setting((*path, "enabled"), value["enabled"]))  # apex's default level, O1
        return  # an explicit opt_level is read on its own
    if as_bool(value) is not True:
        return
    dtypes = {as_text(parent.get(k)) for k in parent if str(k).lower() in vocab.AMP_DTYPE_KEYS}
    if dtypes & vocab.BF16_VALUES:
        facts.bf16.append(Setting(path, value))
    else:
        facts.fp16.append(Setting(path, value))


def _read_apex_level(facts: Precision, path: KeyPath, value: Any, parent: Mapping[Any, Any]) -> None:
    level = as_text(value)
    if level not in ("o1", "o2", "o3") or as_bool(parent.get("enabled", True)) is False:
        return
    facts.fp16.append(Setting(path, value))
    if level == "o3":
        facts.pure_fp16.append(Setting(path, value))


def _is_weight_dtype(name: str, path: KeyPath) -> bool:
    """``torch_dtype``-like keys anywhere; a bare ``dtype`` only under a model section. A top-level
    ``dtype`` is the autocast dtype in nanoGPT-style scripts (fp32 weights, a GradScaler for float16),
    so it says nothing about the weights."""
    if name in vocab.WEIGHT_DTYPE_KEYS:
        return True
    return name == "dtype" and any(isinstance(p, str) and "model" in p.lower() for p in path[:-1])


def _read_scaling(data: Mapping[Any, Any]) -> list[ScalingProblem]:
    problems: list[ScalingProblem] = []
    for path, value, parent in walk(data):
        if not isinstance(parent, Mapping):
            continue
        name = key_name(path)
        if name == "loss_scale":
            problem = _loss_scale_problem(path, value)
            if problem is not None:
                problems.append(problem)
        elif name in vocab.SCALER_SWITCH_KEYS:
            if isinstance(value, Mapping):  # {"scaler": {"enabled": false, ...}}
                if "enabled" not in value:
                    continue
                path, value = (*path, "enabled"), value["enabled"]
            if as_bool(value) is False:
                problems.append(
                    ScalingProblem(path, value, "off", True, f"{name} turns the gradient scaler off")
                )
        elif name in vocab.DYNAMIC_SCALE_SWITCH_KEYS and as_bool(value) is False:
            problems.append(
                ScalingProblem(path, value, "static", True, f"{name}: false fixes the loss scale")
            )
        elif name in vocab.PRECISION_KEYS and as_text(value) in vocab.FP16_PURE_VALUES:
            problems.append(
                ScalingProblem(
                    path, value, "off", "16-mixed", f"precision {value!r} runs pure fp16 with no GradScaler"
                )
            )
        elif name == "opt_level" and as_text(value) == "o3" and "loss_scale" not in parent:
            problems.append(
                ScalingProblem(
                    (*path[:-1], "loss_scale"),
                    None,
                    "off",
                    "dynamic",
                    "apex opt_level O3 defaults to loss_scale 1.0 (no scaling)",
                    exists=False,
                    insert_after=str(path[-1]),
                )
            )
    return problems


def _loss_scale_problem(path: KeyPath, value: Any) -> ScalingProblem | None:
    """DeepSpeed/apex/Megatron meaning: 0, null or 'dynamic' = dynamic; 1 = none; any other number = static."""
    number = as_number(value)
    if number is None or number == 0:
        return None
    parent = key_name(path[:-1])
    fix: Any = 0 if parent == "fp16" else ("dynamic" if parent == "amp" else None)
    if number == 1:
        return ScalingProblem(path, value, "off", fix, "loss_scale fixed at 1 means no loss scaling")
    return ScalingProblem(path, value, "static", fix, f"loss_scale fixed at {value} is a static scale")
