"""``AdapterConfig``: everything needed to start a new adapter."""

from __future__ import annotations

import dataclasses

from adapter_core.inject import DEFAULT_TARGET_MODULES
from adapter_core.policies.base import RankBounds


@dataclasses.dataclass
class AdapterConfig:
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    r_init: int = 8  # the "fixed" policy's rank unless policy_options sets "rank"
    bounds: RankBounds = dataclasses.field(default_factory=RankBounds)
    lr: float = 1e-3
    policy: str = "fixed"
    policy_options: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    # Constant per-module scale of B @ A; kept through resizes so a resize never
    # changes the function (a lora_alpha / r scale would jump at every resize).
    scale: float = 2.0
    weight_decay: float = 0.0
