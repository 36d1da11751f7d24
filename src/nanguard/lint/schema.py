"""Which new keys a config's own loader accepts, so ``--fix`` never writes one it would reject.

Changing the value of a key the file already has is always safe for its loader. Adding a key is
not: a jsonargparse (litgpt, LightningCLI) schema rejects unknown options, a Hydra ``_target_``
mapping passes every key to a constructor, and a free-form file's keys mean something only if the
training code reads them. A key is added only where its schema is known to take it: Hugging Face
TrainingArguments fields, DeepSpeed's top level and fp16 block, a Lightning ``trainer`` section, a
torch or DeepSpeed Adam-family optimizer's arguments, nanoGPT's ``train.py`` globals, torchtitan's
tables. Everywhere else the finding says what to change by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nanguard.lint.findings import KeyPath
from nanguard.lint.locate import Sections, family_of_name
from nanguard.lint.tree import get_path

HF_FIELDS = frozenset(
    {"max_grad_norm", "warmup_ratio", "warmup_steps", "adam_epsilon", "logging_nan_inf_filter", "fp16", "bf16"}
)
DEEPSPEED_ROOT_FIELDS = frozenset({"gradient_clipping"})
DEEPSPEED_FP16_FIELDS = frozenset({"loss_scale", "enabled"})
LIGHTNING_TRAINER_FIELDS = frozenset({"gradient_clip_val", "precision"})
ADAM_ARGUMENTS = frozenset({"eps"})
NANOGPT_GLOBALS = frozenset({"grad_clip", "warmup_iters", "learning_rate", "dtype", "min_lr", "beta2"})
TORCHTITAN_FIELDS: dict[tuple[str, ...], set[str]] = {
    ("optimizer",): {"eps", "lr"},
    ("training",): {"max_norm"},
    ("lr_scheduler",): {"warmup_steps"},
}
_CLASS_KEYS = ("_target_", "class_path", "type", "name")


def accepts_new_key(data: Mapping[Any, Any], sections: Sections, key_path: KeyPath) -> bool:
    """True when the loader of this config is known to accept a new key at ``key_path``."""
    container, key = key_path[:-1], str(key_path[-1])
    if sections.nanogpt:
        return not container and key in NANOGPT_GLOBALS
    if sections.torchtitan:
        return key in TORCHTITAN_FIELDS.get(tuple(str(p) for p in container), set())
    if sections.huggingface is not None and container == sections.huggingface:
        return key in HF_FIELDS
    if sections.deepspeed is not None:
        if container == sections.deepspeed and key in DEEPSPEED_ROOT_FIELDS:
            return True
        if container == (*sections.deepspeed, "fp16") and key in DEEPSPEED_FP16_FIELDS:
            return True
    if sections.lightning and container == ("trainer",) and key in LIGHTNING_TRAINER_FIELDS:
        return True
    if key in ADAM_ARGUMENTS and _adam_arguments(data, container):
        return True
    return container[-1:] == ("amp",) and key == "loss_scale" and "opt_level" in get_path(data, container, {})


def _adam_arguments(data: Mapping[Any, Any], container: KeyPath) -> bool:
    """``container`` holds the keyword arguments of a known torch or DeepSpeed Adam-family optimizer:
    ``{_target_: torch.optim.AdamW, lr: ...}``, ``{class_path: ..., init_args: {...}}`` or DeepSpeed's
    ``{type: Adam, params: {...}}``."""
    own = get_path(data, container)
    if not isinstance(own, Mapping):
        return False
    if _is_adam(own):
        return "_target_" in own  # Hydra passes the mapping's keys to the constructor
    parent = get_path(data, container[:-1]) if container else None
    if isinstance(parent, Mapping) and container[-1:] in (("init_args",), ("params",)):
        return _is_adam(parent)
    return False


def _is_adam(mapping: Mapping[Any, Any]) -> bool:
    for key in _CLASS_KEYS:
        name = mapping.get(key)
        if isinstance(name, str) and family_of_name(name) == "adam" and _known_adam(name):
            return True
    return False


def _known_adam(name: str) -> bool:
    """torch.optim's and DeepSpeed's Adam classes take ``eps``; bitsandbytes/apex names do too."""
    last = name.rsplit(".", 1)[-1].lower()
    return last in {"adam", "adamw", "fusedadam", "deepspeedcpuadam", "nadam", "radam", "adamax", "adam8bit", "adamw8bit"}
