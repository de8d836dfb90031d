"""``LoraLinear``: a frozen linear layer that adds the LoRA update of the adapter
bound to the current call.

The adapter is not module state. ``use_adapter(model, ...)`` binds it in a
``contextvars.ContextVar``, so each thread (and each asyncio task) sees its own
binding and two forwards with different adapters can share one base model.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# {model key: binding}. A binding is one adapter source for the whole batch, or a
# tuple with one source (or None = base model) per batch row. A source is anything
# with ``lora_factors(name) -> (A, B, scale) | None``: a snapshot or a live Adapter.
_BINDINGS: contextvars.ContextVar[dict] = contextvars.ContextVar("dynarank_adapter_bindings", default={})


class ModelKey:
    """Identifies one injected model; shared by its LoraLinear layers (and copied with a deepcopy)."""

    __slots__ = ("__weakref__",)


class LoraLinear(nn.Linear):
    """An ``nn.Linear`` that shares the original layer's frozen weight and bias.

    Subclassing keeps the state-dict keys (``...q_proj.weight``) and the
    ``isinstance(m, nn.Linear)`` checks of the base model working.
    """

    def __init__(self, base: nn.Linear, name: str, key: ModelKey):
        nn.Module.__init__(self)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.lora_name = name
        self.lora_key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        binding = _BINDINGS.get().get(self.lora_key)
        if binding is None:
            return y
        if not isinstance(binding, tuple):
            return _add_update(y, x, binding.lora_factors(self.lora_name))
        return self._forward_rows(y, x, binding)

    def _forward_rows(self, y, x, rows: tuple) -> torch.Tensor:
        n = x.shape[0]
        if n != len(rows):
            # generate() with beams / num_return_sequences repeats each row in place.
            if len(rows) == 0 or n % len(rows):
                raise ValueError(f"batch has {n} rows but {len(rows)} adapters were bound")
            rep = n // len(rows)
            rows = tuple(r for r in rows for _ in range(rep))
        groups: dict[int, tuple[object, list[int]]] = {}
        for i, src in enumerate(rows):
            if src is not None:
                groups.setdefault(id(src), (src, []))[1].append(i)
        if len(groups) == 1 and len(next(iter(groups.values()))[1]) == n:
            return _add_update(y, x, next(iter(groups.values()))[0].lora_factors(self.lora_name))
        for src, idx in groups.values():
            factors = src.lora_factors(self.lora_name)
            if factors is None:
                continue
            index = torch.tensor(idx, device=x.device)
            delta = _update(x.index_select(0, index), factors)
            y = y.index_add(0, index, delta.to(y.dtype))
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_name={self.lora_name!r}"


def _update(x: torch.Tensor, factors) -> torch.Tensor:
    a, b, scale = factors
    a = a.to(dtype=x.dtype, device=x.device)
    b = b.to(dtype=x.dtype, device=x.device)
    return F.linear(F.linear(x, a), b) * scale


def _add_update(y: torch.Tensor, x: torch.Tensor, factors) -> torch.Tensor:
    if factors is None:
        return y
    return y + _update(x, factors).to(y.dtype)


def model_key(model: nn.Module) -> ModelKey:
    key = getattr(model, "_dynarank_key", None)
    if key is None:
        raise ValueError("model has no adapter layers; call inject_adapters(model) first")
    return key


@contextlib.contextmanager
def use_adapter(model: nn.Module, adapter):
    """Bind ``adapter`` to ``model`` for calls made inside this block, in this context only.

    ``adapter`` is an ``AdapterSnapshot`` (or a live ``Adapter``), None for the base
    model, or a sequence with one of those per batch row (rows are grouped by
    adapter). Nested blocks override the outer binding and restore it on exit.
    """
    key = model_key(model)
    if isinstance(adapter, Sequence) and not isinstance(adapter, (str, bytes)):
        adapter = tuple(adapter)
    bindings = dict(_BINDINGS.get())
    if adapter is None:
        bindings.pop(key, None)
    else:
        bindings[key] = adapter
    token = _BINDINGS.set(bindings)
    try:
        yield
    finally:
        _BINDINGS.reset(token)
