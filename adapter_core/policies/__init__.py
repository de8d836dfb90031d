"""Rank policies. ``make_policy(name, modules, bounds, **options)`` builds one by name.

Each policy is a config dataclass plus a ``RankPolicy`` subclass, registered with
``register_policy(name, config_cls, policy_cls)`` in its own module; ``POLICIES``
maps name -> ``PolicySpec``.
"""

from adapter_core.policies.base import (
    ModuleInfo,
    RankBounds,
    RankPolicy,
    StepObservation,
)
from adapter_core.policies.registry import (
    POLICIES,
    PolicySpec,
    make_policy,
    policy_config,
    policy_spec,
    register_policy,
)

BUILTIN_POLICIES = ("fixed", "dynamicrank", "lalora", "gard", "adalora")


def _load_builtin_policies() -> None:
    """Import the built-in policy modules (each registers itself). Idempotent."""
    import importlib

    for module in BUILTIN_POLICIES:
        importlib.import_module(f"adapter_core.policies.{module}")


# Loaded with the package, so ``sorted(POLICIES)`` and ``name in POLICIES`` see them all.
_load_builtin_policies()

__all__ = [
    "BUILTIN_POLICIES", "POLICIES", "ModuleInfo", "PolicySpec", "RankBounds", "RankPolicy", "StepObservation",
    "make_policy", "policy_config", "policy_spec", "register_policy",
]
