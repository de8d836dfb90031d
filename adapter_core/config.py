"""``AdapterConfig``: everything needed to start a new adapter."""

from __future__ import annotations

import dataclasses

from adapter_core.adapter import RS_ALPHA
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
    # rsLoRA: a module's scale is lora_alpha / sqrt(r) at its initial rank. It is kept
    # through resizes, so a resize never changes the function (a rescale at every
    # resize would jump the output and invalidate the optimizer moments).
    lora_alpha: float = RS_ALPHA
    # Parameter budget as a mean rank: the parameters a fixed adapter of this rank has
    # on the same modules (bounds.budget, in parameters, wins when set). None: no cap.
    rank_budget: float | None = 8.0
    weight_decay: float = 0.0
