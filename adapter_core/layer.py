"""``LoraLinear``: a frozen linear layer that adds the LoRA update of the adapter
bound to the current call.

The adapter is not module state. ``use_adapter(model, ...)`` binds it in a
``contextvars.ContextVar``, so each thread (and each asyncio task) sees its own
binding and two forwards with different adapters can share one base model.
A batch whose rows carry different adapters is bound as one ``RowAdapters``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapter_core.int8 import base_linear

# {model key: binding}. A binding is one adapter source for the whole batch or a
# ``RowAdapters`` (one source, or None = base model, per batch row). A source is
# anything with ``lora_factors(name) -> (A, B, scale) | None``: a snapshot or a live Adapter.
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
        self.int8 = getattr(base, "int8", None)  # the weight's int8 copy for decode steps (quantize_base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = base_linear(x, self.weight, self.bias, self.int8)
        binding = _BINDINGS.get().get(self.lora_key)
        if binding is None:
            return y
        if isinstance(binding, RowAdapters):
            return binding.add_update(y, x, self.lora_name)
        return _add_update(y, x, binding.lora_factors(self.lora_name))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_name={self.lora_name!r}"


def _compute_dtype(x: torch.Tensor, factor: torch.Tensor) -> torch.dtype:
    # LoRA may stay float32 over a bfloat16 base: compute in the more precise of the two.
    return torch.promote_types(x.dtype, factor.dtype)


def _update(x: torch.Tensor, factors) -> torch.Tensor:
    """``scale * x A^T B^T`` in the more precise of x's and the factors' dtypes."""
    a, b, scale = factors
    dtype = _compute_dtype(x, a)
    x = x.to(dtype)
    a = a.to(dtype=dtype, device=x.device)
    b = b.to(dtype=dtype, device=x.device)
    return F.linear(F.linear(x, a), b) * scale


def _add_update(y: torch.Tensor, x: torch.Tensor, factors) -> torch.Tensor:
    if factors is None:
        return y
    return y + _update(x, factors).to(y.dtype)


class RowAdapters:
    """One adapter source (or None: the base model) per batch row, applied in one pass per layer.

    Per module, the factors of the distinct adapters are concatenated along the
    rank, each adapter's scale folded into its B columns: ``A_cat (R x in)``,
    ``B_cat (out x R)``, R the sum of their ranks (ranks may differ; nothing is
    padded). A row mask ``M (rows x R)`` keeps each row's own adapter's block, so
    the update of every row is ``((x A_cat^T) * M) B_cat^T``: two matmuls per
    projection, each adapter's factors read once, no Python loop over adapters.
    The extra work is the products with the other rows' blocks (rows x R instead
    of rows x r), cheap next to the base matmul at serving batch sizes.

    Build one per batch composition: the stacks are made once per module on first
    use and kept, and ``RowAdapters(rows, reuse=previous)`` shares the previous
    binding's stacks when they hold every adapter present and those are at least
    half of them (rows joined or left, no new adapter came).
    Sources are read once: bind published snapshots, not an adapter being trained.
    """

    def __init__(self, rows: Sequence, reuse: RowAdapters | None = None):
        self.rows = tuple(rows)
        if not self.rows:
            raise ValueError("RowAdapters needs at least one row")
        distinct: dict[int, object] = {}
        for src in self.rows:
            if src is not None:
                distinct.setdefault(id(src), src)
        stacked = set(map(id, reuse.sources)) if reuse is not None else set()
        if distinct and set(distinct) <= stacked and 2 * len(distinct) >= len(stacked):
            # Rows only joined or left: the previous stacks hold every adapter present. Blocks of adapters that
            # left stay (masked off) until they are half the stack, rather than copying every factor again.
            self.sources = reuse.sources
            self._stacks = reuse._stacks
        else:
            self.sources = tuple(distinct.values())
            self._stacks: dict[str, tuple | None] = {}
        # The one adapter of every row: the plain single-adapter path, no stack.
        self.single = self.sources[0] if len(self.sources) == 1 and None not in self.rows else None
        self._masks: dict[tuple[str, int], torch.Tensor] = {}

    def binding(self):
        """What to bind: None when every row is on the base model, the one shared source, or this."""
        if not self.sources:
            return None
        return self.single if self.single is not None else self

    def add_update(self, y: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.single is not None:
            return _add_update(y, x, self.single.lora_factors(name))
        stack = self._stack(name, x)
        if stack is None:  # no row's adapter touches this module
            return y
        a_cat, b_cat, _ = stack
        dtype = _compute_dtype(x, a_cat)
        mask = self._mask(name, x.shape[0]).to(dtype)
        mask = mask.view(mask.shape[0], *([1] * (x.ndim - 2)), mask.shape[1])
        delta = F.linear(F.linear(x.to(dtype), a_cat.to(dtype)) * mask, b_cat.to(dtype))
        return y + delta.to(y.dtype)

    def _stack(self, name: str, x: torch.Tensor):
        """``(A_cat, B_cat, {source id: (start, end)})`` of one module, built on first use."""
        if name in self._stacks:
            return self._stacks[name]
        blocks, a_parts, b_parts, start = {}, [], [], 0
        training = torch.is_grad_enabled()
        with torch.no_grad():
            for src in self.sources:
                factors = src.lora_factors(name)
                if factors is None:
                    continue
                a, b, scale = factors
                if a.requires_grad and training:  # the stack is kept: no gradient would reach the adapter
                    raise ValueError("per-row adapters are for inference: bind a trainable adapter alone")
                a_parts.append(a.to(x.device))
                b_parts.append(b.to(x.device) * scale)
                blocks[id(src)] = (start, start + a.shape[0])
                start += a.shape[0]
        stack = (torch.cat(a_parts), torch.cat(b_parts, dim=1), blocks) if a_parts else None
        self._stacks[name] = stack
        return stack

    def _mask(self, name: str, n: int) -> torch.Tensor:
        """``(n x R)``: 1 on each row's own adapter's rank block, 0 elsewhere (None rows: all 0)."""
        mask = self._masks.get((name, n))
        if mask is not None:
            return mask
        if n % len(self.rows):
            raise ValueError(f"batch has {n} rows but {len(self.rows)} adapters were bound")
        a_cat, _, blocks = self._stacks[name]
        per_row = torch.zeros(len(self.rows), a_cat.shape[0], dtype=a_cat.dtype, device=a_cat.device)
        for i, src in enumerate(self.rows):
            block = blocks.get(id(src)) if src is not None else None
            if block is not None:
                per_row[i, block[0]:block[1]] = 1
        # generate() with beams / num_return_sequences repeats each row in place.
        mask = per_row.repeat_interleave(n // len(self.rows), dim=0)
        self._masks[(name, n)] = mask
        return mask


def model_key(model: nn.Module) -> ModelKey:
    key = getattr(model, "_dynarank_key", None)
    if key is None:
        raise ValueError("model has no adapter layers; call inject_adapters(model) first")
    return key


@contextlib.contextmanager
def use_adapter(model: nn.Module, adapter):
    """Bind ``adapter`` to ``model`` for calls made inside this block, in this context only.

    ``adapter`` is an ``AdapterSnapshot`` (or a live ``Adapter``), None for the base
    model, a ``RowAdapters``, or a sequence with one of those sources per batch row
    (made a ``RowAdapters``). Nested blocks override the outer binding and restore it on exit.
    """
    key = model_key(model)
    if isinstance(adapter, Sequence) and not isinstance(adapter, (str, bytes)):
        adapter = RowAdapters(adapter).binding()
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
