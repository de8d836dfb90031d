"""Per-call choice between SDPA and eager attention.

SDPA is fast but returns no attention weights and has no double backward on CPU;
token importance needs the weights and the Hessian estimate needs double
backward. Switching ``config._attn_implementation`` on a shared model would race
with serving threads (their masks are built for one kind and consumed by the
other), so injected SDPA models get the ``"dynarank_sdpa"`` implementation
instead: SDPA masks, and a ContextVar that picks math attention only for the
calls that asked for it.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

NAME = "dynarank_sdpa"
_EAGER: contextvars.ContextVar[bool] = contextvars.ContextVar("dynarank_eager_attention", default=False)
_registered = False


def _math_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # query (B, H, Tq, D); key/value (B, Hkv, Tk, D); mask: SDPA style (bool, float) or None = causal.
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is None:
        if getattr(module, "is_causal", True) and query.shape[2] > 1:
            tq, tk = query.shape[2], key.shape[2]
            allowed = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(tk - tq)
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _dispatch(module, query, key, value, attention_mask, **kwargs):
    if _EAGER.get():
        return _math_attention(module, query, key, value, attention_mask, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("output_attentions", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _dispatch)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def install(model: nn.Module) -> None:
    """Give an SDPA model the switchable implementation (other kinds are left alone)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    register()
    model.set_attn_implementation(NAME)


def supports_weights(model: nn.Module) -> bool:
    return getattr(model.config, "_attn_implementation", None) in (NAME, "eager")


@contextlib.contextmanager
def eager_attention(enabled: bool = True):
    """Inside this block (this context only) attention returns weights and supports double backward."""
    token = _EAGER.set(enabled)
    try:
        yield
    finally:
        _EAGER.reset(token)
