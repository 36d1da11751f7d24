"""Naming the step's tensors as the user names them: forward arguments, loop variables, dict keys.

Events say ``labels`` or ``attention_mask``, not ``args[1]``: the arguments of the model's ``forward``
are bound to its signature, and then the user's own frames (a local variable, a key of a batch dict)
are searched for the same tensors. Library frames (torch, nanguard) are skipped.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from typing import Any

import torch

_SIGNATURES: weakref.WeakKeyDictionary[Any, inspect.Signature] = weakref.WeakKeyDictionary()


def _forward_signature(module: torch.nn.Module) -> inspect.Signature:
    """``inspect.signature`` is slow and runs once per step here: cache it per forward function."""
    forward = getattr(module.forward, "__func__", module.forward)
    try:
        return _SIGNATURES[forward]
    except (KeyError, TypeError):
        signature = inspect.signature(module.forward)
        try:
            _SIGNATURES[forward] = signature
        except TypeError:
            pass
        return signature


def named_call_arguments(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Name the tensors of a module call as users name them: ``input_ids``, ``labels``, ``x[3]``, ``batch.mask``."""
    try:
        bound = _forward_signature(module).bind_partial(*args, **kwargs)
        pairs = list(bound.arguments.items())
    except (TypeError, ValueError):
        pairs = [(f"args[{i}]", a) for i, a in enumerate(args)] + list(kwargs.items())
    named: dict[str, Any] = {}
    for name, value in pairs:
        if isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            for key, inner in value.items():
                named[str(key) if name in ("kwargs", "batch", "inputs") else f"{name}.{key}"] = inner
        elif isinstance(value, (list, tuple)) and value and any(isinstance(v, torch.Tensor) for v in value):
            for i, inner in enumerate(value):
                named[f"{name}[{i}]"] = inner
        else:
            named[name] = value
    return {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}


def is_library_module(name: str) -> bool:
    """torch's and nanguard's own frames (not a user package that merely starts with those letters)."""
    return any(name == root or name.startswith(root + ".") for root in ("torch", "nanguard"))


def tensors_from_traceback(exc: BaseException) -> dict[str, Any]:
    """Tensors visible in the user's frames of the traceback, innermost first, named as the user named them."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    found: dict[str, Any] = {}
    seen: set[int] = set()
    for frame in reversed(frames):
        module = frame.f_globals.get("__name__", "")
        if is_library_module(module):
            continue
        for name, value in frame.f_locals.items():
            items = value.items() if isinstance(value, dict) else [(name, value)]
            for key, inner in items:
                if isinstance(inner, torch.Tensor) and not isinstance(inner, torch.nn.Parameter) and id(inner) not in seen:
                    seen.add(id(inner))
                    found.setdefault(str(key), inner)
    return found


def _storage_key(tensor: torch.Tensor) -> tuple[int, int, int]:
    try:
        return (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()), tensor.numel())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return (id(tensor), 0, -1)


def name_from_frames(named: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Prefer the user's own names for batch tensors: a key of a dict in their loop, or a local variable.

    Returns the renamed batch and the mapping from the original names.
    """
    if not named:
        return named, {}
    by_id = {id(v): k for k, v in named.items()}
    # A reshape or view of the user's tensor (``labels.reshape(-1)``) shares its storage and size.
    by_storage = {_storage_key(v): id(v) for v in named.values() if isinstance(v, torch.Tensor)}
    renamed: dict[int, str] = {}
    frame = sys._getframe(1)
    depth = 0
    while frame is not None and depth < 40:
        module = frame.f_globals.get("__name__", "")
        if not is_library_module(module):
            for var, value in list(frame.f_locals.items()):
                if var.startswith("_"):
                    continue
                if isinstance(value, torch.Tensor) and id(value) in by_id:
                    renamed.setdefault(id(value), var)
                elif isinstance(value, torch.Tensor) and _storage_key(value) in by_storage:
                    renamed.setdefault(by_storage[_storage_key(value)], var)
                elif isinstance(value, dict):
                    for key, inner in value.items():
                        if isinstance(inner, torch.Tensor) and id(inner) in by_id and isinstance(key, str):
                            renamed[id(inner)] = key
            if renamed:
                break
        frame = frame.f_back  # type: ignore[assignment]
        depth += 1
    out: dict[str, Any] = {}
    mapping: dict[str, str] = {}
    for key, value in named.items():
        name = renamed.get(id(value), key)
        if name in out and out[name] is not value:
            name = key
        out[name] = value
        mapping[key] = name
    return out, mapping
