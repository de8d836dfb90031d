"""The rank-policy registry: name -> (config dataclass, policy class).

Each policy module calls ``register_policy(name, config_cls, policy_cls)`` once, as
PEFT's ``register_peft_method`` does; ``make_policy`` builds a policy from plain
keyword options (the form ``AdapterConfig.policy_options`` and the settings use).
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

from adapter_core.policies.base import ModuleInfo, RankBounds, RankPolicy


class PolicySpec(NamedTuple):
    name: str
    config_cls: type
    policy_cls: type[RankPolicy]


POLICIES: dict[str, PolicySpec] = {}

_NAME_RE = re.compile(r"[a-z][a-z0-9_-]*")


def register_policy(name: str, config_cls: type, policy_cls: type[RankPolicy]) -> PolicySpec:
    """Add a policy under ``name`` (lower-case, unique); ``config_cls`` must be a dataclass."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"policy name {name!r} must be lower-case letters, digits, '_' or '-'")
    if name in POLICIES:
        raise ValueError(f"rank policy {name!r} is already registered")
    if not dataclasses.is_dataclass(config_cls):
        raise ValueError(f"{config_cls!r} is not a dataclass")
    POLICIES[name] = spec = PolicySpec(name, config_cls, policy_cls)
    return spec


def policy_spec(name: str) -> PolicySpec:
    if name not in POLICIES:
        raise ValueError(f"unknown rank policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return POLICIES[name]


def policy_config(name: str, **options):
    """The policy's config dataclass built from keyword options (validated by its ``__post_init__``)."""
    config_cls = policy_spec(name).config_cls
    valid = [f.name for f in dataclasses.fields(config_cls) if f.init]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        # A typo must not silently fall back to a default.
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for rank policy {name!r}; "
                         f"valid: {', '.join(valid)}")
    return config_cls(**options)


def make_policy(name: str, modules: dict[str, ModuleInfo], bounds: RankBounds, **options) -> RankPolicy:
    """Build the policy ``name`` for ``modules`` from keyword options."""
    config = policy_config(name, **options)
    return POLICIES[name].policy_cls(modules, bounds, config)
