"""PEFT export/import: round trip through peft.PeftModel, atomic replacement."""

import copy
import json

import pytest
import torch

import adapter_core.atomic as atomic
from adapter_core import Adapter, inject_adapters, load_peft, save_peft, use_adapter


def _trained_like_snapshot(model, seed=0):
    """A snapshot with non-zero B and different ranks per module."""
    modules = inject_adapters(model)
    ranks = {n: 2 + (i % 5) for i, n in enumerate(modules)}
    ad = Adapter.new(modules, ranks, seed=seed, lora_alpha=1.7)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for b in ad.B.values():
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return ad.snapshot(note="test")


def _peft_logits(base, directory, ids):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base, str(directory))
    peft_model.eval()
    with torch.no_grad():
        return peft_model(input_ids=ids).logits


def test_roundtrip_through_peft(tiny_model, tmp_path):
    pristine = copy.deepcopy(tiny_model)
    snap = _trained_like_snapshot(tiny_model)
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    with use_adapter(tiny_model, snap), torch.no_grad():
        ours = tiny_model(ids).logits
    out = save_peft(snap, tmp_path / "adapter", "tiny")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["rank_pattern"] == cfg["alpha_pattern"] == snap.ranks
    assert cfg["r"] == cfg["lora_alpha"] == max(snap.ranks.values())
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    torch.testing.assert_close(_peft_logits(pristine, out, ids), ours, atol=1e-5, rtol=1e-5)

    back = load_peft(out)
    assert back.version == snap.version and back.ranks == snap.ranks and back.metadata["note"] == "test"
    for n in snap.modules:
        torch.testing.assert_close(back.delta(n), snap.delta(n))
        assert back.scale[n] == pytest.approx(snap.scale[n])


def test_load_plain_peft_dir(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    pristine = copy.deepcopy(tiny_llama)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"model.layers.1.self_attn.q_proj": 2})
    pm = get_peft_model(pristine, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 1000, (2, 10))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path / "plain")
    snap = load_peft(tmp_path / "plain")
    assert snap.ranks["model.layers.1.self_attn.q_proj"] == 2 and snap.ranks["model.layers.0.self_attn.q_proj"] == 4
    inject_adapters(tiny_llama)
    with use_adapter(tiny_llama, snap), torch.no_grad():
        torch.testing.assert_close(tiny_llama(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_crash_mid_write_keeps_previous(tiny_llama, tmp_path, monkeypatch):
    snap1 = _trained_like_snapshot(tiny_llama, seed=0)
    snap2 = _trained_like_snapshot(tiny_llama, seed=5)
    target = tmp_path / "adapter"
    save_peft(snap1, target)

    def boom(path):
        raise OSError("disk died")

    monkeypatch.setattr(atomic, "fsync_path", boom)  # dies after the files are written, before the swap
    with pytest.raises(OSError):
        save_peft(snap2, target)
    monkeypatch.undo()
    back = load_peft(target)
    assert back.version == snap1.version
    name = snap1.modules[0]
    torch.testing.assert_close(back.delta(name), snap1.delta(name))
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp leftovers

    # A fallback swap cut between its two renames is repaired on the next read.
    (tmp_path / "adapter").rename(tmp_path / ".adapter.old-1")
    assert load_peft(target).version == snap1.version

    save_peft(snap2, target)
    assert load_peft(target).version == snap2.version


@pytest.mark.real_model
def test_roundtrip_through_peft_real_model(smollm2_path, tmp_path):
    from server.models import load_model

    model, tok = load_model(smollm2_path)
    pristine, _ = load_model(smollm2_path)
    snap = _trained_like_snapshot(model)
    ids = tok("def add(a, b):\n    return a + b\n", return_tensors="pt").input_ids
    with use_adapter(model, snap), torch.no_grad():
        ours = model(ids).logits
    with torch.no_grad():
        base = pristine(ids).logits
    assert (ours - base).abs().max() > 1e-3
    out = save_peft(snap, tmp_path / "smol", str(smollm2_path))
    torch.testing.assert_close(_peft_logits(pristine, out, ids), ours, atol=1e-4, rtol=1e-4)
