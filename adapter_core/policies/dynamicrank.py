"""DynamicRank LoRA (paper 000, eqs. 6-12, sec. 4.4).

Per step, for every module m:

* eq. 8  - the share of token importance carried by *important* tokens (importance above
  a threshold tau, lowered for keywords and identifiers) grows a continuous base rank,
  scaled by the module's share of the LoRA gradient norm;
* shrink - a module whose gradient share stays low (EMA with hysteresis) loses rank,
  so the budget can move to where it is needed;
* eq. 9  - every ``hessian_every`` steps the ratio gradient norm / |Hutchinson trace| of
  the module, relative to its own running average, multiplies the base rank
  (steep -> more rank, flat -> less);
* eqs. 11-12 (optional) - a tiny MLP reads the same signals and samples a rank change
  in {-delta, 0, +delta} with Gumbel-softmax; it learns from the loss improvement.

Token importance itself (eqs. 6-7: attention a token receives plus lambda times its
input-gradient norm) is computed by the train step and arrives in
``obs.token_importance``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import field

import torch
import torch.nn.functional as F

from adapter_core.policies.base import (
    ModuleInfo,
    RankBounds,
    RankPolicy,
    StepObservation,
    check,
)
from adapter_core.policies.registry import register_policy

# Sec. 4.4: bug fixing starts higher than modification, which starts higher than completion.
DEFAULT_TASK_RANKS = {"bug_fix": 16, "modification": 12, "new_code": 8, "completion": 8}


def default_code_classes() -> frozenset[int]:
    """Class ids of keywords and identifiers from ``code_signals``, or empty if it is not importable."""
    try:
        from code_signals.classes import TokenClass, is_keyword_or_identifier
    except ImportError:
        return frozenset()
    return frozenset(int(c) for c in TokenClass if is_keyword_or_identifier(c))


def important_mass(
    importance: torch.Tensor,
    classes: torch.Tensor | None,
    mask: torch.Tensor | None,
    tau: float,
    code_tau: float,
    code_classes: frozenset[int],
    normalize: bool = True,
) -> tuple[float, float]:
    """Eq. 8's sum over H = {i : s_i > tau_i}, divided by the number of target tokens.

    Returns (S, mean raw importance). tau_i is ``code_tau`` for keyword/identifier tokens
    and ``tau`` otherwise (sec. 4.4). With ``normalize`` the scores are divided by their
    mean first, so tau is relative ("above average") and S lies in [0, 1].
    Dividing by the token count (not in the printed eq. 8) keeps the growth independent
    of batch size and sequence length.
    """
    s = importance.detach().float().flatten()
    keep = torch.isfinite(s)
    if mask is not None:
        keep &= mask.detach().flatten() > 0
    if classes is not None:
        cls = classes.detach().flatten()[keep]
    s = s[keep]
    if s.numel() == 0:
        return 0.0, 0.0
    raw_mean = float(s.mean())
    if normalize and raw_mean > 0:
        s = s / raw_mean
    threshold = torch.full_like(s, tau)
    if classes is not None and code_classes:
        is_code = torch.isin(cls.long(), torch.tensor(sorted(code_classes), dtype=torch.long, device=cls.device))
        threshold[is_code] = code_tau
    return float(s[s > threshold].sum()) / s.numel(), raw_mean


def landscape_ratio(grad_norm: float, trace: float, eps: float = 1e-8) -> float:
    """Eq. 9's ||grad|| / (tr(H) + eps). The Hutchinson estimate can be negative, so |tr|."""
    return grad_norm / (abs(trace) + eps)


def landscape_multiplier(ratio: float, ratio_avg: float, eta: float, cap: float) -> float:
    """Eq. 9's factor (1 + eta * ratio), with the ratio taken relative to its running average.

    As printed the factor is always >= 1 and, applied every step, compounds without limit;
    the paper's intent is "more rank when steep, less when flat". Centering on the module's
    own average (ratio/avg - 1) gives both directions; ``cap`` bounds it to [1-cap, 1+cap].
    """
    if ratio_avg <= 0:
        return 1.0
    return min(1 + cap, max(1 - cap, 1 + eta * (ratio / ratio_avg - 1)))


