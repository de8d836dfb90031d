"""Adapters as data: binding per call, mixed batches, threads, generate, merge."""

import copy
import threading

import torch

from adapter_core import Adapter, inject_adapters, merge_into, unmerge, use_adapter


def random_snapshot(model, seed, rank=4, version=1):
    """A snapshot of every injected module at ``rank`` with a non-zero B (it changes the output)."""
    modules = inject_adapters(model)
    ad = Adapter.new(modules, {n: rank for n in modules}, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for b in ad.B.values():
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)  # non-zero B so the adapter does something
    ad.version = version - 1
    return ad.snapshot()


def _ids(n=3, t=12, vocab=1000, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def test_inject_is_idempotent_and_freezes(tiny_model):
    m1 = inject_adapters(tiny_model)
    m2 = inject_adapters(tiny_model)
    assert m1 == m2 and len(m1) == 14
    assert all(not p.requires_grad for p in tiny_model.parameters())
    assert "model.layers.0.self_attn.q_proj.weight" in tiny_model.state_dict()


def test_no_adapter_is_base(tiny_model):
    ids = _ids()
    ref = tiny_model(ids).logits
    snap = random_snapshot(tiny_model, 0)
    torch.testing.assert_close(tiny_model(ids).logits, ref)
    with use_adapter(tiny_model, snap):
        assert (tiny_model(ids).logits - ref).abs().max() > 1e-3
    with use_adapter(tiny_model, snap), use_adapter(tiny_model, None):
        torch.testing.assert_close(tiny_model(ids).logits, ref)


def test_mixed_batch_matches_separate_calls(tiny_model):
    a, b = random_snapshot(tiny_model, 0), random_snapshot(tiny_model, 1)
    ids = _ids(4)
    rows = [a, b, None, a]
    with use_adapter(tiny_model, rows):
        mixed = tiny_model(ids).logits
    for i, src in enumerate(rows):
        with use_adapter(tiny_model, src):
            alone = tiny_model(ids[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_threads_see_their_own_adapter(tiny_model):
    snaps = [random_snapshot(tiny_model, s) for s in range(3)]
    ids = _ids(2)
    expected = []
    for s in snaps:
        with use_adapter(tiny_model, s):
            expected.append(tiny_model(ids).logits)
    results, errors = {}, []
    barrier = threading.Barrier(len(snaps))

    def work(i):
        try:
            with use_adapter(tiny_model, snaps[i]):
                barrier.wait()
                outs = [tiny_model(ids).logits for _ in range(5)]
            results[i] = outs
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(snaps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, outs in results.items():
        for out in outs:
            torch.testing.assert_close(out, expected[i], atol=1e-5, rtol=1e-5)


def test_generate_with_adapter(tiny_model):
    snap = random_snapshot(tiny_model, 0)
    ids = _ids(2, 5)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    base = tiny_model.generate(ids, **kw)
    with use_adapter(tiny_model, snap):
        adapted = tiny_model.generate(ids, **kw)
    with use_adapter(tiny_model, [snap, None]):
        mixed = tiny_model.generate(ids, **kw)
    assert not torch.equal(base, adapted)
    assert torch.equal(mixed[0], adapted[0]) and torch.equal(mixed[1], base[1])
    # Greedy decoding with the adapter follows the adapted model's argmax.
    with use_adapter(tiny_model, snap):
        nxt = tiny_model(adapted[:, :-1], attention_mask=torch.ones_like(adapted[:, :-1])).logits[:, -1].argmax(-1)
    assert torch.equal(nxt, adapted[:, -1])


def test_merge_unmerge(tiny_model):
    snap = random_snapshot(tiny_model, 0)
    ids = _ids()
    before = copy.deepcopy(tiny_model.state_dict())
    with use_adapter(tiny_model, snap):
        adapted = tiny_model(ids).logits
    merge_into(tiny_model, snap)
    torch.testing.assert_close(tiny_model(ids).logits, adapted, atol=1e-4, rtol=1e-4)
    unmerge(tiny_model, snap)
    for k, v in tiny_model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=1e-6)


def test_deepcopy_gets_its_own_binding(tiny_llama):
    snap = random_snapshot(tiny_llama, 0)
    other = copy.deepcopy(tiny_llama)
    ids = _ids()
    ref = other(ids).logits
    with use_adapter(tiny_llama, snap):
        torch.testing.assert_close(other(ids).logits, ref)
