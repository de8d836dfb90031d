"""The rank-policy interface.

A policy only *decides* ranks. The mechanism (``adapter_core.resize``) applies
its proposal: it clips each module to ``[r_min, r_max]``, fits the total to the
global parameter budget, and reshapes the factors by SVD.

Per train step the train step builds one :class:`StepObservation` with the
signals the policy asked for in :attr:`RankPolicy.needs`, calls
:meth:`RankPolicy.observe`, then :meth:`RankPolicy.propose`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
    """Shape facts of one adapted linear module."""

    name: str  # full module name in the base model, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    layer_index: int  # transformer block index (0-based), -1 if unknown

    def params_per_rank(self) -> int:
        # One rank adds a row to A (in) and a column to B (out).
        return self.in_features + self.out_features


@dataclasses.dataclass(frozen=True)
class RankBounds:
    r_min: int = 1
    r_max: int = 64
    # Global budget: total LoRA parameters sum(r_m * (in_m + out_m)); None = no cap.
    budget: int | None = None


@dataclasses.dataclass
class StepObservation:
    """What one train step measured. Fields a policy did not ask for are None."""

    step: int
    loss: float
    ranks: dict[str, int]
    # Current factors (detached): A (r x in), B (out x r), per module.
    lora_A: dict[str, torch.Tensor]
    lora_B: dict[str, torch.Tensor]
    # Gradients of the factors from this step (detached), per module.
    grad_A: dict[str, torch.Tensor] | None = None
    grad_B: dict[str, torch.Tensor] | None = None
    grad_norm: float | None = None
    # "token_importance": per-token importance of the target tokens, shape (batch, seq),
    # and the token classes (code_signals.TokenClass ints) of the same tokens.
    token_importance: torch.Tensor | None = None
    token_classes: torch.Tensor | None = None
    loss_weights: torch.Tensor | None = None
    # "hessian_trace": Hutchinson estimate of tr(H) over the LoRA parameters, per module
    # and total (only on steps where it was computed).
    hessian_trace: dict[str, float] | None = None
    hessian_trace_total: float | None = None
    task: str | None = None  # "new_code" | "modification" | "bug_fix"
    # The two terms of token_importance (shape (batch, seq), each scaled to mean 1 over real
    # tokens), for policies that weigh them themselves. Set with "token_importance".
    attention_received: torch.Tensor | None = None
    input_grad_norm: torch.Tensor | None = None


def check(ok: bool, message: str) -> None:
    """For config ``__post_init__``: raise ``ValueError(message)`` unless ``ok``."""
    if not ok:
        raise ValueError(message)


class RankPolicy:
    """Base class: observe step statistics, propose per-module ranks.

    Subclasses take ``(modules, bounds, config)``, where ``config`` is their config
    dataclass (``None`` = its defaults), and are registered with
    ``adapter_core.policies.register_policy``.
    """

    name: ClassVar[str] = "base"
    # Signals this policy needs from the train step: any of
    # {"grads", "token_importance", "hessian_trace"}.
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, modules: dict[str, ModuleInfo], bounds: RankBounds, config=None):
        self.modules = modules
        self.bounds = bounds
        self.config = config

    def initial_ranks(self, task: str | None = None) -> dict[str, int]:
        """Ranks for a fresh adapter (task-aware policies look at ``task``)."""
        raise NotImplementedError

    def observe(self, obs: StepObservation) -> None:
        """Take this step's statistics (update EMAs, scores...)."""

    def propose(self, obs: StepObservation) -> dict[str, int] | None:
        """Desired ranks after this step, or None for no change.

        The mechanism clips to bounds and budget, so a policy may over-ask.
        """
        return None

    def hessian_due(self, step: int) -> bool:
        """Whether the train step should estimate the Hessian trace on this step."""
        return False

    def state_dict(self) -> dict:
        """Policy state to persist beside an adapter (EMAs, counters)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
