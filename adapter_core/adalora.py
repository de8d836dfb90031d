"""PEFT's AdaLoRA as a comparison baseline, and a converter to plain LoRA factors.

AdaLoRA is run through PEFT itself (not our mechanism). Facts this relies on
(``shared/research/peft_vllm.md`` A.2, peft 0.21.2):

* delta W = B (A * E) * lora_alpha / (ranknum + 1e-5), with ranknum fixed at init_r;
* pruning zeroes entries of E, shapes never shrink during training;
* ``update_and_allocate(step)`` must run after ``backward()`` and before ``zero_grad()``;
* the orthogonal regulariser is added inside the model forward only when labels are passed.
"""

from __future__ import annotations

import torch


def make_adalora_model(
    model,
    target_modules: list[str],
    init_r: int = 12,
    target_r: int = 8,
    total_step: int = 100,
    tinit: int = 0,
    tfinal: int = 0,
    deltaT: int = 1,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    orth_reg_weight: float = 0.5,
    **kwargs,
):
    """Wrap a transformers causal LM in a trainable PEFT AdaLoRA model."""
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(
        task_type="CAUSAL_LM",
        target_modules=target_modules,
        init_r=init_r,
        target_r=target_r,
        total_step=total_step,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=deltaT,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        orth_reg_weight=orth_reg_weight,
        **kwargs,
    )
    return get_peft_model(model, config)


def adalora_train_step(peft_model, batch: dict, optimizer: torch.optim.Optimizer, step: int) -> float:
    """One AdaLoRA step; returns the loss (orthogonal regulariser included).

    ``labels`` default to ``input_ids`` so that the model forward computes the loss and
    adds the orthogonal regulariser (it is skipped when the loss is computed outside).
    """
    peft_model.train()
    if "labels" not in batch:
        batch = {**batch, "labels": batch["input_ids"]}
    loss = peft_model(**batch).loss
    loss.backward()
    optimizer.step()
    # Needs the .grad of this step: after backward, before zero_grad.
    peft_model.base_model.update_and_allocate(step)
    optimizer.zero_grad()
    return float(loss.detach())


def adalora_to_lora(peft_model, adapter_name: str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Plain LoRA factors {module name: (A', B')} with B' A' == AdaLoRA's delta weight, scale 1.

    keep = nonzero E; A' = A[keep]; B' = B[:, keep] * (E[keep]^T * lora_alpha / (ranknum + 1e-5)).
    Module names are those of the base model (PEFT's ``base_model.model.`` prefix removed).
    """
    from peft.tuners.adalora.layer import AdaLoraLayer

    adapter = adapter_name or peft_model.active_adapter
    prefix = "base_model.model."
    factors = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, AdaLoraLayer) or adapter not in module.lora_A:
            continue
        A = module.lora_A[adapter].detach()  # (r, in)
        B = module.lora_B[adapter].detach()  # (out, r)
        E = module.lora_E[adapter].detach()  # (r, 1)
        keep = E[:, 0] != 0
        scale = module.scaling[adapter] / (float(module.ranknum[adapter]) + 1e-5)
        B_new = B[:, keep] * (E[keep].T * scale)
        factors[name.removeprefix(prefix)] = (A[keep].clone(), B_new.clone())
    return factors
