"""adapter_core/int8.py: int8 copies of the base weights, read by small calls without gradients only."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapter_core import AdapterConfig, inject_adapters, merge_into, new_adapter, train_step, unmerge
from adapter_core.int8 import DECODE_ROWS, Int8Linear, Int8Weight, base_linear, quantize_base
from adapter_core.layer import LoraLinear
from tests.conftest import build_tiny_model


def rel_err(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("int8_activations", [False, True])
@pytest.mark.parametrize("rows", [1, DECODE_ROWS])
def test_int8_matmul_is_close_to_float32(rows, int8_activations):
    torch.manual_seed(0)
    w, x = torch.randn(96, 64), torch.randn(rows, 64)
    y = Int8Weight(w, int8_activations=int8_activations).matmul(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    assert rel_err(y, F.linear(x, w)) < 0.02


def test_a_width_the_kernels_do_not_take_keeps_float32_only():
    model = nn.Sequential(nn.Linear(64, 40), nn.Linear(40, 100), nn.Linear(100, 8))  # 40 and 100: not multiples of 16
    assert quantize_base(model) == 1
    assert isinstance(model[0], Int8Linear) and type(model[1]) is type(model[2]) is nn.Linear
    with pytest.raises(ValueError, match="multiple of 16, not 100"):
        Int8Weight(torch.randn(8, 100))
    with torch.no_grad():
        assert model(torch.randn(1, 64)).isfinite().all()


def test_only_small_calls_without_gradients_read_the_int8_copy():
    torch.manual_seed(0)
    w, bias = torch.randn(96, 64), torch.randn(96)
    int8 = Int8Weight(w)
    small, large = torch.randn(2, DECODE_ROWS // 2, 64), torch.randn(DECODE_ROWS + 1, 64)
    with torch.no_grad():
        assert torch.equal(base_linear(small, w, bias, int8), int8.matmul(small) + bias)
        assert not torch.equal(base_linear(small, w, bias, int8), F.linear(small, w, bias))
        assert torch.equal(base_linear(large, w, bias, int8), F.linear(large, w, bias))  # a prefill chunk
    assert torch.equal(base_linear(small, w, bias, int8), F.linear(small, w, bias))  # gradients on: a train step
    assert torch.equal(base_linear(small, w, bias, None), F.linear(small, w, bias))


@pytest.mark.parametrize("inject_first", [True, False])
def test_quantize_base_copies_every_linear_and_keeps_the_float32_model(tokenizer, inject_first):
    model = build_tiny_model("llama", len(tokenizer))
    ids = torch.randint(0, len(tokenizer), (1, 24))
    with torch.no_grad():
        ref = model(ids).logits
    keys = set(model.state_dict())
    if inject_first:
        inject_adapters(model)
    count = quantize_base(model)
    modules = inject_adapters(model)
    assert quantize_base(model) == count  # idempotent
    lora = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(lora) == len(modules) and all(m.int8 is not None and m.weight is not None for m in lora)
    head = model.get_output_embeddings()
    assert isinstance(head, Int8Linear) and head.int8.int8_activations
    assert count == len(lora) + 1 and not any(type(m) is nn.Linear for m in model.modules())
    assert set(model.state_dict()) == keys  # checkpoints and exports see the same model
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # many rows: the float32 weights
        one = model(ids[:, :1]).logits  # one row: the int8 copies
        assert not torch.equal(one, ref[:, :1]) and rel_err(one, ref[:, :1]) < 0.05


def test_a_train_step_on_a_quantized_model_is_the_float32_step(tokenizer):
    plain = build_tiny_model("llama", len(tokenizer))
    quantized = copy.deepcopy(plain)
    quantize_base(quantized)
    ids = torch.randint(0, len(tokenizer), (1, 12))  # few rows: gradients still keep the float32 GEMM
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_weights": torch.ones(ids.shape)}
    results = []
    for model in (plain, quantized):
        adapter, policy = new_adapter(model, AdapterConfig(policy="fixed", r_init=2, seed=3))
        stats = train_step(model, adapter, batch, policy, lr=1e-2)
        assert not stats.skipped
        results.append(adapter.snapshot())
    for name in results[0].modules:
        assert torch.equal(results[0].B[name], results[1].B[name]) and torch.any(results[0].B[name] != 0)


def test_merge_refreshes_the_int8_copy(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    quantize_base(model)
    adapter, _ = new_adapter(model, AdapterConfig(policy="fixed", r_init=2))
    for name in adapter.B:
        adapter.B[name].data.normal_()
    snap = adapter.snapshot()
    name = snap.modules[0]
    layer = model.get_submodule(name)
    before = layer.int8.q.clone()
    merge_into(model, snap)
    assert not torch.equal(layer.int8.q, before)
    assert torch.equal(layer.int8.q, Int8Weight(layer.weight).q)
    unmerge(model, snap)
    assert rel_err(layer.int8.q, before) < 0.01


def test_the_default_model_decodes_code_with_int8_copies(qwen_coder):
    """End to end on the default model: greedy decoding through the engine with int8 copies writes
    the same code as float32 at first and stays close on the NLL that decoding sees."""
    from bench.engine_speed import token_nll
    from server.engines.base import GenerationRequest
    from server.engines.hf import HFEngine
    from server.models import load_model

    base, tokenizer = qwen_coder
    model, _ = load_model(base.name_or_path)  # a copy of its own: quantize_base changes the model in place
    prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    request = GenerationRequest(prompt=prompt, max_tokens=12)
    code = (Path(__file__).parents[2] / "adapter_core" / "layer.py").read_text()
    windows = [tokenizer(code).input_ids[:160]]

    def greedy_and_nll():
        engine = HFEngine(model, tokenizer, "qwen", prompt_lookup=False)
        ids = [t for chunk in engine.generate(request) for t in chunk.token_ids]
        return ids, sum(token_nll(model, windows))

    f32_ids, f32_nll = greedy_and_nll()
    assert quantize_base(model) == 169
    int8_ids, int8_nll = greedy_and_nll()
    assert int8_ids[:4] == f32_ids[:4]
    assert int8_nll != f32_nll and abs(int8_nll / f32_nll - 1) < 0.01
