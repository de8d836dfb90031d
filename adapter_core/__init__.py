"""Dynamic-rank LoRA: adapters as data over a frozen, shared base model.

Mechanism (this package): ``LoraLinear`` layers reading the adapter bound by
``use_adapter``; ``Adapter`` (trainable) and ``AdapterSnapshot`` (published);
SVD resize and budget fitting; the train step; PEFT export; merge. Rank
*policies* live in ``adapter_core.policies``.
"""

from adapter_core.adapter import Adapter
from adapter_core.config import AdapterConfig
from adapter_core.export import load_peft, save_peft
from adapter_core.inject import DEFAULT_TARGET_MODULES, adapted_modules, inject_adapters
from adapter_core.layer import LoraLinear, use_adapter
from adapter_core.merge import combine, merge_into, unmerge
from adapter_core.policies import ModuleInfo, RankBounds, RankPolicy, StepObservation, make_policy
from adapter_core.resize import fit_to_budget, resize_factors
from adapter_core.snapshot import AdapterSnapshot
from adapter_core.train import StepStats, evaluate_nll, train_step


def new_adapter(model, config: AdapterConfig | None = None, task: str | None = None) -> tuple[Adapter, RankPolicy]:
    """Inject (idempotent), build ``config.policy``, and create an adapter at its initial ranks.

    For the ``fixed`` policy, ``config.r_init`` is the rank unless ``policy_options`` sets ``rank``.
    """
    config = config or AdapterConfig()
    modules = inject_adapters(model, config.target_modules)
    options = dict(config.policy_options)
    if config.policy == "fixed":
        options.setdefault("rank", config.r_init)
    policy = make_policy(config.policy, modules, config.bounds, **options)
    ranks = fit_to_budget(policy.initial_ranks(task), modules, config.bounds)
    adapter = Adapter.new(
        modules, ranks, scale=config.scale, seed=config.seed, lr=config.lr,
        weight_decay=config.weight_decay, metadata={"policy": config.policy, "task": task},
    )
    return adapter, policy


__all__ = [
    "Adapter", "AdapterConfig", "AdapterSnapshot", "DEFAULT_TARGET_MODULES", "LoraLinear", "ModuleInfo",
    "RankBounds", "RankPolicy", "StepObservation", "StepStats", "adapted_modules", "combine",
    "evaluate_nll", "fit_to_budget", "inject_adapters", "load_peft", "make_policy", "merge_into",
    "new_adapter", "resize_factors", "save_peft", "train_step", "unmerge", "use_adapter",
]
