"""Fold adapters into base weights and back; combine two adapters into one."""

from __future__ import annotations

import torch
from torch import nn

from adapter_core.int8 import Int8Weight
from adapter_core.resize import resize_factors
from adapter_core.snapshot import AdapterSnapshot


def _add_delta(model: nn.Module, snap: AdapterSnapshot, sign: int) -> None:
    for name in snap.modules:
        linear = model.get_submodule(name)
        w = linear.weight
        w.add_(snap.delta(name).to(device=w.device, dtype=w.dtype), alpha=sign)
        if getattr(linear, "int8", None) is not None:  # the decode steps' copy follows (adapter_core.int8)
            linear.int8 = Int8Weight(w, int8_activations=linear.int8.int8_activations)


@torch.no_grad()
def merge_into(model: nn.Module, snap: AdapterSnapshot) -> None:
    """``W += scale * B @ A`` for every module of ``snap`` (in place; affects every user of ``model``)."""
    _add_delta(model, snap, 1)


@torch.no_grad()
def unmerge(model: nn.Module, snap: AdapterSnapshot) -> None:
    """Undo :func:`merge_into` (exact up to float rounding)."""
    _add_delta(model, snap, -1)


def combine(snap_a: AdapterSnapshot, snap_b: AdapterSnapshot, rank: int | None = None) -> AdapterSnapshot:
    """One adapter whose per-module update is the sum of both (scale 1).

    The sum ``sa Ba Aa + sb Bb Ab`` is the product of the stacked factors
    ``[sa Ba, sb Bb] @ [Aa; Ab]``, so it is reshaped by the same SVD as a resize:
    truncated to ``rank`` (None = ``ra + rb``, exact). Modules in only one input
    are carried over (truncated to ``rank`` too).
    """
    A, B = {}, {}
    for name in list(dict.fromkeys([*snap_a.modules, *snap_b.modules])):
        parts = [f for f in (snap_a.lora_factors(name), snap_b.lora_factors(name)) if f is not None]
        a = torch.cat([p[0].float() for p in parts], dim=0)
        b = torch.cat([p[1].float() * p[2] for p in parts], dim=1)
        A[name], B[name] = resize_factors(a, b, rank or a.shape[0])
    meta = {"combined_from": [snap_a.version, snap_b.version]}
    return AdapterSnapshot(max(snap_a.version, snap_b.version) + 1, A, B, {n: 1.0 for n in A}, meta)
