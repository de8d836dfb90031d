"""PEFT AdaLoRA baseline: a few real steps on the tiny Llama, then conversion to plain LoRA."""

from __future__ import annotations

import torch

from adapter_core.adalora import adalora_to_lora, adalora_train_step, make_adalora_model


def test_adalora_converts_to_equal_plain_lora(tiny_llama, tokenizer):
    from peft.tuners.adalora.layer import AdaLoraLayer

    torch.manual_seed(0)
    model = make_adalora_model(tiny_llama, ["q_proj", "v_proj"], init_r=6, target_r=2, total_step=8, lora_alpha=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tokenizer(["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"],
                      return_tensors="pt", padding=True)
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    losses = [adalora_train_step(model, batch, optimizer, step) for step in range(9)]
    assert all(torch.isfinite(torch.tensor(losses)))

    factors = adalora_to_lora(model)
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, AdaLoraLayer)}
    assert set(factors) == set(layers) and len(factors) == 4  # 2 layers x (q, v)
    kept = []
    for name, (A, B) in factors.items():
        expected = layers[name].get_delta_weight("default").detach()
        assert A.shape[0] == B.shape[1]
        assert torch.allclose(B @ A, expected, atol=1e-6, rtol=1e-4), name
        kept.append(A.shape[0])
    # The schedule pruned from 6 per module towards the target budget of 2 per module.
    assert sum(kept) < 6 * len(kept)
    assert any(float(layers[n].get_delta_weight("default").detach().abs().max()) > 0 for n in layers)
