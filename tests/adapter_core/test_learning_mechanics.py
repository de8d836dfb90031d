"""What a train step and a resize do to the optimizer, the scale, the budget and example weights."""

from __future__ import annotations

import math

import pytest
import torch

from adapter_core import Adapter, AdapterConfig, new_adapter, new_session_adapter, train_step

NO_BUDGET = AdapterConfig(rank_budget=None)


def _batch(seed=0, t=16, vocab=1000, weight=1.0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_weights": torch.ones(1, t),
            "example_weights": torch.tensor([weight])}


def _trained(model, steps=3, config=NO_BUDGET):
    adapter, _ = new_adapter(model, config)
    for s in range(steps):  # moments and non-zero B
        train_step(model, adapter, _batch(seed=s), lr=1e-2)
    return adapter


def _moments(adapter, p):
    state = adapter.optimizer.state[p]
    return state["exp_avg"].clone(), state["exp_avg_sq"].clone()


def test_growing_keeps_factors_and_moments_bit_identical(tiny_llama):
    adapter = _trained(tiny_llama)
    name = next(iter(adapter.A))
    r = adapter.ranks[name]
    a, b = adapter.A[name].detach().clone(), adapter.B[name].detach().clone()
    (ma, va), (mb, vb) = _moments(adapter, adapter.A[name]), _moments(adapter, adapter.B[name])
    delta = b @ a

    assert adapter.resize({name: r + 3}) == [name]

    assert adapter.ranks[name] == r + 3
    assert torch.equal(adapter.A[name][:r], a) and torch.equal(adapter.B[name][:, :r], b)
    assert torch.count_nonzero(adapter.B[name][:, r:]) == 0 and torch.count_nonzero(adapter.A[name][r:]) > 0
    torch.testing.assert_close(adapter.B[name] @ adapter.A[name], delta)  # the function did not move
    (ma2, va2), (mb2, vb2) = _moments(adapter, adapter.A[name]), _moments(adapter, adapter.B[name])
    assert torch.equal(ma2[:r], ma) and torch.equal(va2[:r], va)
    assert torch.equal(mb2[:, :r], mb) and torch.equal(vb2[:, :r], vb)
    assert torch.count_nonzero(ma2[r:]) == torch.count_nonzero(vb2[:, r:]) == 0
    assert not train_step(tiny_llama, adapter, _batch(seed=9), lr=1e-2).skipped  # shapes line up


def test_shrinking_resets_only_the_module_that_shrank(tiny_llama):
    adapter = _trained(tiny_llama)
    shrunk, kept = list(adapter.A)[:2]
    before = _moments(adapter, adapter.A[kept])
    adapter.resize({shrunk: adapter.ranks[shrunk] - 2})
    assert adapter.A[shrunk] not in adapter.optimizer.state
    after = _moments(adapter, adapter.A[kept])
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_an_example_at_weight_3_moves_the_adapter_more_than_at_weight_1(tiny_llama):
    def moved(weight):
        adapter = _trained(tiny_llama, steps=2)
        start = {n: adapter.B[n].detach().clone() for n in adapter.B}
        train_step(tiny_llama, adapter, _batch(seed=7, weight=weight), lr=1e-2)
        return math.sqrt(sum(float((adapter.B[n] - start[n]).square().sum()) for n in start))

    light, heavy = moved(1.0), moved(3.0)
    assert heavy > 2 * light


def test_rows_of_a_batch_count_by_their_example_weights(tiny_llama):
    """Two rows: raising one row's weight moves the loss toward that row's own loss."""
    adapter, _ = new_adapter(tiny_llama, NO_BUDGET)
    a, b = _batch(seed=1), _batch(seed=2)

    def loss(wa, wb):
        batch = {k: torch.cat([a[k], b[k]]) for k in ("input_ids", "attention_mask", "loss_weights")}
        batch["example_weights"] = torch.tensor([wa, wb])
        return train_step(tiny_llama, adapter, batch, lr=0.0).loss

    only_a, only_b = loss(1.0, 1e-6), loss(1e-6, 1.0)
    assert only_a != pytest.approx(only_b)
    assert loss(3.0, 1.0) == pytest.approx(0.75 * only_a + 0.25 * only_b, rel=1e-4)


def test_scale_follows_rslora_so_a_larger_rank_is_not_a_larger_step(tiny_llama):
    scales = {}
    for r in (8, 32):
        adapter, _ = new_adapter(tiny_llama, AdapterConfig(r_init=r, rank_budget=None))
        scales[r] = sorted(set(adapter.scale.values()))
    assert scales[8] == pytest.approx([2.0]) and scales[32] == pytest.approx([1.0])  # alpha / sqrt(r)


def test_the_default_budget_is_what_fixed_rank_8_uses(tiny_llama):
    adapter, policy = new_session_adapter(tiny_llama, AdapterConfig(policy="dynamicrank"))
    per_rank = sum(m.params_per_rank() for m in adapter.modules.values())
    assert policy.bounds.budget == 8 * per_rank
    assert adapter.num_params <= policy.bounds.budget
    wide, _ = new_session_adapter(tiny_llama, AdapterConfig(r_init=16))  # over the budget: cut to it
    assert set(wide.ranks.values()) == {8}
    free, _ = new_session_adapter(tiny_llama, AdapterConfig(r_init=16, rank_budget=None))
    assert set(free.ranks.values()) == {16}


def test_the_step_counter_survives_a_snapshot(tiny_llama):
    adapter = _trained(tiny_llama, steps=5)
    resumed = Adapter.from_snapshot(adapter.snapshot())
    assert resumed.step == adapter.step == 5
