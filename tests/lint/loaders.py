"""Each ecosystem's own config loader, to re-read what ``nanguard lint --fix`` wrote.

A loader returns the config as that tool sees it (a mapping), or raises the tool's own error when it
rejects the file. Loaders whose package is not installed skip the test that asked for them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml


def pyyaml(path: Path) -> Any:
    """What ``yaml.safe_load`` (YAML 1.1) gives: many training scripts read their configs this way."""
    return yaml.safe_load(path.read_text())


def omegaconf(path: Path) -> Any:
    """Hydra and NeMo read configs through OmegaConf."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def hf(path: Path) -> Any:
    """Hugging Face recipes are parsed into TrainingArguments (axolotl, LLaMA-Factory, TRL do the same
    for these fields); model and data keys belong to other dataclasses and are allowed through."""
    from transformers import HfArgumentParser, TrainingArguments

    data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    known = {k: v for k, v in data.items() if k in fields}
    known.setdefault("output_dir", "/tmp/nanguard-test-out")
    # Precision switches need a GPU to construct (checked for type here instead), a DeepSpeed path
    # names a file; "auto" (axolotl: bf16: auto) is resolved by the recipe's own launcher.
    hardware = {k: known.pop(k) for k in ("fp16", "bf16", "tf32", "deepspeed") if k in known}
    assert all(v in (True, False, None, "auto") for k, v in hardware.items() if k != "deepspeed")
    (args,) = HfArgumentParser(TrainingArguments).parse_dict(known, allow_extra_keys=True)
    return {**data, **{k: getattr(args, k) for k in known}}


def deepspeed(path: Path) -> Any:
    """DeepSpeed's own config class validates its blocks (pydantic: unknown fp16 keys are rejected)."""
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    data = json.loads(path.read_text())
    filled = json.loads(json.dumps(data).replace('"auto"', "1"))  # HF/Accelerate fill "auto" at launch
    for block in ("fp16", "bf16"):
        if isinstance(filled.get(block), dict) and filled[block].get("enabled") == 1:
            filled[block]["enabled"] = block == "bf16"
    ds_config.DeepSpeedConfig(filled)
    return data


def accelerate(path: Path) -> Any:
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    return {**yaml.safe_load(path.read_text()), "deepspeed_config": config.deepspeed_config}


def toml(path: Path) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads(path.read_text())


def nanogpt(path: Path) -> Any:
    """nanoGPT's configurator runs the file with exec() over train.py's globals (these are our own test
    files, so running them is safe); the config is what the file assigned."""
    before: dict[str, Any] = {"__builtins__": __builtins__}
    exec(compile(path.read_text(), str(path), "exec"), before)
    return {k: v for k, v in before.items() if not k.startswith("__") and not callable(v) and k != "time"}


def lightning_cli(path: Path) -> Any:
    """LightningCLI's parser for the sections it owns: the Trainer's arguments and the optimizer and LR
    scheduler classes (jsonargparse checks init_args against each class's signature)."""
    import torch
    from jsonargparse import ArgumentParser
    from lightning.pytorch import Trainer

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--seed_everything", type=int)
    parser.add_class_arguments(Trainer, "trainer", fail_untyped=False)
    parser.add_argument("--model", type=dict)
    parser.add_argument("--data", type=dict)
    parser.add_subclass_arguments(torch.optim.Optimizer, "optimizer", skip={"params"}, fail_untyped=False)
    parser.add_subclass_arguments(
        torch.optim.lr_scheduler.LRScheduler, "lr_scheduler", skip={"optimizer"}, fail_untyped=False
    )
    parser.parse_path(str(path))
    return yaml.safe_load(path.read_text())


def _litgpt(module: str) -> Callable[[Path], Any]:
    def load(path: Path) -> Any:
        pytest.importorskip("litgpt")
        import importlib

        from jsonargparse import ArgumentParser

        parser = ArgumentParser(exit_on_error=False)
        parser.add_function_arguments(importlib.import_module(module).setup)
        parser.parse_path(str(path))
        return yaml.safe_load(path.read_text())

    return load


LOADERS: dict[str, Callable[[Path], Any]] = {
    "pyyaml": pyyaml,
    "omegaconf": omegaconf,
    "hf": hf,
    "deepspeed": deepspeed,
    "accelerate": accelerate,
    "toml": toml,
    "nanogpt": nanogpt,
    "lightning_cli": lightning_cli,
    "litgpt_full": _litgpt("litgpt.finetune.full"),
    "litgpt_lora": _litgpt("litgpt.finetune.lora"),
}
