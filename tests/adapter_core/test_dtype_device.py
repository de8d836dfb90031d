"""Nothing in adapter_core assumes the CPU or float32: on a bfloat16 base model (on the CPU here, on
CUDA under the ``gpu`` marker) the factors, gradients, optimizer state and snapshots are float32 on
the model's device, and an export is a CPU float32 PEFT directory that PEFT loads."""

from __future__ import annotations

import copy

import pytest
import torch

from adapter_core import (
    AdapterConfig,
    RankBounds,
    evaluate_nll,
    inject_adapters,
    load_peft,
    new_adapter,
    new_session_adapter,
    save_peft,
    train_step,
    use_adapter,
)
from adapter_core.adapter import Adapter
from tests.adapter_core.test_train import ProbePolicy
from tests.conftest import build_tiny_model

CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def bf16_model(tokenizer, device: str):
    return build_tiny_model("llama", len(tokenizer)).to(device=device, dtype=torch.bfloat16)


def batch_on(device, n=2, t=16, vocab=1000, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    w = torch.ones(n, t)
    w[:, : t // 2] = 0.0  # context tokens: weight 0
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                         "loss_weights": w}.items()}


def assert_float32_on(tensors, device):
    tensors = list(tensors)
    assert tensors
    for t in tensors:
        assert t.dtype == torch.float32, t.dtype
        assert t.device.type == torch.device(device).type, t.device


class RecordingPolicy(ProbePolicy):
    """``ProbePolicy`` that asks for the Hessian trace at every step and grows one module once."""

    name = "recording"

    def hessian_due(self, step):
        return True

    def propose(self, obs):
        first = next(iter(self.modules))
        return {first: 3} if obs.step == 0 else {}


@pytest.mark.parametrize("device", DEVICES)
def test_train_step_on_bf16_model_keeps_adapter_state_float32_on_its_device(tokenizer, device):
    model = bf16_model(tokenizer, device)
    modules = inject_adapters(model)
    policy = RecordingPolicy(modules, RankBounds(r_min=1, r_max=4))
    adapter, _ = new_adapter(model, AdapterConfig(policy="fixed", r_init=2))
    assert_float32_on(adapter.parameters(), device)
    assert adapter.device.type == device

    batch = batch_on(device)
    stats = [train_step(model, adapter, batch, policy, lr=1e-2) for _ in range(3)]
    assert not any(s.skipped for s in stats), stats
    first = next(iter(modules))
    assert stats[0].resized == [first] and adapter.ranks[first] == 3  # resized on the device

    obs = policy.seen[0]
    assert_float32_on([*obs.grad_A.values(), *obs.grad_B.values()], device)
    assert obs.token_importance.device.type == device and torch.isfinite(obs.token_importance).all()
    assert all(torch.isfinite(torch.tensor(v)) for v in obs.hessian_trace.values())
    assert_float32_on(adapter.parameters(), device)
    moments = [v for p in adapter.parameters() for k, v in adapter.optimizer.state[p].items() if k != "step"]
    assert_float32_on(moments, device)
    assert any(float(b.detach().abs().max()) > 0 for b in adapter.B.values())  # the steps moved B off zero

    snap = adapter.snapshot()
    assert_float32_on([*snap.A.values(), *snap.B.values()], device)
    nll = evaluate_nll(model, snap, batch)
    assert torch.isfinite(nll[:, batch["input_ids"].shape[1] // 2 + 1:]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_lora_output_follows_the_base_dtype(tokenizer, device):
    model = bf16_model(tokenizer, device)
    adapter, _ = new_adapter(model)
    with torch.no_grad():
        for b in adapter.B.values():
            b.normal_(0, 0.05)
    ids = batch_on(device)["input_ids"]
    with torch.no_grad():
        base = model(ids).logits
        with use_adapter(model, adapter.snapshot()):
            adapted = model(ids).logits
    assert adapted.dtype == base.dtype == torch.bfloat16 and adapted.device.type == device
    assert float((adapted.float() - base.float()).abs().max()) > 0.05  # the adapter is applied


@pytest.mark.parametrize("device", DEVICES)
def test_resume_from_a_cpu_snapshot_lands_on_the_model_device(tokenizer, device):
    model = bf16_model(tokenizer, device)
    cpu_adapter, _ = new_adapter(build_tiny_model("llama", len(tokenizer)))
    stored = cpu_adapter.snapshot(bump=False)  # what the store reads: CPU float32
    adapter, _ = new_session_adapter(model, AdapterConfig(), snapshot=stored)
    assert_float32_on(adapter.parameters(), device)
    adapter.load_from(stored)  # a rollback from a CPU snapshot stays on the device
    assert_float32_on(adapter.parameters(), device)
    moved = stored.to(device)
    assert_float32_on([*moved.A.values(), *moved.B.values()], device)
    assert (moved is stored) == (device == "cpu")
    for name in stored.modules:
        torch.testing.assert_close(moved.A[name].cpu(), stored.A[name])


def test_fresh_factors_do_not_depend_on_the_device(tokenizer):
    modules = inject_adapters(build_tiny_model("llama", len(tokenizer)))
    ranks = {n: 2 for n in modules}
    a = Adapter.new(modules, ranks, seed=3)
    b = Adapter.new(modules, ranks, seed=3, device="cpu")
    for name in modules:
        assert torch.equal(a.A[name].detach(), b.A[name].detach())


def test_adapters_follow_the_model_to_a_device_other_than_the_cpu(tokenizer):
    """Without a GPU: a model on the meta device gets meta factors, fresh or resumed from a CPU snapshot."""
    model = build_tiny_model("llama", len(tokenizer)).to("meta")
    fresh, _ = new_session_adapter(model)
    stored = new_adapter(build_tiny_model("llama", len(tokenizer)))[0].snapshot(bump=False)
    resumed, _ = new_session_adapter(model, snapshot=stored)
    for adapter in (fresh, resumed):
        assert {p.device.type for p in adapter.parameters()} == {"meta"}
        assert {t.device.type for t in adapter.snapshot().A.values()} == {"meta"}
    assert {t.device.type for t in stored.A.values()} == {"cpu"}
    assert {t.device.type for t in stored.to("meta").B.values()} == {"meta"}


@pytest.mark.parametrize("device", DEVICES)
def test_export_of_a_bf16_base_adapter_loads_with_peft(tokenizer, device, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    model = bf16_model(tokenizer, device)
    pristine = copy.deepcopy(model)
    adapter, policy = new_adapter(model, AdapterConfig(r_init=4))
    with torch.no_grad():
        for b in adapter.B.values():
            b.normal_(0, 0.05)
    train_step(model, adapter, batch_on(device), policy, lr=1e-2)
    snap = adapter.snapshot()
    ids = batch_on(device)["input_ids"]
    with torch.no_grad(), use_adapter(model, snap):
        ours = model(ids).logits.float()
        base = pristine(ids).logits.float()

    out = save_peft(snap, tmp_path / "adapter", "tiny-bf16")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert_float32_on(tensors.values(), "cpu")
    peft_model = PeftModel.from_pretrained(pristine, str(out)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits.float()
    # bfloat16 keeps ~3 significant digits: the two paths agree far closer than the adapter moves the logits.
    assert float((ours - base).abs().max()) > 0.2
    torch.testing.assert_close(theirs, ours, atol=0.05, rtol=0.02)

    back = load_peft(out)
    assert_float32_on([*back.A.values(), *back.B.values()], "cpu")
    for name in snap.modules:
        torch.testing.assert_close(back.delta(name), snap.delta(name).cpu())
