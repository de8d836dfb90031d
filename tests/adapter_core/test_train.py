"""The train step: loss on weighted tokens only, guards, policy signals, resize."""

import math

import pytest
import torch
import torch.nn.functional as F

from adapter_core import (
    AdapterConfig,
    RankBounds,
    RankPolicy,
    evaluate_nll,
    new_adapter,
    train_step,
    use_adapter,
)


def _batch(n=2, t=16, vocab=1000, seed=0, weights=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    w = torch.ones(n, t) if weights is None else weights
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_weights": w}


def test_fixed_policy_20_steps(tiny_model):
    adapter, policy = new_adapter(tiny_model, AdapterConfig(r_init=4))
    batch = _batch()
    losses = [train_step(tiny_model, adapter, batch, policy, lr=1e-2) for _ in range(20)]
    assert not any(s.skipped for s in losses)
    assert set(losses[-1].ranks.values()) == {4}
    assert losses[-1].loss < losses[0].loss  # repeated batch: the adapter learns it
    assert losses[-1].num_params == adapter.num_params == adapter.snapshot().num_params
    assert set(losses[0].timings) == {"forward", "backward", "policy", "resize"}


def test_nan_guard_keeps_previous_adapter(tiny_llama):
    adapter, policy = new_adapter(tiny_llama)
    train_step(tiny_llama, adapter, _batch(), policy)
    before = adapter.snapshot()
    bad = _batch(weights=torch.full((2, 16), float("nan")))
    stats = train_step(tiny_llama, adapter, bad, policy)
    assert stats.skipped
    for n in adapter.A:
        assert torch.equal(adapter.A[n].detach(), before.A[n]) and torch.equal(adapter.B[n].detach(), before.B[n])
    # Non-finite gradients with a finite loss are caught too.
    adapter.scale = {n: float("inf") for n in adapter.scale}
    assert train_step(tiny_llama, adapter, _batch(), policy).skipped


def _loss_and_grads(model, adapter, batch):
    adapter.zero_grad()
    with use_adapter(model, adapter):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    w = batch["loss_weights"][:, 1:]
    return ((nll * w).sum(1) / w.sum(1)).mean()  # each row (example) its weighted mean, rows averaged


def test_gathered_logits_give_full_loss(tiny_model):
    adapter, policy = new_adapter(tiny_model)
    w = torch.rand(2, 16) * (torch.rand(2, 16) > 0.5)
    batch = _batch(weights=w)
    full = float(_loss_and_grads(tiny_model, adapter, batch).detach())
    stats = train_step(tiny_model, adapter, batch, policy, lr=0.0)
    assert math.isclose(stats.loss, full, rel_tol=1e-5)
    nll = evaluate_nll(tiny_model, None, batch)
    assert torch.isnan(nll[:, 0]).all() and torch.isnan(nll[:, 1:][w[:, 1:] == 0]).all()


def test_zero_weight_tokens_give_no_gradient(tiny_llama):
    adapter, _ = new_adapter(tiny_llama)
    with torch.no_grad():  # non-zero B so A gets gradients too
        for b in adapter.B.values():
            b.normal_(0, 0.05)
    w = torch.zeros(2, 16)
    w[:, 5:9] = 1.0
    batch = _batch(weights=w)
    loss = _loss_and_grads(tiny_llama, adapter, batch)
    loss.backward()
    ref = [p.grad.clone() for p in adapter.parameters()]
    # Changing tokens after the weighted span, and their (zero-weight) targets, changes nothing.
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][:, 9:] = 7
    loss2 = _loss_and_grads(tiny_llama, adapter, changed)
    loss2.backward()
    for p, g in zip(adapter.parameters(), ref):
        torch.testing.assert_close(p.grad, g)


class ProbePolicy(RankPolicy):
    """Asks for every signal and grows one module every step."""

    name = "probe"
    needs = frozenset({"grads", "token_importance", "hessian_trace"})

    def __init__(self, modules, bounds):
        super().__init__(modules, bounds)
        self.seen = []

    def initial_ranks(self, task=None):
        return {n: 2 for n in self.modules}

    def hessian_due(self, step):
        return step % 2 == 0

    def observe(self, obs):
        self.seen.append(obs)

    def propose(self, obs):
        first = next(iter(self.modules))
        return {first: obs.ranks[first] + 1, "unknown.module": 99}


def test_policy_signals_and_resize(tiny_model):
    modules_cfg = AdapterConfig()
    from adapter_core import inject_adapters

    modules = inject_adapters(tiny_model)
    policy = ProbePolicy(modules, RankBounds(r_min=1, r_max=4))
    from adapter_core import Adapter

    adapter = Adapter.new(modules, policy.initial_ranks(), lr=modules_cfg.lr)
    batch = _batch()
    batch["token_classes"] = torch.zeros(2, 16, dtype=torch.long)
    batch["task"] = "bug_fix"
    first = next(iter(modules))
    for _ in range(3):
        stats = train_step(tiny_model, adapter, batch, policy, lr=1e-2)
    assert adapter.ranks[first] == 4 and stats.ranks[first] == 4  # grown twice, then clipped at r_max
    obs0, obs1 = policy.seen[0], policy.seen[1]
    assert obs0.grad_A[first].shape == (2, modules[first].in_features)
    assert obs0.token_importance.shape == (2, 16) and torch.isfinite(obs0.token_importance).all()
    assert obs0.attention_received[:, 0].mean() > obs0.attention_received[:, -1].mean()  # causal: early tokens receive more
    assert obs0.hessian_trace is not None and math.isfinite(obs0.hessian_trace_total)
    assert obs1.hessian_trace is None
    assert obs0.task == "bug_fix" and obs0.token_classes is batch["token_classes"]
    assert stats.resized == [] and policy.seen[1].ranks[first] == 3


def test_resize_in_train_step_keeps_function(tiny_llama):
    from adapter_core import Adapter, inject_adapters

    modules = inject_adapters(tiny_llama)
    adapter = Adapter.new(modules, {n: 3 for n in modules})
    batch = _batch()
    for _ in range(3):
        train_step(tiny_llama, adapter, batch, None, lr=1e-2)
    before = evaluate_nll(tiny_llama, adapter, batch)
    adapter.resize({n: 6 for n in modules})
    torch.testing.assert_close(evaluate_nll(tiny_llama, adapter, batch), before, atol=1e-4, rtol=1e-4, equal_nan=True)
    stats = train_step(tiny_llama, adapter, batch, None, lr=1e-2)  # fresh moments for the new shapes
    assert not stats.skipped and set(stats.ranks.values()) == {6}


@pytest.mark.parametrize("family", ["llama"])
def test_snapshot_versions_and_resume(family, tiny_llama):
    from adapter_core import Adapter

    adapter, policy = new_adapter(tiny_llama)
    s1 = adapter.snapshot()
    train_step(tiny_llama, adapter, _batch(), policy, lr=1e-2)
    s2 = adapter.snapshot()
    assert (s1.version, s2.version) == (1, 2)
    assert not torch.equal(s1.B[next(iter(s1.B))], s2.B[next(iter(s2.B))])
    resumed = Adapter.from_snapshot(s2, adapter.modules)
    assert resumed.snapshot().version == 3
    stats = train_step(tiny_llama, resumed, _batch(), policy, lr=1e-2)
    assert not stats.skipped
