"""Replace target ``nn.Linear`` layers of a causal LM by ``LoraLinear`` (once)."""

from __future__ import annotations

import re

from torch import nn

from adapter_core import attention
from adapter_core.int8 import Int8Linear
from adapter_core.layer import LoraLinear, ModelKey
from adapter_core.policies.base import ModuleInfo

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def _layer_index(name: str) -> int:
    m = _LAYER_INDEX.search(f".{name}.")
    return int(m.group(1)) if m else -1


def inject_adapters(model: nn.Module, target_modules=None) -> dict[str, ModuleInfo]:
    """Wrap every linear layer whose short name is in ``target_modules``; freeze the base.

    Idempotent: layers already wrapped are kept; calling again with more targets
    wraps the new ones too. Returns ``{full module name: ModuleInfo}`` of all
    wrapped layers, in model order.
    """
    targets = set(target_modules or DEFAULT_TARGET_MODULES)
    model.requires_grad_(False)
    key = getattr(model, "_dynarank_key", None)
    if key is None:
        key = ModelKey()
        model._dynarank_key = key
    attention.install(model)
    for name, module in list(model.named_modules()):
        short = name.rsplit(".", 1)[-1]
        if short not in targets or type(module) not in (nn.Linear, Int8Linear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(module, name, key))
    infos = {
        name: ModuleInfo(name, m.in_features, m.out_features, _layer_index(name))
        for name, m in model.named_modules()
        if isinstance(m, LoraLinear) and m.lora_key is key
    }
    if not infos:
        raise ValueError(f"no linear layer named any of {sorted(targets)} in the model")
    return infos


def adapted_modules(model: nn.Module) -> dict[str, ModuleInfo]:
    """The modules already wrapped (without wrapping anything)."""
    key = getattr(model, "_dynarank_key", None)
    return {
        name: ModuleInfo(name, m.in_features, m.out_features, _layer_index(name))
        for name, m in model.named_modules()
        if isinstance(m, LoraLinear) and m.lora_key is key
    }
