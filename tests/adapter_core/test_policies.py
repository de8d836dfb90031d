"""Rank policies: each equation on small hand-made tensors, and each policy's reaction to its signal."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from adapter_core.policies import (
    POLICIES,
    ModuleInfo,
    RankBounds,
    RankPolicy,
    StepObservation,
    make_policy,
    register_policy,
)
from adapter_core.policies.adalora import budget_schedule
from adapter_core.policies.dynamicrank import (
    important_mass,
    landscape_multiplier,
    landscape_ratio,
)
from adapter_core.policies.gard import (
    allocate_proportional,
    effective_rank,
    gram_eigenvalues,
)
from adapter_core.policies.lalora import (
    factor_singular_values,
    fidelity,
    growth_rate,
    layer_value,
    next_budget,
    round_to_total,
    split_budget,
)

MODULES = {
    "l0.q": ModuleInfo("l0.q", 10, 10, 0),
    "l1.q": ModuleInfo("l1.q", 10, 10, 1),
}


def make_obs(step, ranks, *, seed=0, grad_scale=None, loss=1.0, modules=MODULES, **fields):
    """A synthetic observation: random factors and gradients of the given ranks."""
    g = torch.Generator().manual_seed(seed)
    A = {n: torch.randn(r, modules[n].in_features, generator=g) for n, r in ranks.items()}
    B = {n: torch.randn(modules[n].out_features, r, generator=g) for n, r in ranks.items()}
    scale = grad_scale or {}
    gA = {n: torch.randn(a.shape, generator=g) * scale.get(n, 1.0) for n, a in A.items()}
    gB = {n: torch.randn(b.shape, generator=g) * scale.get(n, 1.0) for n, b in B.items()}
    fields.setdefault("grad_A", gA)
    fields.setdefault("grad_B", gB)
    return StepObservation(step=step, loss=loss, ranks=dict(ranks), lora_A=A, lora_B=B, **fields)


# ---------------------------------------------------------------- registry / shared invariants


# Options per policy for the shared matrix; a policy not listed runs with its defaults.
POLICY_OPTIONS = {
    "dynamicrank": {"controller": "gumbel"},
    "lalora": {"gamma": 5.0},
    "gard": {"window": 4, "interval": 2},
    "adalora": {"total_step": 10, "init_r": 6, "target_r": 2},
}
# One value per policy that its config must reject (every registered policy needs one).
BAD_OPTIONS = {
    "fixed": {"rank": 0},
    "dynamicrank": {"ema": 1.5},
    "lalora": {"temperature": 0.0},
    "gard": {"alpha": 1.0},
    "adalora": {"total_step": 10, "deltaT": 0},
}
REGISTERED = sorted(POLICIES)


def test_all_policies_registered():
    assert {"fixed", "dynamicrank", "lalora", "gard", "adalora"} <= set(POLICIES)
    for name, spec in POLICIES.items():
        assert name == spec.name == name.lower()
        assert dataclasses.is_dataclass(spec.config_cls) and issubclass(spec.policy_cls, RankPolicy)


def test_duplicate_or_bad_name_registration_raises():
    spec = POLICIES["fixed"]
    with pytest.raises(ValueError, match="already registered"):
        register_policy("fixed", spec.config_cls, spec.policy_cls)
    with pytest.raises(ValueError, match="lower-case"):
        register_policy("Fixed2", spec.config_cls, spec.policy_cls)
    assert POLICIES["fixed"] is spec and "Fixed2" not in POLICIES


@pytest.mark.parametrize("name", REGISTERED)
def test_config_fields_have_help(name):
    for f in dataclasses.fields(POLICIES[name].config_cls):
        assert f.metadata.get("help"), f"{name}: field {f.name} has no help text"


@pytest.mark.parametrize("name", REGISTERED)
def test_config_rejects_bad_value(name):
    assert name in BAD_OPTIONS, f"add a value {name}'s config must reject to BAD_OPTIONS"
    with pytest.raises(ValueError):
        POLICIES[name].config_cls(**BAD_OPTIONS[name])
    with pytest.raises(ValueError):  # make_policy goes through the same check
        make_policy(name, MODULES, RankBounds(), **BAD_OPTIONS[name])


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match=r"windw.*valid:.*\bwindow\b"):
        make_policy("gard", MODULES, RankBounds(), windw=4)
    with pytest.raises(ValueError, match="unknown rank policy"):
        make_policy("no-such-policy", MODULES, RankBounds())


@pytest.mark.parametrize("name", REGISTERED)
def test_make_policy_builds_config(name):
    options = POLICY_OPTIONS.get(name, {})
    policy = make_policy(name, MODULES, RankBounds(), **options)
    assert isinstance(policy, POLICIES[name].policy_cls)
    assert policy.config == POLICIES[name].config_cls(**options)


def _signal_fields(step):
    g = torch.Generator().manual_seed(100 + step)
    return dict(
        token_importance=torch.rand(2, 8, generator=g) * 2,
        token_classes=torch.randint(0, 11, (2, 8), generator=g),
        hessian_trace={n: 1.0 + step for n in MODULES} if step % 3 == 0 else None,
    )


def _run(policy, steps, ranks, start=0):
    proposals = []
    for t in range(start, start + steps):
        obs = make_obs(t, ranks, seed=t, loss=1.0 / (t + 1), **_signal_fields(t))
        policy.observe(obs)
        p = policy.propose(obs)
        proposals.append(p)
        if p:
            ranks = {n: min(policy.bounds.r_max, max(policy.bounds.r_min, r)) for n, r in p.items()}
    return proposals, ranks


@pytest.mark.parametrize("name", REGISTERED)
def test_proposals_within_bounds(name):
    bounds = RankBounds(r_min=2, r_max=12)
    policy = make_policy(name, MODULES, bounds, **POLICY_OPTIONS.get(name, {}))
    ranks = policy.initial_ranks()
    assert all(2 <= r <= 12 for r in ranks.values())
    proposals, _ = _run(policy, 12, ranks)
    for p in proposals:
        if p is not None:
            assert set(p) <= set(MODULES)
            assert all(2 <= r <= 12 for r in p.values())


@pytest.mark.parametrize("name", REGISTERED)
def test_state_dict_round_trip(name):
    bounds = RankBounds(r_min=1, r_max=16)
    options = POLICY_OPTIONS.get(name, {})
    a = make_policy(name, MODULES, bounds, **options)
    _, ranks = _run(a, 6, a.initial_ranks())
    b = make_policy(name, MODULES, bounds, **options)
    b.load_state_dict(a.state_dict())
    pa, _ = _run(a, 4, ranks, start=6)
    pb, _ = _run(b, 4, ranks, start=6)
    assert pa == pb


# ---------------------------------------------------------------- DynamicRank


def test_important_mass_by_hand():
    imp = torch.tensor([[2.0, 1.0, 0.5, 0.5]])  # mean 1, so normalising changes nothing
    cls = torch.tensor([[0, 1, 1, 0]])
    # thresholds [1, .5, .5, 1]: tokens 0 (2 > 1) and 1 (1 > .5) count: (2 + 1) / 4
    S, mean = important_mass(imp, cls, None, tau=1.0, code_tau=0.5, code_classes=frozenset({1}))
    assert S == pytest.approx(0.75) and mean == pytest.approx(1.0)
    # without code classes only token 0 counts
    S, _ = important_mass(imp, cls, None, 1.0, 0.5, frozenset())
    assert S == pytest.approx(0.5)
    # mask drops the last token: scores [2, 1, .5] / (7/6) = [12/7, 6/7, 3/7]; first two count
    S, _ = important_mass(imp, cls, torch.tensor([[1, 1, 1, 0]]), 1.0, 0.5, frozenset({1}))
    assert S == pytest.approx((18 / 7) / 3)


def test_landscape_factor_by_hand():
    assert landscape_ratio(3.0, -1.0) == pytest.approx(3.0)
    assert landscape_multiplier(2.0, 1.0, eta=0.5, cap=0.5) == pytest.approx(1.5)
    assert landscape_multiplier(0.5, 1.0, eta=0.5, cap=0.5) == pytest.approx(0.75)
    assert landscape_multiplier(10.0, 1.0, eta=0.5, cap=0.5) == pytest.approx(1.5)  # capped


def test_default_code_classes_from_code_signals():
    from code_signals.classes import TokenClass

    policy = make_policy("dynamicrank", MODULES, RankBounds())
    assert policy.code_classes == {int(TokenClass.KEYWORD), int(TokenClass.IDENTIFIER_DEF), int(TokenClass.IDENTIFIER_USE)}
    custom = make_policy("dynamicrank", MODULES, RankBounds(), keyword_classes={7}, identifier_classes={9})
    assert custom.code_classes == {7, 9}


def _tokens_obs(step, cls_value, ranks, **kw):
    # Every token equally important (normalised score 1): only the lowered threshold 0.5 lets them count.
    return make_obs(
        step, ranks, seed=1, token_importance=torch.ones(1, 10),
        token_classes=torch.full((1, 10), cls_value), **kw,
    )


def test_dynamicrank_grows_on_important_keyword_tokens():
    policy = make_policy("dynamicrank", MODULES, RankBounds(), use_loss_landscape=False, lam=4.0)
    ranks = {"l0.q": 8, "l1.q": 8}
    scale = {"l0.q": 3.0, "l1.q": 1.0}  # gradient shares 1.5 and 0.5
    obs = _tokens_obs(0, 1, ranks, grad_scale=scale)  # class 1 = KEYWORD
    policy.observe(obs)
    proposal = policy.propose(obs)
    share = policy.share
    assert share["l0.q"] > 1 > share["l1.q"]
    # eq. 8, centred on the average module: S = 1, r' = floor(8 + lam * S * (share - 1))
    assert proposal == {n: math.floor(8 + 4.0 * (share[n] - 1)) for n in ranks}
    assert proposal["l0.q"] > 8 > proposal["l1.q"]


def test_dynamicrank_keeps_rank_without_important_tokens():
    policy = make_policy("dynamicrank", MODULES, RankBounds(), use_loss_landscape=False)
    ranks = {"l0.q": 8, "l1.q": 8}
    for t in range(5):
        obs = _tokens_obs(t, 0, ranks)  # whitespace: threshold 1, score 1 is not above it
        policy.observe(obs)
        assert policy.propose(obs) == ranks


def test_dynamicrank_shrinks_low_importance_module_with_hysteresis():
    policy = make_policy("dynamicrank", MODULES, RankBounds(), use_loss_landscape=False, use_token_importance=False)
    ranks = {"l0.q": 8, "l1.q": 8}
    history = []
    for t in range(30):  # l1 carries 1/5 of the gradient of l0: share 0.33 -> EMA falls below 0.5
        obs = make_obs(t, ranks, seed=3, grad_scale={"l0.q": 4.0, "l1.q": 1.0})
        obs.grad_A = {n: torch.ones_like(a) * (4.0 if n == "l0.q" else 1.0) for n, a in obs.lora_A.items()}
        obs.grad_B = {n: torch.ones_like(b) * (4.0 if n == "l0.q" else 1.0) for n, b in obs.lora_B.items()}
        policy.observe(obs)
        ranks = policy.propose(obs)
        history.append(ranks["l1.q"])
    assert ranks["l0.q"] == 8
    assert ranks["l1.q"] < 8
    # Equal gradients again: shrinking continues until the EMA is back above 0.8 (hysteresis), then stops.
    low = ranks["l1.q"]
    after = []
    for t in range(30, 60):
        obs = make_obs(t, ranks, seed=3)
        obs.grad_A = {n: torch.ones_like(a) for n, a in obs.lora_A.items()}
        obs.grad_B = {n: torch.ones_like(b) for n, b in obs.lora_B.items()}
        policy.observe(obs)
        ranks = policy.propose(obs)
        after.append(ranks["l1.q"])
    assert after[3] < low  # still shrinking just after the signal recovered
    assert after[-1] == after[-10]  # and stopped later


def test_dynamicrank_landscape_modulation_eq9():
    policy = make_policy("dynamicrank", MODULES, RankBounds(), use_token_importance=False, hessian_every=10)
    assert policy.needs == {"grads", "hessian_trace"}
    assert policy.hessian_due(0) and policy.hessian_due(10) and not policy.hessian_due(3)
    ranks = {"l0.q": 8, "l1.q": 8}

    def obs_with(step, gscale, trace):
        obs = make_obs(step, ranks, seed=4, hessian_trace={n: trace for n in MODULES})
        obs.grad_A = {n: torch.ones_like(a) * gscale for n, a in obs.lora_A.items()}
        obs.grad_B = {n: torch.ones_like(b) * gscale for n, b in obs.lora_B.items()}
        return obs

    obs = obs_with(0, 1.0, 2.0)  # first measurement defines the average: factor 1
    policy.observe(obs)
    assert policy.propose(obs) == ranks
    obs = obs_with(10, 2.0, 2.0)  # ratio doubled: factor 1 + 0.5 * (2 - 1) = 1.5 -> 12
    policy.observe(obs)
    assert policy.propose(obs) == {"l0.q": 12, "l1.q": 12}


def test_dynamicrank_ablation_switches():
    off = make_policy(
        "dynamicrank", MODULES, RankBounds(), use_token_importance=False, use_loss_landscape=False
    )
    assert off.needs == {"grads"}
    assert not off.hessian_due(0)
    ranks = {"l0.q": 8, "l1.q": 8}
    obs = _tokens_obs(0, 1, ranks, hessian_trace={n: 1e-6 for n in MODULES})
    off.observe(obs)
    assert off.propose(obs) == ranks  # keyword tokens and landscape are ignored


def test_dynamicrank_task_aware_initial_ranks():
    policy = make_policy("dynamicrank", MODULES, RankBounds())
    bug, mod, new = (policy.initial_ranks(t)["l0.q"] for t in ("bug_fix", "modification", "new_code"))
    assert bug > mod > new
    capped = make_policy("dynamicrank", MODULES, RankBounds(budget=2 * 20 * 10))  # room for rank 10 each
    assert capped.initial_ranks("bug_fix") == {"l0.q": 10, "l1.q": 10}


def test_dynamicrank_follows_mechanism_clip():
    policy = make_policy("dynamicrank", MODULES, RankBounds(), use_loss_landscape=False)
    ranks = {"l0.q": 8, "l1.q": 8}
    obs = _tokens_obs(0, 1, ranks)
    policy.observe(obs)
    policy.propose(obs)  # asks for 9 each
    obs = _tokens_obs(1, 0, ranks)  # the budget kept them at 8; no new signal
    policy.observe(obs)
    assert policy.propose(obs) == ranks


def test_dynamicrank_gumbel_controller_learns_and_moves_ranks():
    policy = make_policy("dynamicrank", MODULES, RankBounds(), controller="gumbel", use_token_importance=False)
    before = [p.clone() for p in policy.controller.parameters()]
    ranks = {"l0.q": 8, "l1.q": 8}
    seen = set()
    for t in range(10):
        obs = make_obs(t, ranks, seed=t, loss=1.0 + 0.1 * (t % 3), hessian_trace={n: 1.0 for n in MODULES})
        policy.observe(obs)
        ranks = policy.propose(obs)
        seen.update(ranks.values())
    assert len(seen) > 1  # sampled changes moved ranks
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.controller.parameters()))


# ---------------------------------------------------------------- La-LoRA


def test_lalora_equations_by_hand():
    assert layer_value([3.0], [1.0], 2) == pytest.approx(2.0)  # eq. 7
    assert growth_rate(2.2, 2.0) == pytest.approx(0.1)  # eq. 6
    assert next_budget(4.0, [0.1, 0.3], gamma=1.0, lo=2, hi=16) == pytest.approx(4.8)  # eq. 5
    assert next_budget(15.0, [0.5], gamma=1.0, lo=2, hi=16) == 16  # clipped to r L
    assert fidelity(3.0, 16.0) == pytest.approx(0.6)  # eq. 10: 3 / sqrt(9 + 16)
    assert split_budget([0.0, math.log(3.0)], 8.0) == pytest.approx([2.0, 6.0])  # eq. 8
    assert round_to_total([2.5, 1.2, 3.3], 7) == [3, 1, 3]


def test_factor_singular_values_match_dense():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    assert factor_singular_values(A, B) == pytest.approx(torch.linalg.svdvals(B @ A)[:3].tolist(), rel=1e-4)


def _scaled_obs(step, ranks, factor):
    obs = make_obs(step, ranks, seed=5)
    obs.lora_A = {n: a * factor for n, a in obs.lora_A.items()}
    obs.lora_B = {n: b * factor for n, b in obs.lora_B.items()}
    return obs


def test_lalora_budget_grows_with_norms_dcdpb():
    policy = make_policy("lalora", MODULES, RankBounds(), gamma=1.0)
    ranks = {"l0.q": 1, "l1.q": 1}
    assert policy.budget == 2  # DCDPB^0 = 1 L (two layers)
    policy.observe(_scaled_obs(0, ranks, 1.0))
    assert policy.budget == pytest.approx(2.0)
    policy.observe(_scaled_obs(1, ranks, 1.1))  # every norm +10%: IR = 0.1 -> 2 * 1.1
    assert policy.budget == pytest.approx(2.2)
    policy.observe(_scaled_obs(2, ranks, 1.1))  # no change: budget stays
    assert policy.budget == pytest.approx(2.2)


def test_lalora_allocates_by_contribution():
    policy = make_policy("lalora", MODULES, RankBounds(), temperature=10.0)
    ranks = {"l0.q": 4, "l1.q": 4}
    obs = make_obs(0, ranks, seed=6)
    obs.lora_B["l0.q"] = obs.lora_B["l0.q"] * 5  # layer 0 contributes much more
    policy.observe(obs)
    policy.budget = 10.0
    proposal = policy.propose(obs)
    assert proposal["l0.q"] > proposal["l1.q"]
    assert sum(proposal.values()) == 10
    # equal contributions: equal split
    policy.contributions = {u: 1.0 for u in policy.contributions}
    assert policy.propose(obs) == {"l0.q": 5, "l1.q": 5}


def test_lalora_per_layer_units_share_rank():
    modules = {**MODULES, "l0.v": ModuleInfo("l0.v", 10, 10, 0)}
    policy = make_policy("lalora", modules, RankBounds())
    assert sorted(map(sorted, policy.units.values())) == [["l0.q", "l0.v"], ["l1.q"]]
    ranks = {n: 2 for n in modules}
    obs = make_obs(0, ranks, seed=7, modules=modules)
    policy.observe(obs)
    policy.budget = 6.0
    p = policy.propose(obs)
    assert p["l0.q"] == p["l0.v"]


def test_lalora_fidelity_tracks_dropped_directions():
    policy = make_policy("lalora", {"l0.q": MODULES["l0.q"]}, RankBounds())
    policy.prev_rank = {"l0.q": 4}
    policy.prev_sigma = {"l0.q": [4.0, 3.0, 2.0, 1.0]}
    policy._track_truncation("l0.q", 2)  # directions with sigma 2 and 1 dropped
    assert policy.dropped["l0.q"] == [1.0, 2.0]
    policy.prev_rank = {"l0.q": 2}
    policy._track_truncation("l0.q", 3)  # the strongest dropped one (sigma 2) comes back
    assert policy.dropped["l0.q"] == [1.0]


# ---------------------------------------------------------------- GARD


def test_gard_effective_rank_by_hand():
    lam = torch.tensor([1.0, 4.0, 2.0, 3.0])  # sorted 4 3 2 1, total 10
    assert effective_rank(lam, 0.6) == 2  # 4 + 3 = 7 >= 6
    assert effective_rank(lam, 0.9) == 3  # 9 >= 9
    assert effective_rank(lam, 0.95) == 4
    eig = gram_eigenvalues([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])  # S = I / sqrt 2
    assert eig.tolist() == pytest.approx([0.5, 0.5])


def test_gard_proportional_allocation_by_hand():
    # 20 params per rank each, budget 200: ranks sum to <= 10; r = 1 + c * s, largest fitting c gives 7 and 3.
    ranks = allocate_proportional({"l0.q": 0.75, "l1.q": 0.25}, MODULES, 1, 64, 200)
    assert ranks == {"l0.q": 7, "l1.q": 3}


def test_gard_sketch_is_projected_update():
    policy = make_policy("gard", MODULES, RankBounds(), sketch_dim=4)
    g = torch.Generator().manual_seed(0)
    A, B, gA, gB = torch.randn(3, 10, generator=g), torch.randn(10, 3, generator=g), torch.randn(3, 10, generator=g), torch.randn(10, 3, generator=g)
    p_out, p_in = policy._projection(MODULES["l0.q"])
    dense = p_out @ (gB @ A + B @ gA) @ p_in
    assert torch.allclose(policy.sketch("l0.q", A, B, gA, gB), dense.flatten(), atol=1e-5)


def _gard_obs(step, ranks, diverse: set[str]):
    """Module gradients: random each step for ``diverse`` modules, one fixed direction otherwise."""
    obs = make_obs(step, ranks, seed=0)  # same factors every step
    g = torch.Generator().manual_seed(1000 + step)
    fixed = torch.Generator().manual_seed(42)
    for n in MODULES:
        gen = g if n in diverse else fixed
        scale = 1.0 if n in diverse else float(step + 1)  # same direction, varying size
        obs.grad_A[n] = torch.randn(obs.lora_A[n].shape, generator=gen) * scale
        obs.grad_B[n] = torch.randn(obs.lora_B[n].shape, generator=gen) * scale
        if n not in diverse:
            fixed.manual_seed(42)
    return obs


def test_gard_static_gives_more_rank_to_higher_effective_rank():
    policy = make_policy("gard", MODULES, RankBounds(), variant="static", window=8)
    ranks = policy.initial_ranks()
    assert ranks == {"l0.q": 8, "l1.q": 8}
    proposals = []
    for t in range(12):
        obs = _gard_obs(t, ranks, diverse={"l0.q"})
        policy.observe(obs)
        proposals.append(policy.propose(obs))
    eff = policy.current_effective_ranks()
    assert eff["l0.q"] > eff["l1.q"] == 1
    done = [p for p in proposals if p is not None]
    assert len(done) == 1 and proposals[7] is not None  # once, right after the warmup of 8 steps
    assert done[0]["l0.q"] > done[0]["l1.q"]
    assert sum(done[0].values()) * 20 <= 16 * 20  # budget = the starting total


def test_gard_dynamic_clips_changes_and_keeps_equal_modules_equal():
    policy = make_policy("gard", MODULES, RankBounds(), variant="dynamic", window=4, interval=2, delta_max=1)
    ranks = {"l0.q": 8, "l1.q": 8}
    for t in range(8):
        obs = _gard_obs(t, ranks, diverse={"l0.q"})
        policy.observe(obs)
        p = policy.propose(obs)
        if p:
            assert all(abs(p[n] - ranks[n]) <= 1 for n in p)
            ranks = p
    assert ranks["l0.q"] > 8 > ranks["l1.q"]

    same = make_policy("gard", MODULES, RankBounds(), variant="dynamic", window=4, interval=2)
    ranks = {"l0.q": 8, "l1.q": 8}
    for t in range(8):
        obs = _gard_obs(t, ranks, diverse=set())
        same.observe(obs)
        p = same.propose(obs)
        assert p is None or p == ranks


# ---------------------------------------------------------------- AdaLoRA emulation


def test_adalora_budget_schedule_by_hand():
    assert budget_schedule(0, 24, 16, 0, 0, 10) == 24
    assert budget_schedule(5, 24, 16, 0, 0, 10) == 17  # int(8 * 0.5^3 + 16)
    assert budget_schedule(10, 24, 16, 0, 0, 10) == 16
    assert budget_schedule(11, 24, 16, 0, 0, 10) == 16


def test_adalora_prunes_module_without_sensitivity():
    policy = make_policy("adalora", MODULES, RankBounds(), total_step=6, init_r=4, target_r=2)
    ranks = policy.initial_ranks()
    assert ranks == {"l0.q": 4, "l1.q": 4}
    for t in range(7):
        obs = make_obs(t, ranks, seed=t, grad_scale={"l0.q": 1.0, "l1.q": 0.0})
        policy.observe(obs)
        p = policy.propose(obs)
        if p:
            ranks = p
    assert ranks == {"l0.q": 4, "l1.q": 1}  # total budget 4 directions: all of l0; l1 floored at r_min


def test_adalora_requires_total_step():
    with pytest.raises(ValueError, match="total_step"):
        make_policy("adalora", MODULES, RankBounds())
