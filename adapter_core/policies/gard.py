"""GARD: gradient-spectral rank allocation (paper 002, sections 3.2-3.4).

Per module we keep a window of sketched gradients of the adapter update, take the
eigenvalues of their Gram matrix, read off an *effective rank* at an energy
threshold, and share the parameter budget in proportion to those effective ranks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field

import torch

from adapter_core.policies.base import (
    ModuleInfo,
    RankBounds,
    RankPolicy,
    StepObservation,
    check,
)
from adapter_core.policies.registry import register_policy


def effective_rank(eigenvalues: torch.Tensor, alpha: float) -> int:
    """Smallest k whose top-k eigenvalues hold a fraction ``alpha`` of the energy (sec. 3.2)."""
    lam = eigenvalues.clamp_min(0).sort(descending=True).values
    total = float(lam.sum())
    if total <= 0:
        return 1
    cumulative = torch.cumsum(lam, 0)
    # Tiny relative slack so that e.g. alpha=0.5 of [1, 1] gives 1, not 2 by rounding.
    return int((cumulative < alpha * total * (1 - 1e-9)).sum()) + 1


def gram_eigenvalues(sketches: list[torch.Tensor]) -> torch.Tensor:
    """Eigenvalues of C = S^T S with S = [g_1 .. g_M] / sqrt(M)."""
    S = torch.stack(sketches, dim=1).double() / math.sqrt(len(sketches))  # (D, M)
    return torch.linalg.eigvalsh(S.T @ S)  # (M,), ascending


def params_of(ranks: dict[str, int], modules: dict[str, ModuleInfo]) -> int:
    return sum(r * modules[name].params_per_rank() for name, r in ranks.items())


def allocate_proportional(
    scores: dict[str, float],
    modules: dict[str, ModuleInfo],
    r_min: int,
    r_max: int,
    budget: int,
    iterations: int = 60,
) -> dict[str, int]:
    """r_l = clip(round(r_min + c * s_l), r_min, r_max) with the largest c whose total fits ``budget``.

    P(r) is monotone in c, so a bisection on c is enough (sec. 3.3 "one-dimensional search").
    """

    def ranks_for(c: float) -> dict[str, int]:
        return {n: min(r_max, max(r_min, round(r_min + c * s))) for n, s in scores.items()}

    lo, hi = 0.0, float(r_max) / max(min((s for s in scores.values() if s > 0), default=1.0), 1e-12)
    if params_of(ranks_for(hi), modules) <= budget:
        return ranks_for(hi)  # everything at r_max fits
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if params_of(ranks_for(mid), modules) <= budget:
            lo = mid
        else:
            hi = mid
    return ranks_for(lo)


@dataclasses.dataclass
class GARDConfig:
    """Options of :class:`GARDPolicy` (paper 002; see docs/rank_policies.md)."""

    variant: str = field(default="dynamic", metadata={
        "help": "'static' allocates once, right after warmup steps; 'dynamic' re-allocates every interval "
                "steps after the warmup (sec. 3.4)."})
    alpha: float = field(default=0.9, metadata={
        "help": "Energy threshold of the effective rank, in (0, 1)."})
    window: int = field(default=16, metadata={
        "help": "M: the number of most recent sketched gradients in the Gram matrix."})
    sketch_dim: int = field(default=16, metadata={
        "help": "p: each update gradient dW (out x in) is sketched as P_out dW P_in (p x p)."})
    beta: float = field(default=0.7, metadata={"help": "EMA coefficient of the effective rank (dynamic variant)."})
    delta_max: int = field(default=2, metadata={
        "help": "Largest |change| of one module's rank per re-allocation (dynamic variant)."})
    warmup: int | None = field(default=None, metadata={
        "help": "Steps of gradient collection before the first allocation; None = window."})
    interval: int = field(default=10, metadata={"help": "tau: steps between re-allocations (dynamic variant)."})
    freeze_after: int | None = field(default=None, metadata={
        "help": "Stop re-allocating after this step ('early-dynamic'); None = never."})
    initial_rank: int | None = field(default=None, metadata={
        "help": "Uniform starting rank; None = the largest uniform rank that fits the budget, at most 8."})
    seed: int = field(default=0, metadata={"help": "Seed of the random projections."})

    def __post_init__(self):
        check(self.variant in ("static", "dynamic"), f"variant must be 'static' or 'dynamic', not {self.variant!r}")
        check(0 < self.alpha < 1, f"alpha must be in (0, 1), not {self.alpha}")
        check(0 <= self.beta <= 1, f"beta must be in [0, 1], not {self.beta}")
        for name in ("window", "sketch_dim", "delta_max", "interval"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, not {getattr(self, name)}")
        check(self.warmup is None or self.warmup >= 0, f"warmup must be None or >= 0, not {self.warmup}")
        check(self.freeze_after is None or self.freeze_after >= 0,
              f"freeze_after must be None or >= 0, not {self.freeze_after}")
        check(self.initial_rank is None or self.initial_rank >= 1,
              f"initial_rank must be None or >= 1, not {self.initial_rank}")


class GARDPolicy(RankPolicy):
    """Gradient-aware rank distribution; options in :class:`GARDConfig`.

    The budget is ``bounds.budget``; when it is None the policy keeps the current total
    parameter count and only moves rank between modules.

    Rank growth adds directions that the mechanism initialises near zero (``adapter_core.resize``),
    as the paper asks, so a re-allocation does not jump the function the model computes.
    """

    name = "gard"
    needs = frozenset({"grads"})

    def __init__(self, modules: dict[str, ModuleInfo], bounds: RankBounds, config: GARDConfig | None = None):
        config = config or GARDConfig()
        super().__init__(modules, bounds, config)
        self.variant = config.variant
        self.alpha = config.alpha
        self.window = config.window
        self.sketch_dim = config.sketch_dim
        self.beta = config.beta
        self.delta_max = config.delta_max
        self.warmup = config.window if config.warmup is None else config.warmup
        self.interval = config.interval
        self.freeze_after = config.freeze_after
        self.initial_rank = config.initial_rank
        self.seed = config.seed
        self._projections: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.sketches: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        self.r_eff_ema: dict[str, float] = {}
        self.allocated = False  # static variant: done once
        self.last_step = -1

    def initial_ranks(self, task: str | None = None) -> dict[str, int]:
        r = self.initial_rank
        if r is None:
            r = 8
            per_rank = sum(m.params_per_rank() for m in self.modules.values())
            if self.bounds.budget is not None and per_rank:
                r = min(r, self.bounds.budget // per_rank)
        r = min(self.bounds.r_max, max(self.bounds.r_min, r))
        return {n: r for n in self.modules}

    def _projection(self, info: ModuleInfo) -> tuple[torch.Tensor, torch.Tensor]:
        # Shared by modules of the same shape; Gaussian / sqrt(p) keeps inner products unbiased.
        key = (info.out_features, info.in_features)
        if key not in self._projections:
            g = torch.Generator().manual_seed(self.seed + 7919 * key[0] + key[1])
            p = self.sketch_dim
            p_out = torch.randn(p, key[0], generator=g) / math.sqrt(p)
            p_in = torch.randn(key[1], p, generator=g) / math.sqrt(p)
            self._projections[key] = (p_out, p_in)
        return self._projections[key]

    def sketch(self, name: str, A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor) -> torch.Tensor:
        """vec(P_out dW P_in) with dW = grad_B A + B grad_A, the first-order change of B A.

        Computed through the factors, never forming the (out x in) matrix.
        """
        p_out, p_in = self._projection(self.modules[name])
        A, B, gA, gB = (t.detach().float().cpu() for t in (A, B, gA, gB))
        small = (p_out @ gB) @ (A @ p_in) + (p_out @ B) @ (gA @ p_in)  # (p, p)
        return small.flatten()

    def observe(self, obs: StepObservation) -> None:
        if obs.grad_A is None or obs.grad_B is None:
            return
        self.last_step = obs.step
        for name in self.modules:
            if name not in obs.grad_A:
                continue
            g = self.sketch(name, obs.lora_A[name], obs.lora_B[name], obs.grad_A[name], obs.grad_B[name])
            buf = self.sketches[name]
            buf.append(g)
            del buf[: -self.window]  # keep the last M

    def current_effective_ranks(self) -> dict[str, int]:
        return {
            n: effective_rank(gram_eigenvalues(buf), self.alpha) for n, buf in self.sketches.items() if buf
        }

    def _due(self, step: int) -> bool:
        if step + 1 < self.warmup:
            return False
        if self.variant == "static":
            return not self.allocated
        if self.freeze_after is not None and step > self.freeze_after:
            return False
        return (step + 1 - self.warmup) % self.interval == 0

    def propose(self, obs: StepObservation) -> dict[str, int] | None:
        if not self._due(obs.step):
            return None
        r_eff = self.current_effective_ranks()
        if len(r_eff) < len(self.modules):
            return None  # some module saw no gradient yet
        for n, r in r_eff.items():  # EMA of the effective rank (sec. 3.4); static: plain value
            prev = self.r_eff_ema.get(n)
            self.r_eff_ema[n] = r if prev is None or self.variant == "static" else self.beta * prev + (1 - self.beta) * r
        total = sum(self.r_eff_ema.values())
        scores = {n: v / total for n, v in self.r_eff_ema.items()}  # s_l = r_eff_l / sum_j r_eff_j
        budget = self.bounds.budget if self.bounds.budget is not None else params_of(obs.ranks, self.modules)
        ranks = allocate_proportional(scores, self.modules, self.bounds.r_min, self.bounds.r_max, budget)
        if self.variant == "dynamic":
            # |r(t) - r(t - tau)| <= delta_max keeps structural changes small.
            ranks = {n: min(obs.ranks[n] + self.delta_max, max(obs.ranks[n] - self.delta_max, r)) for n, r in ranks.items()}
        self.allocated = True
        return ranks

    def state_dict(self) -> dict:
        return {
            "sketches": {n: [t.clone() for t in buf] for n, buf in self.sketches.items()},
            "r_eff_ema": dict(self.r_eff_ema),
            "allocated": self.allocated,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.sketches = {n: [t.clone() for t in state["sketches"].get(n, [])] for n in self.modules}
        self.r_eff_ema = dict(state["r_eff_ema"])
        self.allocated = state["allocated"]
        self.last_step = state["last_step"]


register_policy("gard", GARDConfig, GARDPolicy)
