"""Resize math, budget fitting, combine (no model needed)."""

import random

import pytest
import torch

from adapter_core import AdapterSnapshot, combine, fit_to_budget, resize_factors
from adapter_core.policies import ModuleInfo, RankBounds


def _factors(r, out=48, inp=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)


@pytest.mark.parametrize("new_r", [9, 16, 40])
def test_grow_keeps_product(new_r):
    A, B = _factors(8)
    A2, B2 = resize_factors(A, B, new_r)
    assert A2.shape == (new_r, 40) and B2.shape == (48, new_r)
    torch.testing.assert_close(B2 @ A2, B @ A, atol=1e-4, rtol=1e-4)
    # New directions can learn: their A rows are non-zero and orthogonal to the kept ones.
    assert A2[8:].norm(dim=1).min() > 0
    assert (A2[:8] @ A2[8:].T).abs().max() < 1e-3 * A2[:8].norm() * A2[8:].norm()


@pytest.mark.parametrize("k", [1, 3, 7])
def test_shrink_is_best_rank_k(k):
    A, B = _factors(8)
    A2, B2 = resize_factors(A, B, k)
    U, S, Vh = torch.linalg.svd((B @ A).double())
    best = (U[:, :k] * S[:k]) @ Vh[:k]
    torch.testing.assert_close((B2 @ A2).double(), best, atol=1e-4, rtol=1e-4)


def test_sqrt_sigma_split():
    A, B = _factors(6)
    A2, B2 = resize_factors(A, B, 6)
    # Balanced factors: column norms of B' equal row norms of A' (both sqrt of sigma).
    torch.testing.assert_close(B2.norm(dim=0), A2.norm(dim=1), atol=1e-4, rtol=1e-4)


def test_resize_of_zero_B_keeps_live_A():
    A, B = torch.randn(4, 40), torch.zeros(48, 4)
    A2, B2 = resize_factors(A, B, 6)
    assert torch.count_nonzero(B2) == 0 and A2.norm(dim=1).min() > 0


def test_budget_never_exceeded():
    rng = random.Random(0)
    modules = {f"m{i}": ModuleInfo(f"m{i}", rng.choice([32, 64, 96]), rng.choice([16, 64, 128]), i) for i in range(12)}
    for trial in range(300):
        floor = sum(m.params_per_rank() for m in modules.values())
        budget = rng.choice([None, floor, floor * rng.randint(1, 40)])
        bounds = RankBounds(r_min=1, r_max=rng.choice([8, 32, 64]), budget=budget)
        proposed = {n: rng.randint(-5, 100) for n in modules if rng.random() < 0.9}
        ranks = fit_to_budget(proposed, modules, bounds)
        assert set(ranks) == set(modules)
        assert all(bounds.r_min <= r <= bounds.r_max for r in ranks.values())
        total = sum(r * modules[n].params_per_rank() for n, r in ranks.items())
        if budget is not None:
            assert total <= budget
        clipped = {n: min(bounds.r_max, max(1, proposed.get(n, 1))) for n in modules}
        if budget is None or sum(r * modules[n].params_per_rank() for n, r in clipped.items()) <= budget:
            assert ranks == clipped  # under budget nothing but clipping happens


def test_budget_below_floor_is_an_error():
    modules = {"a": ModuleInfo("a", 10, 10, 0)}
    with pytest.raises(ValueError):
        fit_to_budget({"a": 4}, modules, RankBounds(r_min=2, r_max=8, budget=30))


def _snap(version, seed, ranks=(4, 3)):
    A, B = {}, {}
    for i, r in enumerate(ranks):
        A[f"m{i}"], B[f"m{i}"] = _factors(r, seed=seed + i)
    return AdapterSnapshot.from_tensors(version, A, B, {n: 0.5 + seed for n in A})


def test_combine_full_rank_is_sum():
    a, b = _snap(1, 0), _snap(2, 1, ranks=(2, 5))
    c = combine(a, b)
    for name in a.modules:
        torch.testing.assert_close(c.delta(name), a.delta(name) + b.delta(name), atol=1e-3, rtol=1e-4)
    assert c.version == 3


def test_combine_truncates():
    a, b = _snap(1, 0), _snap(2, 1)
    c = combine(a, b, rank=2)
    assert set(c.ranks.values()) == {2}


def test_snapshot_is_immutable():
    s = _snap(1, 0)
    with pytest.raises(TypeError):
        s.A["m0"] = torch.zeros(1, 1)
    with pytest.raises(Exception):
        s.version = 5
    assert s.num_params == sum(a.numel() + s.B[n].numel() for n, a in s.A.items())
