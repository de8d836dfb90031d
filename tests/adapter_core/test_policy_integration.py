"""Every registered policy runs real train steps on the tiny Llama through the mechanism."""

from __future__ import annotations

import pytest
import torch

from adapter_core import (
    POLICIES,
    Adapter,
    RankBounds,
    fit_to_budget,
    inject_adapters,
    make_policy,
    train_step,
)

# Options per policy (a policy not listed runs with its defaults).
OPTIONS = {
    "fixed": {"rank": 4},
    # 20 steps is short: threshold every token as a keyword so eq. 8 grows ranks.
    "dynamicrank": {"hessian_every": 5, "default_rank": 4},
    "lalora": {"gamma": 20.0},
    "gard": {"variant": "dynamic", "window": 4, "interval": 3, "initial_rank": 4},
    "adalora": {"total_step": 15, "init_r": 4, "target_r": 2},
}
STATIC = {"fixed"}  # policies that never change a rank; every other one must within 20 steps


def _batch(tokenizer):
    from code_signals.classes import TokenClass

    enc = tokenizer(["def add(a, b):\n    return a + b\n", "class A:\n    pass\n"], return_tensors="pt", padding=True)
    ids = enc["input_ids"]
    return {
        "input_ids": ids,
        "attention_mask": enc["attention_mask"],
        "token_classes": torch.full(ids.shape, int(TokenClass.KEYWORD)),
    }


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_runs_20_steps(name, tiny_llama, tokenizer):
    modules = inject_adapters(tiny_llama, ["q_proj", "v_proj", "down_proj"])
    bounds = RankBounds(r_min=1, r_max=12)
    policy = make_policy(name, modules, bounds, **OPTIONS.get(name, {}))
    ranks0 = fit_to_budget(policy.initial_ranks("bug_fix"), modules, bounds)
    adapter = Adapter.new(modules, ranks0, lr=1e-2)
    batch = _batch(tokenizer)
    history = []
    for _ in range(20):
        stats = train_step(tiny_llama, adapter, batch, policy)
        assert not stats.skipped and torch.isfinite(torch.tensor(stats.loss))
        assert all(bounds.r_min <= r <= bounds.r_max for r in stats.ranks.values())
        history.append(dict(adapter.ranks))
    changed = any(h != ranks0 for h in history)
    assert changed == (name not in STATIC), (name, ranks0, history[-1])
