"""Building and publishing an adapter: ``new_session_adapter`` (fresh or resumed) and ``Adapter.snapshot``."""

from __future__ import annotations

import torch

from adapter_core import AdapterConfig, new_session_adapter, train_step

TARGETS = ("q_proj", "v_proj")


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (1, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_weights": torch.ones(1, 12)}


def _trained(model, policy="gard", steps=3):
    config = AdapterConfig(target_modules=TARGETS, policy=policy, lr=1e-2)
    adapter, pol = new_session_adapter(model, config, task="bug_fix")
    for i in range(steps):
        train_step(model, adapter, _batch(i), pol)
    return adapter, pol


def test_snapshot_bump_and_no_bump(tiny_llama):
    adapter, _ = _trained(tiny_llama, "fixed", steps=1)
    first = adapter.snapshot(bump=False)
    assert first.version == adapter.version == 0  # publishing what version 0 already names
    assert first.metadata["step"] == adapter.step
    second = adapter.snapshot(loss=0.5)
    assert second.version == adapter.version == 1 and second.metadata["loss"] == 0.5
    for n in adapter.A:
        assert torch.equal(first.A[n], second.A[n]) and torch.equal(first.B[n], second.B[n])


def test_fresh_adapter_uses_config(tiny_llama):
    config = AdapterConfig(target_modules=TARGETS, policy="dynamicrank", lr=3e-3, rank_budget=None)
    adapter, policy = new_session_adapter(tiny_llama, config, task="bug_fix")
    assert type(policy).name == "dynamicrank" and adapter.lr == 3e-3
    assert set(adapter.ranks.values()) == {16}  # dynamicrank's bug_fix start
    assert adapter.metadata == {"policy": "dynamicrank", "task": "bug_fix"}
    budgeted, _ = new_session_adapter(tiny_llama, AdapterConfig(target_modules=TARGETS, policy="dynamicrank"),
                                      task="bug_fix")
    assert set(budgeted.ranks.values()) == {8}  # the default budget (rank 8's parameters) caps the start


def test_resume_from_snapshot_keeps_factors_policy_and_state(tiny_llama):
    adapter, policy = _trained(tiny_llama, "gard")
    snap = adapter.snapshot()
    # The session default is another policy: the snapshot's own policy wins.
    resumed, resumed_policy = new_session_adapter(
        tiny_llama, AdapterConfig(target_modules=TARGETS, policy="fixed", lr=5e-3),
        snapshot=snap, policy_state=policy.state_dict())
    assert type(resumed_policy).name == "gard" and resumed.lr == 5e-3
    assert resumed.version == snap.version and resumed.ranks == snap.ranks
    assert resumed_policy.last_step == policy.last_step  # state restored
    for n in snap.A:
        assert torch.equal(resumed.A[n].detach(), snap.A[n])


def test_resume_falls_back_to_default_policy_and_tolerates_bad_state(tiny_llama, caplog):
    adapter, _ = _trained(tiny_llama, "fixed", steps=1)
    adapter.metadata["policy"] = "retired-policy"
    snap = adapter.snapshot()
    config = AdapterConfig(target_modules=TARGETS, policy="lalora")
    resumed, policy = new_session_adapter(tiny_llama, config, snapshot=snap, policy_state={"unexpected": 1})
    assert type(policy).name == "lalora"
    assert policy.prev_value == {} and policy.prev_rank == {}  # fresh state: the bad one was dropped
    assert "could not restore policy state" in caplog.text
    assert resumed.version == snap.version
