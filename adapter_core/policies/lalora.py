"""La-LoRA: layer-wise adaptive rank (paper 001, Algorithm 1, eqs. 5-10).

Two parts:

* DCDPB (eqs. 5-7): the total allocatable rank starts at one per layer and grows
  with the mean relative growth of the layers' factor norms.
* TNW-DRA (eqs. 8-10): that total is split over layers by a softmax of each
  layer's contribution, the Frobenius norm of its active factors corrected by
  their fidelity to the untruncated factors.

Our mechanism stores factors at their current rank (it resizes by SVD, it does not
mask rows as the paper does). So the "untruncated" factor of eq. 10 is rebuilt from
memory: when a module shrinks we remember the energy of the directions it dropped
(their singular values of B A, which the balanced SVD split gives to each factor)
and count it in the reference norm until the module grows back.
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


def layer_value(norms_B: list[float], norms_A: list[float], rank: int) -> float:
    """Eq. 7: s_i = (1/r_i) * sum over the layer's modules of (||B||_F + ||A||_F)."""
    return (sum(norms_B) + sum(norms_A)) / max(rank, 1)


def growth_rate(s_now: float, s_prev: float) -> float:
    """Eq. 6: IR_i = (s_i^t - s_i^{t-1}) / s_i^{t-1}."""
    return (s_now - s_prev) / s_prev if s_prev > 0 else 0.0


def next_budget(prev: float, rates: list[float], gamma: float, lo: float, hi: float) -> float:
    """Eq. 5: DCDPB^t = DCDPB^{t-1} (1 + gamma * mean(IR)), kept in [L, r L]."""
    mean_rate = sum(rates) / len(rates) if rates else 0.0
    return min(hi, max(lo, prev * (1 + gamma * mean_rate)))


def fidelity(norm_kept: float, lost_energy: float) -> float:
    """Eq. 10: ||W_trunc||_F / ||W_full||_F, with ||W_full||^2 = ||W_trunc||^2 + dropped energy."""
    full = math.sqrt(norm_kept**2 + lost_energy)
    return norm_kept / full if full > 0 else 1.0


def split_budget(contributions: list[float], total: float, temperature: float = 1.0) -> list[float]:
    """Eq. 8: [r_1 .. r_L] = softmax(c) * DCDPB (real-valued)."""
    w = torch.softmax(torch.tensor(contributions, dtype=torch.float64) / temperature, 0)
    return (w * total).tolist()


def factor_singular_values(A: torch.Tensor, B: torch.Tensor) -> list[float]:
    """Singular values of B A (r of them) from two thin QRs, never forming the out x in product."""
    if A.numel() == 0:
        return []
    _, R_B = torch.linalg.qr(B)  # B = Q_B R_B
    _, R_A = torch.linalg.qr(A.T)  # A^T = Q_A R_A, so B A = Q_B (R_B R_A^T) Q_A^T
    return torch.linalg.svdvals(R_B @ R_A.T).tolist()


def round_to_total(values: list[float], total: int) -> list[int]:
    """Integers that sum to ``total``: floors, then the largest remainders get +1."""
    floors = [math.floor(v) for v in values]
    order = sorted(range(len(values)), key=lambda i: values[i] - floors[i], reverse=True)
    for i in order[: max(0, total - sum(floors))]:
        floors[i] += 1
    return floors


@dataclasses.dataclass
class LaLoRAConfig:
    """Options of :class:`LaLoRAPolicy` (paper 001; see docs/rank_policies.md)."""

    gamma: float = field(default=1.0, metadata={
        "help": "Amplification factor of the budget growth (eq. 5)."})
    temperature: float = field(default=1.0, metadata={
        "help": "Softmax temperature of eq. 8 (1.0 = paper). The contributions are Frobenius norms, "
                "so their scale sets how peaked the split is."})
    per_layer: bool = field(default=True, metadata={
        "help": "True (paper): the modules of one transformer block share one rank; False: each module is a unit."})
    initial_rank: int = field(default=1, metadata={
        "help": "Starting rank of every unit (the paper starts at 1)."})
    cross_fidelity: bool = field(default=False, metadata={
        "help": "False: each factor's norm is weighted by its own fidelity (the paper's prose); "
                "True: eq. 9 as printed (f_dw * ||W_up|| + f_up * ||W_dw||)."})

    def __post_init__(self):
        check(self.gamma >= 0, f"gamma must be >= 0, not {self.gamma}")
        check(self.temperature > 0, f"temperature must be > 0, not {self.temperature}")
        check(self.initial_rank >= 1, f"initial_rank must be >= 1, not {self.initial_rank}")


