"""Hutchinson estimate of the Hessian trace over the LoRA parameters."""

from __future__ import annotations

import torch


def hutchinson_trace(grads, params, groups: dict[str, list[int]], *, samples: int = 1, generator=None) -> dict[str, float]:
    """``tr(H) ~ E[v^T H v]`` with Rademacher ``v``; ``H v`` by double backprop.

    ``grads`` must come from ``torch.autograd.grad(loss, params, create_graph=True)``.
    ``groups`` maps a name (a module) to indices into ``params``; the trace of each
    group's diagonal block is returned (their sum is the total trace).
    """
    out = {name: 0.0 for name in groups}
    for i in range(samples):
        vs = [torch.randint(0, 2, p.shape, generator=generator).to(p) * 2 - 1 for p in params]
        hvs = torch.autograd.grad(grads, params, vs, retain_graph=i < samples - 1, allow_unused=True)
        per_param = [0.0 if hv is None else float((v * hv).sum()) for v, hv in zip(vs, hvs)]
        for name, idx in groups.items():
            out[name] += sum(per_param[j] for j in idx) / samples
    return out
