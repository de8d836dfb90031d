"""HFEngine and the serving gate, in process, on a tiny random model."""

from __future__ import annotations

import copy
import threading
import time

import pytest

from code_signals.prompts import FIM_TOKENS, build_prompt
from server.engines.base import GenerationRequest
from server.engines.decoding import IncrementalDecoder, StopMatcher
from server.engines.gate import ServingGate
from server.engines.hf import HFEngine


@pytest.fixture(scope="module")
def engine(tokenizer):
    from tests.conftest import build_tiny_model

    return HFEngine(build_tiny_model("llama", len(tokenizer)), tokenizer, "tiny")


def run(engine, **kw):
    return list(engine.generate(GenerationRequest(**kw)))


def test_greedy_yields_one_chunk_per_token_and_honours_max_tokens(engine):
    chunks = run(engine, prompt="def f(x):", max_tokens=6)
    assert sum(len(c.token_ids) for c in chunks) == 6
    assert [c.finish_reason for c in chunks][-1] == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].prompt_tokens == len(engine.tokenizer("def f(x):")["input_ids"])
    assert run(engine, prompt="def f(x):", max_tokens=6) == chunks  # greedy is deterministic


def test_seeded_sampling_is_reproducible(engine):
    a = run(engine, prompt="x", max_tokens=8, temperature=1.5, seed=7)
    b = run(engine, prompt="x", max_tokens=8, temperature=1.5, seed=7)
    c = run(engine, prompt="x", max_tokens=8, temperature=1.5, seed=8)
    ids = lambda chunks: [t for ch in chunks for t in ch.token_ids]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_logprobs_per_token(engine):
    chunks = run(engine, prompt="x", max_tokens=4, logprobs=3)
    for c in chunks:
        assert len(c.logprobs) == len(c.token_ids)
        for lp, top in zip(c.logprobs, c.top_logprobs or []):
            assert lp <= 0 and len(top) == 3 and max(top.values()) >= lp - 1e-5


def test_cancel_stops_within_one_token(engine):
    cancel = threading.Event()
    produced = 0
    for i, chunk in enumerate(engine.generate(GenerationRequest(prompt="x", max_tokens=200), cancel=cancel)):
        produced += len(chunk.token_ids)
        if i == 1:
            cancel.set()
            after = produced
    assert chunk.finish_reason == "cancelled"
    assert produced - after <= 1


def test_cancel_before_start_generates_nothing(engine):
    cancel = threading.Event()
    cancel.set()
    chunks = list(engine.generate(GenerationRequest(prompt="x", max_tokens=50), cancel=cancel))
    assert [c.finish_reason for c in chunks] == ["cancelled"] and not chunks[0].token_ids


def test_stop_sequence_spanning_chunks_is_cut():
    m = StopMatcher(["\n\n", "END"])
    out = [m.feed(p) for p in ["ab", "c\n", "\nrest"]]
    assert "".join(out) == "abc" and m.stopped
    m = StopMatcher(["END"])
    assert m.feed("xE") == "x"  # "E" might start "END": held back
    assert m.feed("Nope") == "ENope"
    assert m.feed("EN") == "" and m.feed("D!") == "" and m.stopped
    assert m.text[: m.emitted] == "xENope"


def test_stop_sequences_cut_engine_output(engine):
    full = "".join(c.text for c in run(engine, prompt="hello", max_tokens=12))
    stop = full[3:6]
    chunks = run(engine, prompt="hello", max_tokens=12, stop=(stop,))
    text = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop"
    assert text == full[: full.index(stop)]


def test_incremental_decoder_never_splits_utf8(tokenizer):
    text = "naïve → 日本語 🙂 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    dec = IncrementalDecoder(tokenizer, [])
    pieces = [dec.push(t) for t in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.fixture(scope="module")
def fim_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": list(FIM_TOKENS)})
    return tok


def test_fim_prompt_construction(fim_tokenizer, tokenizer):
    prompt = build_prompt(fim_tokenizer, "def f():\n    ", "\n    return x\n")
    assert prompt == "<|fim_prefix|>def f():\n    <|fim_suffix|>\n    return x\n<|fim_middle|>"
    ids = fim_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for token in FIM_TOKENS:  # each marker is one special token, not split text
        assert fim_tokenizer.convert_tokens_to_ids(token) in ids
    assert build_prompt(fim_tokenizer, "a", None) == "a"
    assert build_prompt(tokenizer, "a", "b") == "a"  # no FIM tokens: suffix ignored


def test_engine_uses_fim_prompt(fim_tokenizer):
    from tests.conftest import build_tiny_model

    eng = HFEngine(build_tiny_model("qwen2", len(fim_tokenizer)), fim_tokenizer, "tiny-fim")
    assert eng.fim
    ids = eng.encode(GenerationRequest(prompt="a = ", suffix="\nprint(a)")).ids
    assert ids[0] == fim_tokenizer.convert_tokens_to_ids("<|fim_prefix|>")
    assert ids[-1] == fim_tokenizer.convert_tokens_to_ids("<|fim_middle|>")
    chunks = list(eng.generate(GenerationRequest(prompt="a = ", suffix="\nprint(a)", max_tokens=3)))
    assert chunks[-1].prompt_tokens == len(ids)


def test_prompt_longer_than_context_is_rejected(engine):
    with pytest.raises(ValueError, match="context"):
        run(engine, prompt="x " * 600, max_tokens=1)


def test_adapter_is_bound_per_forward(engine, monkeypatch):
    import server.engines.hf as mod

    seen = []

    def fake_context(model, adapter):
        import contextlib

        seen.append(adapter)
        return contextlib.nullcontext()

    monkeypatch.setattr(mod, "adapter_context", fake_context)
    marker = object()
    list(engine.generate(GenerationRequest(prompt="x", max_tokens=3), adapter=marker))
    assert seen == [marker] * 3


def test_serving_gate_makes_training_wait():
    gate = ServingGate(grace_s=0.0)
    assert gate.wait_idle(timeout=0.01)
    events = []
    with gate.serving():
        assert gate.active == 1
        assert not gate.wait_idle(timeout=0.05)

        def train():
            with gate.training_slice():
                events.append(("train", time.monotonic()))

        t = threading.Thread(target=train)
        t.start()
        time.sleep(0.1)
        assert events == []
        released = time.monotonic()
    t.join(2)
    assert events and events[0][1] >= released
    assert gate.training_waits == 1 and not gate.training


def test_serving_gate_grace_period():
    gate = ServingGate(grace_s=0.2)
    with gate.serving():
        pass
    t0 = time.monotonic()
    assert gate.wait_idle(timeout=1)
    assert time.monotonic() - t0 >= 0.15
    with pytest.raises(TimeoutError):
        with gate.serving(), gate.training_slice(timeout=0.01):
            pass
