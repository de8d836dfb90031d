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
import math

import torch
import torch.nn.functional as F

from adapter_core.policies import register_policy
from adapter_core.policies.base import ModuleInfo, RankBounds, RankPolicy, StepObservation

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
        is_code = torch.isin(cls.long(), torch.tensor(sorted(code_classes), dtype=torch.long))
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


@register_policy
class DynamicRankPolicy(RankPolicy):
    """DynamicRank LoRA rank policy.

    Args:
        tau: importance threshold (relative to the mean when ``normalize_importance``).
        code_tau_scale: keyword/identifier tokens use ``tau * code_tau_scale`` (sec. 4.4).
        keyword_classes, identifier_classes: token class ids (``code_signals.TokenClass`` ints)
            that get the lowered threshold; default: ``code_signals.is_keyword_or_identifier``.
        lam: lambda of eq. 8, ranks grown per step when all importance is above threshold.
        normalize_importance: divide token scores by their mean before thresholding.
        eta, eta_cap: adaptation rate of eq. 9 and the bound of its factor.
        hessian_every: k, the train step estimates tr(H) every k steps.
        ema: EMA coefficient of the module importance and of the eq. 9 ratio.
        shrink_below, shrink_stop: hysteresis of the shrink: a module starts losing rank when
            the EMA of its gradient share (1 = average module) falls below ``shrink_below`` and
            stops once it is back above ``shrink_stop``.
        shrink_rate: rank lost per step while shrinking.
        controller: None or "gumbel" (eqs. 11-12); ``use_controller=True`` means "gumbel".
        controller_delta, controller_lr, gumbel_tau, seed: controller settings.
        task_ranks: initial rank per task; unknown/None task gets ``default_rank``.
        use_token_importance, use_loss_landscape, use_controller: ablation switches.
    """

    name = "dynamicrank"
    needs = frozenset({"token_importance", "grads", "hessian_trace"})

    def __init__(
        self,
        modules: dict[str, ModuleInfo],
        bounds: RankBounds,
        tau: float = 1.0,
        code_tau_scale: float = 0.5,
        keyword_classes: set[int] | None = None,
        identifier_classes: set[int] | None = None,
        lam: float = 1.0,
        normalize_importance: bool = True,
        eta: float = 0.5,
        eta_cap: float = 0.5,
        hessian_every: int = 10,
        ema: float = 0.9,
        shrink_below: float = 0.5,
        shrink_stop: float = 0.8,
        shrink_rate: float = 0.25,
        controller: str | None = None,
        controller_delta: int = 1,
        controller_lr: float = 1e-2,
        gumbel_tau: float = 1.0,
        seed: int = 0,
        task_ranks: dict[str, int] | None = None,
        default_rank: int = 8,
        use_token_importance: bool = True,
        use_loss_landscape: bool = True,
        use_controller: bool | None = None,
    ):
        super().__init__(modules, bounds)
        if use_controller is not None:
            controller = (controller or "gumbel") if use_controller else None
        if controller not in (None, "gumbel"):
            raise ValueError(f"controller must be None or 'gumbel', not {controller!r}")
        self.tau, self.code_tau = tau, tau * code_tau_scale
        if keyword_classes is None and identifier_classes is None:
            self.code_classes = default_code_classes()
        else:
            self.code_classes = frozenset(keyword_classes or ()) | frozenset(identifier_classes or ())
        self.lam, self.normalize = lam, normalize_importance
        self.eta, self.eta_cap, self.hessian_every, self.ema = eta, eta_cap, hessian_every, ema
        self.shrink_below, self.shrink_stop, self.shrink_rate = shrink_below, shrink_stop, shrink_rate
        self.task_ranks = {**DEFAULT_TASK_RANKS, **(task_ranks or {})}
        self.default_rank = default_rank
        self.use_token_importance, self.use_loss_landscape = use_token_importance, use_loss_landscape
        # Per instance: switched-off signals are not requested from the train step.
        needs = {"grads"}
        if use_token_importance:
            needs.add("token_importance")
        if use_loss_landscape:
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
        if controller == "gumbel":
            self.controller_delta, self.gumbel_tau, self.seed = controller_delta, gumbel_tau, seed
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.controller = RankController()
            self.controller_opt = torch.optim.Adam(self.controller.parameters(), lr=controller_lr)
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
            # Eq. 8 per module: r' = r + lambda * S, scaled by the module's gradient share.
            self.base[n] += self.lam * self.signal * self.share[n]

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
        self.last_proposal = ranks
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
