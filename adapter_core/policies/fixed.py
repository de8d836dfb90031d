"""The plain LoRA baseline: one rank for every module, never changed."""

from __future__ import annotations

import dataclasses

from adapter_core.policies.base import ModuleInfo, RankBounds, RankPolicy, check
from adapter_core.policies.registry import register_policy


@dataclasses.dataclass
class FixedConfig:
    rank: int = dataclasses.field(
        default=8, metadata={"help": "Rank of every module (clipped to the bounds). new_adapter sets it from "
                                     "AdapterConfig.r_init unless the policy options give it."})

    def __post_init__(self):
        check(self.rank >= 1, f"rank must be >= 1, not {self.rank}")


class FixedRankPolicy(RankPolicy):
    name = "fixed"
    needs = frozenset()

    def __init__(self, modules: dict[str, ModuleInfo], bounds: RankBounds, config: FixedConfig | None = None):
        config = config or FixedConfig()
        super().__init__(modules, bounds, config)
        self.rank = int(config.rank)

    def initial_ranks(self, task: str | None = None) -> dict[str, int]:
        return {name: self.rank for name in self.modules}

    def propose(self, obs):
        return None


register_policy("fixed", FixedConfig, FixedRankPolicy)
