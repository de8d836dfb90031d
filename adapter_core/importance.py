"""Per-token importance (DynamicRank eqs. 6-7) from attention weights and input gradients."""

from __future__ import annotations

import torch


def attention_received(attentions, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention each token receives: column sums of the attention matrices over the
    queries, averaged over heads and layers (eq. 7 read column-wise; the row sums of a
    softmax are all 1). ``attentions``: per layer ``(B, H, T, T)``. Returns ``(B, T)``."""
    total = None
    for layer in attentions:
        probs = layer.detach().float().mean(dim=1)  # (B, Tq, Tk)
        if attention_mask is not None:
            probs = probs * attention_mask[:, :, None].to(probs.dtype)  # padded queries give nothing
        col = probs.sum(dim=1)
        total = col if total is None else total + col
    return total / len(attentions)


def _normalise(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # Scale to mean 1 over real tokens so the two terms are comparable whatever the length.
    valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    mean = x[valid].mean() if valid.any() else x.new_tensor(1.0)
    return torch.where(valid, x / mean.clamp_min(1e-12), torch.zeros_like(x))


def token_importance(
    attn_received: torch.Tensor,
    input_grad_norm: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    lam: float = 1.0,
) -> torch.Tensor:
    """``I_t = a_t + lam * g_t`` (eq. 6) with both terms normalised to mean 1 over the real tokens."""
    return _normalise(attn_received, attention_mask) + lam * _normalise(input_grad_norm, attention_mask)