class LaLoRAPolicy(RankPolicy):
    """La-LoRA rank policy; options in :class:`LaLoRAConfig`.

    The total allocatable rank (DCDPB) is counted in ranks of units, in [L, r_max L].
    The mechanism still clips to the parameter budget.

    Only the factors are read (they are in every observation), so ``needs`` is empty.
    """

    name = "lalora"
    needs = frozenset()

    def __init__(self, modules: dict[str, ModuleInfo], bounds: RankBounds, config: LaLoRAConfig | None = None):
        config = config or LaLoRAConfig()
        super().__init__(modules, bounds, config)
        self.gamma = config.gamma
        self.temperature = config.temperature
        self.initial_rank = config.initial_rank
        self.cross_fidelity = config.cross_fidelity
        # Units: transformer blocks (paper) or single modules; layer_index -1 = own unit.
        self.units: dict[str, list[str]] = {}
        for name, info in modules.items():
            key = f"layer{info.layer_index}" if config.per_layer and info.layer_index >= 0 else name
            self.units.setdefault(key, []).append(name)
        n_units = len(self.units)
        self.budget = float(n_units * max(bounds.r_min, self.initial_rank))  # DCDPB^0 = 1 L
        self.prev_value: dict[str, float] = {}
        self.prev_rank: dict[str, int] = {}
        # Per module: energies of dropped directions, last dropped on top (it comes back first).
        self.dropped: dict[str, list[float]] = {n: [] for n in modules}
        self.prev_sigma: dict[str, list[float]] = {}
        self.contributions: dict[str, float] = {}

    def initial_ranks(self, task: str | None = None) -> dict[str, int]:
        r = min(self.bounds.r_max, max(self.bounds.r_min, self.initial_rank))
        return {n: r for n in self.modules}

    def _track_truncation(self, name: str, rank: int) -> None:
        """Update the dropped-direction stack from the rank change since the last step."""
        before = self.prev_rank.get(name)
        if before is None or rank == before:
            return
        stack = self.dropped[name]
        if rank < before:
            sigma = self.prev_sigma.get(name, [])
            # The mechanism keeps the top singular directions: rank..before-1 were dropped.
            # Pushed from the smallest up so the strongest dropped one is on top.
            stack.extend(reversed(sigma[rank:before]))
        else:
            del stack[max(0, len(stack) - (rank - before)) :]

    def observe(self, obs: StepObservation) -> None:
        rates = []
        for unit, names in self.units.items():
            ranks = [obs.ranks[n] for n in names]
            norms_A = [float(obs.lora_A[n].norm()) for n in names]
            norms_B = [float(obs.lora_B[n].norm()) for n in names]
            value = layer_value(norms_B, norms_A, max(ranks))
            # A rank change moves s_i by itself (eq. 7 divides by r); count growth only at equal rank.
            if self.prev_rank and all(self.prev_rank.get(n) == obs.ranks[n] for n in names):
                rates.append(growth_rate(value, self.prev_value[unit]))
            else:
                rates.append(0.0)
            self.prev_value[unit] = value

            contribution = 0.0
            for n, nA, nB in zip(names, norms_A, norms_B):
                self._track_truncation(n, obs.ranks[n])
                lost = sum(self.dropped[n])  # the balanced split gives each factor sigma per direction
                f_dw, f_up = fidelity(nA, lost), fidelity(nB, lost)
                # Eq. 9 (see class docstring for the cross_fidelity choice).
                contribution += f_dw * nB + f_up * nA if self.cross_fidelity else f_dw * nA + f_up * nB
            self.contributions[unit] = contribution

        L = len(self.units)
        lo, hi = L * max(1, self.bounds.r_min), L * self.bounds.r_max
        self.budget = next_budget(self.budget, rates, self.gamma, lo, hi)

        for n in self.modules:
            A, B = obs.lora_A[n].detach().float().cpu(), obs.lora_B[n].detach().float().cpu()
            self.prev_sigma[n] = factor_singular_values(A, B)
            self.prev_rank[n] = obs.ranks[n]

    def propose(self, obs: StepObservation) -> dict[str, int] | None:
        if not self.contributions:
            return None
        units = list(self.units)
        shares = split_budget([self.contributions[u] for u in units], self.budget, self.temperature)
        unit_ranks = round_to_total(shares, int(self.budget))
        ranks = {}
        for unit, r in zip(units, unit_ranks):
            r = min(self.bounds.r_max, max(self.bounds.r_min, r))
            for n in self.units[unit]:
                ranks[n] = r
        return ranks

    def state_dict(self) -> dict:
        return {
            "budget": self.budget,
            "prev_value": dict(self.prev_value),
            "prev_rank": dict(self.prev_rank),
            "dropped": {n: list(v) for n, v in self.dropped.items()},
            "prev_sigma": {n: list(v) for n, v in self.prev_sigma.items()},
            "contributions": dict(self.contributions),
        }

    def load_state_dict(self, state: dict) -> None:
        self.budget = state["budget"]
        self.prev_value = dict(state["prev_value"])
        self.prev_rank = dict(state["prev_rank"])
        self.dropped = {n: list(state["dropped"].get(n, [])) for n in self.modules}
        self.prev_sigma = {n: list(v) for n, v in state["prev_sigma"].items()}
        self.contributions = dict(state["contributions"])


register_policy("lalora", LaLoRAConfig, LaLoRAPolicy)
