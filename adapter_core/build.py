"""Building a trainable adapter and its rank policy: the one path the server, jobs and bench use."""

from __future__ import annotations

import dataclasses
import logging

from adapter_core.adapter import Adapter
from adapter_core.config import AdapterConfig
from adapter_core.inject import inject_adapters
from adapter_core.policies import ModuleInfo, RankBounds, RankPolicy, make_policy
from adapter_core.resize import fit_to_budget
from adapter_core.snapshot import AdapterSnapshot

log = logging.getLogger("dynarank.adapter_core")


def session_bounds(config: AdapterConfig, modules: dict[str, ModuleInfo]) -> RankBounds:
    """``config.bounds`` with the budget in parameters: ``rank_budget`` times the parameters of one rank
    on every module, unless ``bounds.budget`` already sets it."""
    if config.bounds.budget is not None or config.rank_budget is None:
        return config.bounds
    per_rank = sum(m.params_per_rank() for m in modules.values())
    return dataclasses.replace(config.bounds, budget=int(config.rank_budget * per_rank))


def _make_policy(config: AdapterConfig, modules: dict[str, ModuleInfo], name: str | None = None) -> RankPolicy:
    name = name or config.policy
    # config.policy_options belong to config.policy; any other policy gets its defaults.
    options = dict(config.policy_options) if name == config.policy else {}
    if name == "fixed":
        options.setdefault("rank", config.r_init)
    return make_policy(name, modules, session_bounds(config, modules), **options)


def _model_device(model):
    """Where the adapter's factors, optimizer state and snapshots live: with the model's weights."""
    return next(model.parameters()).device


def new_adapter(model, config: AdapterConfig | None = None, task: str | None = None) -> tuple[Adapter, RankPolicy]:
    """Inject (idempotent), build ``config.policy``, and create an adapter at its initial ranks, on the
    model's device.

    For the ``fixed`` policy, ``config.r_init`` is the rank unless ``policy_options`` sets ``rank``.
    """
    config = config or AdapterConfig()
    modules = inject_adapters(model, config.target_modules)
    policy = _make_policy(config, modules)
    ranks = fit_to_budget(policy.initial_ranks(task), modules, policy.bounds)
    adapter = Adapter.new(
        modules, ranks, lora_alpha=config.lora_alpha, seed=config.seed, lr=config.lr,
        weight_decay=config.weight_decay, metadata={"policy": config.policy, "task": task},
        device=_model_device(model),
    )
    return adapter, policy


def new_session_adapter(
    model,
    config: AdapterConfig | None = None,
    *,
    task: str | None = None,
    snapshot: AdapterSnapshot | None = None,
    policy_state: dict | None = None,
) -> tuple[Adapter, RankPolicy]:
    """A trainable adapter and its policy: fresh (``snapshot=None``) or resumed from ``snapshot``.

    Fresh: as :func:`new_adapter`, at the policy's initial ranks for ``task``.
    Either way the factors are on the model's device (a snapshot read from disk is on the CPU).
    Resumed: the snapshot's factors, version and metadata with a fresh optimizer; the
    policy is the one the snapshot names (``metadata["policy"]``), or ``config.policy``
    when it names none or one that cannot be built (unknown name, changed options).
    ``policy_state`` (from ``policy.state_dict()``) is restored when it loads; a state
    whose format changed is dropped with a warning and the policy starts fresh.
    """
    config = config or AdapterConfig()
    if snapshot is None:
        adapter, policy = new_adapter(model, config, task)
    else:
        modules = inject_adapters(model, config.target_modules)
        try:
            policy = _make_policy(config, modules, snapshot.metadata.get("policy"))
        except ValueError as exc:
            log.warning("snapshot's rank policy unusable (%s); using %r", exc, config.policy)
            policy = _make_policy(config, modules)
        adapter = Adapter.from_snapshot(
            snapshot, {n: modules[n] for n in snapshot.A if n in modules},
            lr=config.lr, weight_decay=config.weight_decay, seed=config.seed, device=_model_device(model),
        )
    if policy_state:
        try:
            policy.load_state_dict(policy_state)
        except Exception:  # a policy whose state format changed starts fresh
            log.warning("could not restore policy state; starting it fresh")
    return adapter, policy
