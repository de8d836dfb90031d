"""AdaLoRA's schedule and importance as a rank policy of our mechanism (baseline only).

The faithful baseline is PEFT's own AdaLoRA, run through ``adapter_core.adalora``
(``make_adalora_model`` / ``adalora_train_step`` / ``adalora_to_lora``). This policy
emulates it on our plain LoRA layers so that it can share our train step and budget:

* budget schedule (PEFT ``RankAllocator.budget_schedule``): total rank ``init_r * n``
  until ``tinit``, cubic decay to ``target_r * n`` at ``total_step - tfinal``, fixed after;
* importance (``update_ipt``): per element I = |p * grad|, sensitivity EMA
  I_bar = b1 I_bar + (1-b1) I, uncertainty EMA U_bar = b2 U_bar + (1-b2) |I - I_bar|, score I_bar * U_bar;
* a direction k of a module scores mean_row(score(A_k,:)) + mean_col(score(B_:,k))
  (there is no E in plain LoRA); the ``budget`` best directions over all modules are kept,
  so a module's proposed rank = how many of its directions survive.

Differences from PEFT: pruning goes through our SVD resize (it keeps the module's top
singular directions, not necessarily the ones scored best here), and the element EMAs
of a module restart when its shape changes.
"""

from __future__ import annotations

import dataclasses
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


def budget_schedule(step: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int) -> int:
    """PEFT's cubic budget decay from ``init_bgt`` to ``target_bgt``."""
    if step <= tinit:
        return init_bgt
    if step > total_step - tfinal:
        return target_bgt
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt)


@dataclasses.dataclass
class AdaLoRAConfig:
    """Options of :class:`AdaLoRABaseline`, named as in PEFT's ``AdaLoraConfig``."""

    total_step: int | None = field(default=None, metadata={
        "help": "Required: total training steps; the budget reaches target_r at total_step - tfinal."})
    init_r: int = field(default=12, metadata={"help": "Initial rank of every module (budget init_r * modules)."})
    target_r: int = field(default=8, metadata={"help": "Target average rank (final budget target_r * modules)."})
    tinit: int = field(default=0, metadata={"help": "Steps of initial fine-tuning before the budget decays."})
    tfinal: int = field(default=0, metadata={"help": "Steps of final fine-tuning at the target budget."})
    deltaT: int = field(default=1, metadata={"help": "Steps between two budget allocations."})
    beta1: float = field(default=0.85, metadata={"help": "EMA coefficient of the sensitivity, in [0, 1]."})
    beta2: float = field(default=0.85, metadata={"help": "EMA coefficient of the uncertainty, in [0, 1]."})

    def __post_init__(self):
        check(bool(self.total_step) and self.total_step > 0, "adalora needs total_step > 0 (as PEFT's AdaLoraConfig)")
        check(self.init_r >= 1 and self.target_r >= 1, "init_r and target_r must be >= 1")
        check(self.tinit >= 0 and self.tfinal >= 0, "tinit and tfinal must be >= 0")
        check(self.tinit < self.total_step - self.tfinal, "tinit, tfinal and total_step leave no budgeting phase")
        check(self.deltaT >= 1, f"deltaT must be >= 1, not {self.deltaT}")
        check(0 <= self.beta1 <= 1 and 0 <= self.beta2 <= 1, "beta1 and beta2 must be in [0, 1]")


class AdaLoRABaseline(RankPolicy):
    """AdaLoRA emulation (see module docstring); options in :class:`AdaLoRAConfig`."""

    name = "adalora"
    needs = frozenset({"grads"})

    def __init__(self, modules: dict[str, ModuleInfo], bounds: RankBounds, config: AdaLoRAConfig | None = None):
        config = config or AdaLoRAConfig()
        super().__init__(modules, bounds, config)
        self.total_step, self.init_r, self.target_r = config.total_step, config.init_r, config.target_r
        self.tinit, self.tfinal, self.deltaT = config.tinit, config.tfinal, config.deltaT
        self.beta1, self.beta2 = config.beta1, config.beta2
        self.init_bgt = self.init_r * len(modules)
        self.target_bgt = self.target_r * len(modules)
        # Per module and factor ("A"/"B"): sensitivity and uncertainty EMAs, same shape as the factor.
        self.sens: dict[tuple[str, str], torch.Tensor] = {}
        self.unc: dict[tuple[str, str], torch.Tensor] = {}

    def initial_ranks(self, task: str | None = None) -> dict[str, int]:
        r = min(self.bounds.r_max, max(self.bounds.r_min, self.init_r))
        return {n: r for n in self.modules}

    def observe(self, obs: StepObservation) -> None:
        if obs.grad_A is None or obs.grad_B is None or obs.step >= self.total_step - self.tfinal:
            return  # PEFT stops updating scores once the final budget is reached
        for n in self.modules:
            for kind, p, g in (("A", obs.lora_A[n], obs.grad_A[n]), ("B", obs.lora_B[n], obs.grad_B[n])):
                ipt = (p.detach().float() * g.detach().float()).abs().cpu()
                key = (n, kind)
                if key not in self.sens or self.sens[key].shape != ipt.shape:
                    self.sens[key] = torch.zeros_like(ipt)
                    self.unc[key] = torch.zeros_like(ipt)
                self.sens[key] = self.beta1 * self.sens[key] + (1 - self.beta1) * ipt
                self.unc[key] = self.beta2 * self.unc[key] + (1 - self.beta2) * (ipt - self.sens[key]).abs()

    def direction_scores(self, name: str) -> torch.Tensor:
        """Score per rank direction: mean over A's row + mean over B's column of I_bar * U_bar."""
        score_A = (self.sens[(name, "A")] * self.unc[(name, "A")]).mean(dim=1)  # (r,)
        score_B = (self.sens[(name, "B")] * self.unc[(name, "B")]).mean(dim=0)  # (r,)
        return score_A + score_B

    def propose(self, obs: StepObservation) -> dict[str, int] | None:
        step = obs.step
        if step <= self.tinit or step > self.total_step - self.tfinal:
            return None
        if step % self.deltaT and step != self.total_step - self.tfinal:
            return None
        if any((n, "A") not in self.sens for n in self.modules):
            return None
        budget = budget_schedule(step, self.init_bgt, self.target_bgt, self.tinit, self.tfinal, self.total_step)
        names = list(self.modules)
        scores = [self.direction_scores(n) for n in names]
        flat = torch.cat(scores)
        if budget >= flat.numel():
            return None
        # Keep the `budget` highest-scoring directions across all modules (PEFT masks by a kth-value threshold).
        threshold = torch.kthvalue(flat, flat.numel() - budget).values
        ranks = {}
        for n, s in zip(names, scores):
            ranks[n] = min(self.bounds.r_max, max(self.bounds.r_min, int((s > threshold).sum())))
        return ranks

    def state_dict(self) -> dict:
        return {
            "sens": {f"{n}|{k}": v.clone() for (n, k), v in self.sens.items()},
            "unc": {f"{n}|{k}": v.clone() for (n, k), v in self.unc.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        def unpack(d):
            return {tuple(key.rsplit("|", 1)): v.clone() for key, v in d.items()}

        self.sens, self.unc = unpack(state["sens"]), unpack(state["unc"])


register_policy("adalora", AdaLoRAConfig, AdaLoRABaseline)
