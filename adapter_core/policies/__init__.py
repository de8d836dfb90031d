"""Rank policies. ``make_policy(name, modules, bounds, **options)`` builds one by name."""

from adapter_core.policies.base import ModuleInfo, RankBounds, RankPolicy, StepObservation

POLICIES: dict[str, type[RankPolicy]] = {}


def register_policy(cls: type[RankPolicy]) -> type[RankPolicy]:
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, modules: dict[str, ModuleInfo], bounds: RankBounds, **options) -> RankPolicy:
    _load_builtin_policies()
    if name not in POLICIES:
        raise ValueError(f"unknown rank policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](modules, bounds, **options)


def _load_builtin_policies() -> None:
    # Imported lazily so each policy module registers itself on first use.
    import importlib

    for module in ("fixed", "dynamicrank", "lalora", "gard", "adalora"):
        try:
            importlib.import_module(f"adapter_core.policies.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"adapter_core.policies.{module}":
                raise


__all__ = ["ModuleInfo", "RankBounds", "RankPolicy", "StepObservation", "POLICIES", "make_policy", "register_policy"]