class RankController(torch.nn.Module):
    """Eqs. 11-12: MLP([features]) -> logits over rank changes {-delta, 0, +delta}."""

    FEATURES = 6  # log1p grad norm, log1p |tr H|, log1p mean importance, S, grad share, rank / r_max

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(self.FEATURES, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclasses.dataclass
class DynamicRankConfig:
    """Options of :class:`DynamicRankPolicy` (paper 000; see docs/rank_policies.md)."""

    tau: float = field(default=1.0, metadata={
        "help": "Importance threshold of eq. 8 (relative to the mean score when normalize_importance)."})
    code_tau_scale: float = field(default=0.5, metadata={
        "help": "Keyword/identifier tokens use the threshold tau * code_tau_scale (sec. 4.4)."})
    keyword_classes: set[int] | None = field(default=None, metadata={
        "help": "Token class ids (code_signals.TokenClass ints) with the lowered threshold; "
                "None with identifier_classes None: code_signals.is_keyword_or_identifier."})
    identifier_classes: set[int] | None = field(default=None, metadata={
        "help": "More token class ids with the lowered threshold (joined with keyword_classes)."})
    lam: float = field(default=1.0, metadata={
        "help": "Lambda of eq. 8: ranks grown per step when all importance is above the threshold."})
    normalize_importance: bool = field(default=True, metadata={
        "help": "Divide token scores by their mean before thresholding (so tau means 'above average')."})
    eta: float = field(default=0.5, metadata={"help": "Adaptation rate of the eq. 9 loss-landscape factor."})
    eta_cap: float = field(default=0.5, metadata={
        "help": "Bound of the eq. 9 factor: it stays in [1 - eta_cap, 1 + eta_cap]."})
    hessian_every: int = field(default=10, metadata={
        "help": "k: the train step estimates the Hessian trace every k steps."})
    ema: float = field(default=0.9, metadata={
        "help": "EMA coefficient of the module importance and of the eq. 9 ratio."})
    shrink_below: float = field(default=0.5, metadata={
        "help": "A module starts losing rank when the EMA of its gradient share (1 = average) falls below this."})
    shrink_stop: float = field(default=0.8, metadata={
        "help": "A shrinking module stops losing rank once that EMA is back above this (hysteresis)."})
    shrink_rate: float = field(default=0.25, metadata={"help": "Rank lost per step while a module shrinks."})
    controller: str | None = field(default=None, metadata={
        "help": "None or 'gumbel': the eqs. 11-12 MLP controller that samples rank changes."})
    controller_delta: int = field(default=1, metadata={
        "help": "Size of one controller rank change (actions -delta, 0, +delta)."})
    controller_lr: float = field(default=1e-2, metadata={"help": "Adam learning rate of the controller."})
    gumbel_tau: float = field(default=1.0, metadata={"help": "Gumbel-softmax temperature of the controller."})
    seed: int = field(default=0, metadata={"help": "Seed of the controller's weights and samples."})
    task_ranks: dict[str, int] | None = field(default=None, metadata={
        "help": "Initial rank per task, merged over bug_fix 16, modification 12, new_code/completion 8."})
    default_rank: int = field(default=8, metadata={"help": "Initial rank when the task is unknown or None."})
    use_token_importance: bool = field(default=True, metadata={
        "help": "Ablation switch: False turns off eq. 8 growth (token importance is not requested)."})
    use_loss_landscape: bool = field(default=True, metadata={
        "help": "Ablation switch: False turns off eq. 9 (the Hessian trace is not requested)."})
    use_controller: bool | None = field(default=None, metadata={
        "help": "Ablation switch overriding controller: True = 'gumbel', False = none, None = use controller."})

    def __post_init__(self):
        if self.use_controller is not None:
            self.controller = (self.controller or "gumbel") if self.use_controller else None
        check(self.controller in (None, "gumbel"), f"controller must be None or 'gumbel', not {self.controller!r}")
        for name in ("tau", "code_tau_scale", "lam", "eta", "shrink_below", "shrink_stop", "shrink_rate"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, not {getattr(self, name)}")
        check(0 <= self.eta_cap <= 1, f"eta_cap must be in [0, 1], not {self.eta_cap}")
        check(0 <= self.ema <= 1, f"ema must be in [0, 1], not {self.ema}")
        check(self.shrink_below <= self.shrink_stop,
              f"shrink_below ({self.shrink_below}) must not exceed shrink_stop ({self.shrink_stop})")
        check(self.hessian_every >= 1, f"hessian_every must be >= 1, not {self.hessian_every}")
        check(self.controller_delta >= 1, f"controller_delta must be >= 1, not {self.controller_delta}")
        check(self.controller_lr > 0, f"controller_lr must be > 0, not {self.controller_lr}")
        check(self.gumbel_tau > 0, f"gumbel_tau must be > 0, not {self.gumbel_tau}")
        check(self.default_rank >= 1, f"default_rank must be >= 1, not {self.default_rank}")
        for task, r in (self.task_ranks or {}).items():
            check(r >= 1, f"task_ranks[{task!r}] must be >= 1, not {r}")


class DynamicRankPolicy(RankPolicy):
    """DynamicRank LoRA rank policy; options in :class:`DynamicRankConfig`.

    Eq. 8 grows ranks with the importance of important tokens, a hysteresis shrink frees
    rank of weak modules, eq. 9 scales by the loss landscape, and eqs. 11-12 optionally
    add a Gumbel-softmax controller.
    """

    name = "dynamicrank"
    needs = frozenset({"token_importance", "grads", "hessian_trace"})

    def __init__(self, modules: dict[str, ModuleInfo], bounds: RankBounds, config: DynamicRankConfig | None = None):
        c = config or DynamicRankConfig()
        super().__init__(modules, bounds, c)
        self.tau, self.code_tau = c.tau, c.tau * c.code_tau_scale
        if c.keyword_classes is None and c.identifier_classes is None:
            self.code_classes = default_code_classes()
        else:
            self.code_classes = frozenset(c.keyword_classes or ()) | frozenset(c.identifier_classes or ())
        self.lam, self.normalize = c.lam, c.normalize_importance
        self.eta, self.eta_cap, self.hessian_every, self.ema = c.eta, c.eta_cap, c.hessian_every, c.ema
        self.shrink_below, self.shrink_stop, self.shrink_rate = c.shrink_below, c.shrink_stop, c.shrink_rate
        self.task_ranks = {**DEFAULT_TASK_RANKS, **(c.task_ranks or {})}
        self.default_rank = c.default_rank
        self.use_token_importance, self.use_loss_landscape = c.use_token_importance, c.use_loss_landscape
        # Per instance: switched-off signals are not requested from the train step.
        needs = {"grads"}
        if c.use_token_importance:
            needs.add("token_importance")
        if c.use_loss_landscape:
            needs.add("hessian_trace")
        self.needs = frozenset(needs)  # type: ignore[misc]

        self.base: dict[str, float] = {}  # continuous rank before the eq. 9 factor
        self.multiplier = {n: 1.0 for n in modules}
        self.importance_ema: dict[str, float] = {}
        self.ratio_ema: dict[str, float] = {}
        self.shrinking = {n: False for n in modules}
        self.last_proposal: dict[str, int] = {}
        self.last_trace: dict[str, float] = {n: 0.0 for n in modules}
        self.signal = 0.0  # S of the latest step
        self.mean_importance = 0.0

        self.controller = None
        if c.controller == "gumbel":
            self.controller_delta, self.gumbel_tau, self.seed = c.controller_delta, c.gumbel_tau, c.seed
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(c.seed)
                self.controller = RankController()
            self.controller_opt = torch.optim.Adam(self.controller.parameters(), lr=c.controller_lr)
            self.reward_baseline = 0.0
            self.pending: tuple[torch.Tensor, torch.Tensor, float] | None = None  # features, actions, loss

    # -- initial rank -----------------------------------------------------------------------
    def initial_ranks(self, task: str | None = None) -> dict[str, int]:
        r = self.task_ranks.get(task, self.default_rank) if task else self.default_rank
        per_rank = sum(m.params_per_rank() for m in self.modules.values())
        if self.bounds.budget is not None and per_rank:
            r = min(r, self.bounds.budget // per_rank)  # uniform start that fits the budget
        r = min(self.bounds.r_max, max(self.bounds.r_min, r))
        return {n: r for n in self.modules}

    def hessian_due(self, step: int) -> bool:
        return self.use_loss_landscape and step % self.hessian_every == 0

    # -- per step ---------------------------------------------------------------------------
    def _grad_norms(self, obs: StepObservation) -> dict[str, float]:
        if obs.grad_A is None or obs.grad_B is None:
            return {n: 1.0 for n in self.modules}
        return {
            n: math.sqrt(float(obs.grad_A[n].float().norm()) ** 2 + float(obs.grad_B[n].float().norm()) ** 2)
            for n in self.modules
        }

    def observe(self, obs: StepObservation) -> None:
        for n in self.modules:
            actual = obs.ranks[n]
            if n not in self.base:
                self.base[n] = float(actual)
            elif self.last_proposal.get(n, actual) != actual:
                # The mechanism clipped our proposal (bounds/budget): follow what it applied.
                self.base[n] = actual / self.multiplier[n]

        if self.controller is not None:
            self._train_controller(obs.loss)

        # Eq. 8 signal: importance mass of the important tokens.
        self.signal, self.mean_importance = 0.0, 0.0
        if self.use_token_importance and obs.token_importance is not None:
            self.signal, self.mean_importance = important_mass(
                obs.token_importance, obs.token_classes, obs.loss_weights,
                self.tau, self.code_tau, self.code_classes, self.normalize,
            )

        g = self._grad_norms(obs)
        mean_g = sum(g.values()) / len(g) or 1.0
        self.share = {n: g[n] / mean_g for n in self.modules}  # 1 = an average module

        for n in self.modules:
            # Eq. 8 per module: r' = r + lambda * S, scaled by the module's gradient share taken
            # relative to the average module (share - 1). As printed the term is never negative and
            # ranks only drift up; centred, rank moves from weak modules to strong ones.
            self.base[n] += self.lam * self.signal * (self.share[n] - 1)

            # Shrink modules whose importance stays low; hysteresis avoids flapping.
            prev = self.importance_ema.get(n, 1.0)
            self.importance_ema[n] = self.ema * prev + (1 - self.ema) * self.share[n]
            if self.importance_ema[n] < self.shrink_below:
                self.shrinking[n] = True
            elif self.importance_ema[n] > self.shrink_stop:
                self.shrinking[n] = False
            if self.shrinking[n]:
                self.base[n] -= self.shrink_rate
            self.base[n] = min(self.bounds.r_max, max(self.bounds.r_min, self.base[n]))

        # Eq. 9 only on steps where the train step measured the Hessian trace.
        if self.use_loss_landscape and obs.hessian_trace:
            for n, trace in obs.hessian_trace.items():
                if n not in self.modules:
                    continue
                self.last_trace[n] = trace
                ratio = landscape_ratio(g[n], trace)
                avg = self.ratio_ema.get(n, ratio)
                self.multiplier[n] = landscape_multiplier(ratio, avg, self.eta, self.eta_cap)
                self.ratio_ema[n] = self.ema * avg + (1 - self.ema) * ratio

    def propose(self, obs: StepObservation) -> dict[str, int] | None:
        if not self.base:
            return None
        if self.controller is not None:
            self._controller_step(obs)
        # floor as in eqs. 8-9; the tiny epsilon absorbs float error of base = rank / multiplier.
        ranks = {
            n: min(self.bounds.r_max, max(self.bounds.r_min, math.floor(self.base[n] * self.multiplier[n] + 1e-6)))
            for n in self.modules
        }
        ranks = self._fit_budget(ranks)
        self.last_proposal = ranks
        return ranks

    def _fit_budget(self, ranks: dict[str, int]) -> dict[str, int]:
        """Over the parameter budget, the least important modules (lowest gradient-share EMA) give
        up rank one at a time until the important ones' growth fits: reallocation, not a cap on all."""
        budget = self.bounds.budget
        if budget is None:
            return ranks
        used = sum(r * self.modules[n].params_per_rank() for n, r in ranks.items())
        by_importance = sorted(self.modules, key=lambda n: self.importance_ema.get(n, 1.0))
        while used > budget:
            donor = next((n for n in by_importance if ranks[n] > self.bounds.r_min), None)
            if donor is None:
                break  # everything at r_min: the mechanism reports the impossible budget
            ranks[donor] -= 1
            used -= self.modules[donor].params_per_rank()
            self.base[donor] = min(self.base[donor], ranks[donor] / self.multiplier[donor])
        return ranks

    # -- controller (eqs. 11-12) ------------------------------------------------------------
    def _features(self) -> torch.Tensor:
        rows = []
        for n in self.modules:
            g = self.share[n]
            rows.append([
                math.log1p(g), math.log1p(abs(self.last_trace[n])), math.log1p(max(self.mean_importance, 0.0)),
                self.signal, self.importance_ema[n], self.base[n] / self.bounds.r_max,
            ])
        return torch.tensor(rows, dtype=torch.float32)

    def _controller_step(self, obs: StepObservation) -> None:
        """Sample one change per module with hard Gumbel-softmax and apply it to the base rank."""
        x = self._features()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + obs.step)  # reproducible, leaves the global RNG alone
            onehot = F.gumbel_softmax(self.controller(x), tau=self.gumbel_tau, hard=True)
        actions = onehot.argmax(dim=1)  # 0, 1, 2 -> -delta, 0, +delta
        for n, a in zip(self.modules, actions.tolist()):
            self.base[n] = min(self.bounds.r_max, max(self.bounds.r_min, self.base[n] + (a - 1) * self.controller_delta))
        self.pending = (x, actions, obs.loss)

    def _train_controller(self, loss: float) -> None:
        """REINFORCE on the loss improvement since the sampled change, against a running baseline.

        Hard Gumbel samples are draws from softmax(logits), so log softmax(logits)[action] is the
        score-function term.
        """
        if self.pending is None:
            return
        x, actions, prev_loss = self.pending
        reward = prev_loss - loss
        advantage = reward - self.reward_baseline
        self.reward_baseline = 0.9 * self.reward_baseline + 0.1 * reward
        logp = F.log_softmax(self.controller(x), dim=1).gather(1, actions[:, None]).sum()
        self.controller_opt.zero_grad()
        (-advantage * logp).backward()
        self.controller_opt.step()
        self.pending = None

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "base": dict(self.base),
            "multiplier": dict(self.multiplier),
            "importance_ema": dict(self.importance_ema),
            "ratio_ema": dict(self.ratio_ema),
            "shrinking": dict(self.shrinking),
            "last_proposal": dict(self.last_proposal),
            "last_trace": dict(self.last_trace),
        }
        if self.controller is not None:
            state["controller"] = {k: v.clone() for k, v in self.controller.state_dict().items()}
            # deepcopy: the optimizer's moments are updated in place by later steps
            state["controller_opt"] = copy.deepcopy(self.controller_opt.state_dict())
            state["reward_baseline"] = self.reward_baseline
            state["pending"] = self.pending  # the sample still waiting for its reward
        return state

    def load_state_dict(self, state: dict) -> None:
        for key in ("base", "multiplier", "importance_ema", "ratio_ema", "shrinking", "last_proposal", "last_trace"):
            setattr(self, key, dict(state[key]))
        if self.controller is not None and "controller" in state:
            self.controller.load_state_dict(state["controller"])
            self.controller_opt.load_state_dict(state["controller_opt"])
            self.reward_baseline = state["reward_baseline"]
            self.pending = state.get("pending")


register_policy("dynamicrank", DynamicRankConfig, DynamicRankPolicy)
