"""One adaptation step: importance-weighted loss on the weighted tokens, policy, resize.

Loss weights are indexed by *target* token: ``loss_weights[b, t]`` weighs the loss
of predicting ``input_ids[b, t]`` from the prefix ``input_ids[b, :t]``, computed
from the hidden state at position ``t - 1``. Column 0 has no prefix and is ignored.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from adapter_core.adapter import Adapter
from adapter_core.attention import eager_attention, supports_weights
from adapter_core.hessian import hutchinson_trace
from adapter_core.importance import _normalise, attention_received, token_importance
from adapter_core.layer import use_adapter
from adapter_core.pause_points import pause_point
from adapter_core.policies.base import RankPolicy, StepObservation
from adapter_core.resize import fit_to_budget

# Largest step-size multiplier an example weight may ask for (see _weighted_loss).
MAX_STEP_WEIGHT = 4.0


@dataclasses.dataclass
class StepStats:
    loss: float
    grad_norm: float
    hessian_trace: float | None
    ranks: dict[str, int]
    skipped: bool
    timings: dict[str, float]  # seconds: forward, backward, policy, resize
    num_params: int
    step: int = 0
    tokens: int = 0  # target tokens with weight > 0
    resized: list[str] = dataclasses.field(default_factory=list)


def _targets(batch, weights_key="loss_weights"):
    """Positions ``(b, t-1)`` whose hidden state predicts a weighted token ``t``, with targets and weights."""
    ids = batch["input_ids"]
    w = batch.get(weights_key)
    if w is None:
        w = torch.ones_like(ids, dtype=torch.float32)
    w = w.float()[:, 1:]
    if batch.get("attention_mask") is not None:
        w = w * batch["attention_mask"][:, 1:].float()
    sel = w > 0
    return sel, ids[:, 1:][sel], w[sel]


def _weighted_loss(nll, token_weights, sel, example_weights=None) -> tuple[torch.Tensor, float]:
    """(loss, step weight) of a batch whose rows are examples.

    Each row's loss is the token-weighted mean NLL of its targets; the rows are averaged
    with their example weights (default 1). Adam divides out any uniform factor of
    the loss, so an example's absolute weight acts on the step size instead: the step
    is the batch's mean example weight times the learning rate (capped at
    MAX_STEP_WEIGHT). An example at weight 3 thus moves the adapter about as far as
    three steps on it would.
    """
    n_rows = sel.shape[0]
    rows = sel.nonzero()[:, 0]
    num = nll.new_zeros(n_rows).index_add(0, rows, nll * token_weights)
    den = nll.new_zeros(n_rows).index_add(0, rows, token_weights.to(nll.dtype))
    has_targets = den > 0
    omega = torch.ones(n_rows, device=nll.device) if example_weights is None else example_weights.detach().float().reshape(n_rows)
    omega = omega[has_targets].to(nll.dtype)
    loss = (omega * num[has_targets] / den[has_targets]).sum() / omega.sum()
    return loss, min(MAX_STEP_WEIGHT, float(omega.mean()))


def _selected_nll(model, hidden, sel, targets):
    # Only the rows that carry loss go through the (vocab-sized) head.
    h = hidden[:, :-1][sel]
    logits = model.get_output_embeddings()(h).float()
    return F.cross_entropy(logits, targets, reduction="none")


def train_step(
    model,
    adapter: Adapter,
    batch: dict,
    policy: RankPolicy | None = None,
    *,
    lr: float | None = None,
    max_grad_norm: float = 1.0,
    importance_lambda: float = 1.0,
    hutchinson_samples: int = 1,
) -> StepStats:
    """One optimizer step of ``adapter`` on ``batch`` (see module doc for the weight shift).

    Non-finite loss or gradients skip the update (the adapter keeps its factors and
    moments) and report ``skipped=True``; the policy is not consulted then.
    """
    timings = {"forward": 0.0, "backward": 0.0, "policy": 0.0, "resize": 0.0}
    step = adapter.step
    adapter.step += 1
    if lr is not None:
        adapter.lr = lr
    needs = policy.needs if policy is not None else frozenset()
    want_importance = "token_importance" in needs
    want_hessian = "hessian_trace" in needs and policy.hessian_due(step)
    eager = want_importance or want_hessian
    if eager and not supports_weights(model):
        raise ValueError("this policy needs eager or dynarank_sdpa attention; call inject_adapters(model) on an sdpa/eager model")

    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    sel, targets, weights = _targets(batch)
    n_tokens = int(sel.sum())

    def stats(loss, grad_norm, skipped, hessian=None, resized=()):
        return StepStats(loss, grad_norm, hessian, adapter.ranks, skipped, timings, adapter.num_params, step, n_tokens, list(resized))

    if n_tokens == 0:
        return stats(0.0, 0.0, True)

    # -- forward -----------------------------------------------------------------
    t0 = time.perf_counter()
    params = adapter.parameters()
    emb = model.get_input_embeddings()(ids)
    if want_importance:
        emb = emb.detach().requires_grad_(True)
    with use_adapter(model, adapter), eager_attention(eager):
        out = model.model(inputs_embeds=emb, attention_mask=mask, use_cache=False, output_attentions=want_importance)
        pause_point("head")  # the decoder layers pause in forward and backward (adapter_core.pause_points)
        nll = _selected_nll(model, out.last_hidden_state, sel, targets)
        loss, step_weight = _weighted_loss(nll, weights, sel, batch.get("example_weights"))
    timings["forward"] = time.perf_counter() - t0

    # -- backward ----------------------------------------------------------------
    t0 = time.perf_counter()
    inputs = params + ([emb] if want_importance else [])
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        adapter.zero_grad()
        timings["backward"] = time.perf_counter() - t0
        return stats(loss_value, float("nan"), True)
    grads = torch.autograd.grad(loss, inputs, create_graph=want_hessian, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, grads)]
    hessian = None
    if want_hessian:
        names = list(adapter.A)
        groups = {n: [2 * i, 2 * i + 1] for i, n in enumerate(names)}
        hessian = hutchinson_trace(grads[: len(params)], params, groups, samples=hutchinson_samples, generator=adapter.generator)
    param_grads = [g.detach() for g in grads[: len(params)]]
    grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in param_grads])))
    if not math.isfinite(grad_norm):
        adapter.zero_grad()
        timings["backward"] = time.perf_counter() - t0
        return stats(loss_value, grad_norm, True)
    want_grads = "grads" in needs
    if want_grads:
        grad_A = {n: param_grads[2 * i].clone() for i, n in enumerate(adapter.A)}
        grad_B = {n: param_grads[2 * i + 1].clone() for i, n in enumerate(adapter.A)}
    pause_point("optimizer")
    for p, g in zip(params, param_grads):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    base_lr = adapter.lr
    adapter.lr = base_lr * step_weight
    adapter.optimizer.step()
    adapter.lr = base_lr
    adapter.zero_grad()
    timings["backward"] = time.perf_counter() - t0

    if policy is None:
        return stats(loss_value, grad_norm, False)

    # -- policy ------------------------------------------------------------------
    pause_point("policy")
    t0 = time.perf_counter()
    obs = StepObservation(
        step=step,
        loss=loss_value,
        ranks=adapter.ranks,
        lora_A={n: p.detach().clone() for n, p in adapter.A.items()},
        lora_B={n: p.detach().clone() for n, p in adapter.B.items()},
        grad_norm=grad_norm,
        token_classes=batch.get("token_classes"),
        loss_weights=batch.get("loss_weights"),
        task=batch.get("task"),
    )
    if want_grads:
        obs.grad_A, obs.grad_B = grad_A, grad_B
    if want_importance:
        attn = attention_received(out.attentions, mask)
        gnorm = grads[-1].detach().float().norm(dim=-1)
        obs.token_importance = token_importance(attn, gnorm, mask, importance_lambda)
        obs.attention_received = _normalise(attn, mask)
        obs.input_grad_norm = _normalise(gnorm, mask)
    if hessian is not None:
        obs.hessian_trace = hessian
        obs.hessian_trace_total = sum(hessian.values())
    del out, grads, loss
    policy.observe(obs)
    proposed = policy.propose(obs)
    timings["policy"] = time.perf_counter() - t0

    # -- resize ------------------------------------------------------------------
    resized = []
    if proposed:
        t0 = time.perf_counter()
        new_ranks = fit_to_budget({**adapter.ranks, **proposed}, adapter.modules, policy.bounds)
        resized = adapter.resize(new_ranks)
        timings["resize"] = time.perf_counter() - t0
    total = obs.hessian_trace_total
    return stats(loss_value, grad_norm, False, total, resized)


@torch.no_grad()
def evaluate_nll(model, snapshot, batch: dict) -> torch.Tensor:
    """Per-token NLL ``(B, T)``: entry ``t`` is ``-log p(input_ids[t] | input_ids[:t])``.

    NaN where undefined or not asked for: column 0, padding, and tokens whose
    ``loss_weights`` (if given) are 0. Use ``nanmean``/``nansum`` to aggregate.
    """
    ids = batch["input_ids"]
    sel, targets, _ = _targets(batch)
    with use_adapter(model, snapshot):
        hidden = model.model(input_ids=ids, attention_mask=batch.get("attention_mask"), use_cache=False).last_hidden_state
        nll = _selected_nll(model, hidden, sel, targets)
    result = torch.full(ids.shape, float("nan"), device=ids.device)
    result[:, 1:][sel] = nll.to(result.dtype)
    return result
