"""The plain LoRA baseline: one rank for every module, never changed."""

from __future__ import annotations

from adapter_core.policies import register_policy
from adapter_core.policies.base import ModuleInfo, RankBounds, RankPolicy


@register_policy
class FixedRankPolicy(RankPolicy):
    name = "fixed"
    needs = frozenset()

    def __init__(self, modules: dict[str, ModuleInfo], bounds: RankBounds, rank: int = 8):
        super().__init__(modules, bounds)
        self.rank = int(rank)

    def initial_ranks(self, task: str | None = None) -> dict[str, int]:
        return {name: self.rank for name in self.modules}

    def propose(self, obs):
        return None
