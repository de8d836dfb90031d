"""Dynamic-rank LoRA: adapters as data over a frozen, shared base model.

Mechanism (this package): ``LoraLinear`` layers reading the adapter bound by
``use_adapter``; ``Adapter`` (trainable) and ``AdapterSnapshot`` (published);
``new_session_adapter`` (build one, fresh or resumed, with its policy); SVD
resize and budget fitting; the train step; PEFT export; merge. Rank *policies*
live in ``adapter_core.policies``.
"""

from adapter_core.adapter import Adapter
from adapter_core.build import new_adapter, new_session_adapter
from adapter_core.config import AdapterConfig
from adapter_core.export import load_peft, save_peft
from adapter_core.inject import DEFAULT_TARGET_MODULES, adapted_modules, inject_adapters
from adapter_core.layer import LoraLinear, use_adapter
from adapter_core.merge import combine, merge_into, unmerge
from adapter_core.policies import (
    POLICIES,
    ModuleInfo,
    RankBounds,
    RankPolicy,
    StepObservation,
    make_policy,
    register_policy,
)
from adapter_core.resize import fit_to_budget, resize_factors
from adapter_core.snapshot import AdapterSnapshot
from adapter_core.train import StepStats, evaluate_nll, train_step

__all__ = [
    "Adapter", "AdapterConfig", "AdapterSnapshot", "DEFAULT_TARGET_MODULES", "LoraLinear", "ModuleInfo",
    "POLICIES", "RankBounds", "RankPolicy", "StepObservation", "StepStats", "adapted_modules", "combine",
    "evaluate_nll", "fit_to_budget", "inject_adapters", "load_peft", "make_policy", "merge_into",
    "new_adapter", "new_session_adapter", "register_policy", "resize_factors", "save_peft", "train_step",
    "unmerge", "use_adapter",
]
