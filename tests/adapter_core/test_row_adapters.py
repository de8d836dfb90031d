"""``RowAdapters``: one batched LoRA pass for rows on different adapters, equal to the per-row reference;
stacks built once per composition; the update computed in the factors' dtype over a lower-precision base."""

import pytest
import torch
import torch.nn.functional as F

from adapter_core import AdapterSnapshot, LoraLinear, inject_adapters, use_adapter
from adapter_core.layer import RowAdapters
from tests.adapter_core.test_layer import random_snapshot


def _some_modules(snap: AdapterSnapshot, keep: str, version: int = 9) -> AdapterSnapshot:
    """``snap`` restricted to the modules whose name contains ``keep`` (an adapter that leaves the rest alone)."""
    names = [n for n in snap.A if keep in n]
    return AdapterSnapshot(version, {n: snap.A[n] for n in names}, {n: snap.B[n] for n in names},
                           {n: snap.scale[n] * 1.7 for n in names})


def _reference(layer: LoraLinear, x: torch.Tensor, rows) -> torch.Tensor:
    """Row by row: ``W x + b + scale * B A x`` with that row's own adapter, in float64."""
    out = []
    for xi, src in zip(x, rows):
        y = F.linear(xi.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
        factors = None if src is None else src.lora_factors(layer.lora_name)
        if factors is not None:
            a, b, s = factors
            y = y + s * (xi.double() @ a.double().T @ b.double().T)
        out.append(y)
    return torch.stack(out)


class CountingSource:
    """A source that counts how often its factors are read."""

    def __init__(self, snap):
        self.snap = snap
        self.reads = 0

    def lora_factors(self, name):
        self.reads += 1
        return self.snap.lora_factors(name)


@pytest.fixture
def sources(tiny_llama):
    inject_adapters(tiny_llama)
    wide = random_snapshot(tiny_llama, 0, rank=6)
    narrow = random_snapshot(tiny_llama, 1, rank=2)
    partial = _some_modules(random_snapshot(tiny_llama, 2, rank=3), "mlp")  # touches the MLP only
    return wide, narrow, partial


def test_every_layer_matches_the_per_row_reference(tiny_llama, sources):
    wide, narrow, partial = sources
    rows = [wide, narrow, None, partial, wide]
    binding = RowAdapters(rows)
    g = torch.Generator().manual_seed(0)
    layers = [m for m in tiny_llama.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        x = torch.randn(len(rows), 3, layer.in_features, generator=g)
        y = F.linear(x, layer.weight, layer.bias)
        got = binding.add_update(y, x, layer.lora_name)
        torch.testing.assert_close(got.double(), _reference(layer, x, rows), atol=1e-5, rtol=1e-5)
    # The attention projections: only "partial" leaves them alone, and its row gets the base output.
    attn = next(m for m in layers if "q_proj" in m.lora_name)
    x = torch.randn(len(rows), 1, attn.in_features, generator=g)
    got = binding.add_update(F.linear(x, attn.weight), x, attn.lora_name)
    torch.testing.assert_close(got[3], F.linear(x[3], attn.weight))
    assert (got[0] - F.linear(x[0], attn.weight)).abs().max() > 1e-4


def test_a_mixed_batch_through_the_model_equals_each_row_alone(tiny_llama, sources):
    wide, narrow, partial = sources
    rows = [narrow, wide, partial, None]
    ids = torch.randint(0, 1000, (len(rows), 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_adapter(tiny_llama, RowAdapters(rows)):
        mixed = tiny_llama(ids).logits
    for i, src in enumerate(rows):
        with torch.no_grad(), use_adapter(tiny_llama, src):
            alone = tiny_llama(ids[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_rows_repeated_by_beams_use_their_rows_adapter(tiny_llama, sources):
    wide, narrow, _ = sources
    layer = next(m for m in tiny_llama.modules() if isinstance(m, LoraLinear))
    x = torch.randn(4, 2, layer.in_features, generator=torch.Generator().manual_seed(2))
    got = RowAdapters([wide, narrow]).add_update(F.linear(x, layer.weight), x, layer.lora_name)
    torch.testing.assert_close(got.double(), _reference(layer, x, [wide, wide, narrow, narrow]), atol=1e-5,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="3 rows but 2 adapters"):
        RowAdapters([wide, narrow]).add_update(F.linear(x[:3], layer.weight), x[:3], layer.lora_name)


def test_stacks_are_built_once_per_composition(tiny_llama, sources):
    a, b = CountingSource(sources[0]), CountingSource(sources[1])
    n_modules = len(sources[0].A)
    ids = torch.randint(0, 1000, (3, 4), generator=torch.Generator().manual_seed(3))
    first = RowAdapters([a, b, a])
    with torch.no_grad(), use_adapter(tiny_llama, first):
        for _ in range(3):
            tiny_llama(ids)
    assert a.reads == b.reads == n_modules  # once per module, not per forward
    # Rows joined or left but no new adapter came: the stacks are shared, nothing is read again.
    second = RowAdapters([b, a], reuse=first)
    with torch.no_grad(), use_adapter(tiny_llama, second):
        tiny_llama(ids[:2])
    fewer = RowAdapters([None, b], reuse=second)  # a's rows left: its block stays, masked off
    with torch.no_grad():
        with use_adapter(tiny_llama, fewer):
            got = tiny_llama(ids[:2]).logits
        with use_adapter(tiny_llama, sources[1]):
            torch.testing.assert_close(got[1:], tiny_llama(ids[1:2]).logits, atol=1e-5, rtol=1e-5)
    assert a.reads == b.reads == n_modules
    # Another adapter present: a new stack.
    c = CountingSource(sources[2])
    with torch.no_grad(), use_adapter(tiny_llama, RowAdapters([a, c], reuse=second)):
        tiny_llama(ids[:2])
    assert a.reads == 2 * n_modules and c.reads == n_modules


def test_what_to_bind():
    snap = object()
    assert RowAdapters([None, None]).binding() is None
    assert RowAdapters([snap, snap]).binding() is snap  # one shared adapter: the plain path
    mixed = RowAdapters([snap, None])
    assert mixed.binding() is mixed
    with pytest.raises(ValueError, match="at least one row"):
        RowAdapters([])


def test_per_row_binding_refuses_an_adapter_being_trained(tiny_llama):
    from adapter_core import Adapter

    modules = inject_adapters(tiny_llama)
    live = Adapter.new(modules, {n: 2 for n in modules}, seed=0)
    ids = torch.randint(0, 1000, (2, 3))
    with use_adapter(tiny_llama, [live, None]), pytest.raises(ValueError, match="for inference"):
        tiny_llama(ids)


@pytest.mark.parametrize("per_row", [False, True])
def test_the_update_is_computed_in_float32_over_a_bfloat16_base(tiny_llama, sources, per_row):
    """bfloat16 base weights, float32 factors: the LoRA term is computed in float32 and added in bfloat16."""
    wide = sources[0]
    layer = next(m for m in tiny_llama.modules() if isinstance(m, LoraLinear) and "down_proj" in m.lora_name)
    bf16 = LoraLinear(torch.nn.Linear(layer.in_features, layer.out_features, bias=False), layer.lora_name,
                      layer.lora_key)
    bf16.weight = torch.nn.Parameter(layer.weight.detach().to(torch.bfloat16), requires_grad=False)
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    a, b, s = wide.lora_factors(layer.lora_name)
    assert a.dtype == torch.float32
    expected = F.linear(x, bf16.weight) + (s * (x.float() @ a.T @ b.T)).to(torch.bfloat16)
    with torch.no_grad():
        if per_row:  # a base row beside it, so the stacked path runs (one shared adapter takes the plain one)
            got = RowAdapters([wide, None]).add_update(F.linear(x, bf16.weight), x, layer.lora_name)[:1]
            expected = expected[:1]
        else:
            with use_adapter(tiny_llama, wide):
                got = bf16(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # Computing the update in bfloat16 (as before) loses what float32 keeps.
    lossy = F.linear(x, bf16.weight) + s * (x @ a.to(torch.bfloat16).T @ b.to(torch.bfloat16).T)
    assert not torch.equal(lossy[: len(got)], got)
