"""The rank mechanism: fit proposed ranks to bounds and budget, reshape factors by SVD."""

from __future__ import annotations

import math

import torch

from adapter_core.policies.base import ModuleInfo, RankBounds

# Singular values below this fraction of the largest carry no signal: their
# directions are refilled like fresh ones (random A row, zero B column) instead of
# keeping an all-zero pair that would never receive a gradient.
_REL_TOL = 1e-6


def total_params(ranks: dict[str, int], modules: dict[str, ModuleInfo]) -> int:
    return sum(r * modules[name].params_per_rank() for name, r in ranks.items())


def fit_to_budget(proposed: dict[str, int], modules: dict[str, ModuleInfo], bounds: RankBounds) -> dict[str, int]:
    """Clip every rank to ``[r_min, r_max]``; then, over budget, shrink until it fits.

    Shrinking first scales every rank's excess over ``r_min`` by one common factor
    (so the profile's shape survives), then removes single ranks greedily from the
    module that frees the most parameters. ``r_min`` is a floor: a budget smaller
    than all modules at ``r_min`` is a configuration error (ValueError). Modules
    missing from ``proposed`` get ``r_min``.
    """
    lo, hi = bounds.r_min, bounds.r_max
    if lo < 1 or hi < lo:
        raise ValueError(f"bad rank bounds r_min={lo} r_max={hi}")
    ranks = {name: min(hi, max(lo, int(proposed.get(name, lo)))) for name in modules}
    if bounds.budget is None or total_params(ranks, modules) <= bounds.budget:
        return ranks
    floor = total_params({n: lo for n in modules}, modules)
    if floor > bounds.budget:
        raise ValueError(f"budget {bounds.budget} is below the r_min floor of {floor} parameters")
    # Proportional: excess over the floor times f, f chosen so the excess cost fits.
    excess = total_params({n: r - lo for n, r in ranks.items()}, modules)
    factor = (bounds.budget - floor) / excess
    ranks = {n: lo + math.floor((r - lo) * factor) for n, r in ranks.items()}
    # Greedy: flooring normally lands under budget; this guards rounding edge cases.
    while total_params(ranks, modules) > bounds.budget:
        name = max((n for n in ranks if ranks[n] > lo), key=lambda n: (modules[n].params_per_rank(), ranks[n]))
        ranks[name] -= 1
    return ranks


def _svd_of_product(A: torch.Tensor, B: torch.Tensor):
    """SVD of ``B @ A`` without forming it: QR of each thin factor, SVD of an r x r core."""
    qb, rb = torch.linalg.qr(B)  # (out x r), (r x r)
    qa, ra = torch.linalg.qr(A.T)  # (in x r), (r x r)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, vh @ qa.T  # U (out x r), S (r), Vh (r x in)


def fresh_rows(n: int, in_features: int, *, against: torch.Tensor | None = None, generator=None, dtype=torch.float64):
    """``n`` random rows of the size of a fresh LoRA A row, orthogonal to ``against``'s rows
    and to each other (as far as the dimension allows)."""
    rows = torch.randn(n, in_features, generator=generator, dtype=dtype)
    basis = against if against is not None and against.numel() else None
    room = in_features - (0 if basis is None else basis.shape[0])
    if room > 0:
        m = min(n, room)
        block = rows[:m]
        if basis is not None:
            block = block - (block @ basis.T) @ basis
        q, _ = torch.linalg.qr(block.T)  # in x m, orthonormal columns
        rows[:m] = q.T
    # Same expected row norm as kaiming_uniform(a=sqrt(5)), PEFT's A init: std 1/sqrt(3*in).
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(1 / 3)
    return rows


def grow_factors(A: torch.Tensor, B: torch.Tensor, new_r: int, *, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``new_r - r`` directions to ``A (r x in)``, ``B (out x r)``; the existing ones stay bit-identical.

    The new A rows are small random rows (a fresh PEFT row's norm) orthogonal to the
    existing rows, the new B columns are zero: ``B' A' == B A``, and the optimizer
    moments of the existing entries stay valid (``Adapter.resize`` pads them with zeros).
    """
    r = A.shape[0]
    if new_r <= r:
        raise ValueError(f"grow_factors needs new_r > {r}, got {new_r}")
    basis = torch.linalg.qr(A.detach().to(torch.float64).cpu().T)[0].T if r else None  # orthonormal rows
    rows = fresh_rows(new_r - r, A.shape[1], against=basis, generator=generator)
    A_new = torch.cat([A.detach(), rows.to(dtype=A.dtype, device=A.device)])
    B_new = torch.cat([B.detach(), B.new_zeros(B.shape[0], new_r - r)], dim=1)
    return A_new, B_new


def resize_factors(A: torch.Tensor, B: torch.Tensor, new_r: int, *, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape ``A (r x in)``, ``B (out x r)`` to rank ``new_r`` (DynamicRank eqs. 13-15).

    ``U S Vh = SVD(B A)``; ``B' = U[:, :k] sqrt(S[:k])``, ``A' = sqrt(S[:k]) Vh[:k]``.
    Growing keeps ``B' A' == B A``: the new directions get small random A rows
    orthogonal to the kept ones and zero B columns, so they start learning without
    moving the function. Shrinking keeps the top ``new_r`` singular directions,
    the best rank-``new_r`` approximation of ``B A``. Directions with (near) zero
    singular value are refilled the same way as new ones.
    """
    if new_r < 1:
        raise ValueError("rank must be >= 1")
    dtype, device = A.dtype, A.device
    a, b = A.detach().to(torch.float64).cpu(), B.detach().to(torch.float64).cpu()
    U, S, Vh = _svd_of_product(a, b)
    smax = float(S.max()) if S.numel() else 0.0
    k = min(new_r, int((S > smax * _REL_TOL).sum()) if smax > 0 else 0)
    root = S[:k].sqrt()
    A_new = torch.zeros(new_r, a.shape[1], dtype=torch.float64)
    B_new = torch.zeros(b.shape[0], new_r, dtype=torch.float64)
    A_new[:k] = root[:, None] * Vh[:k]
    B_new[:, :k] = U[:, :k] * root
    if new_r > k:
        A_new[k:] = fresh_rows(new_r - k, a.shape[1], against=Vh[:k], generator=generator)
    return A_new.to(dtype=dtype, device=device), B_new.to(dtype=dtype, device=device)
