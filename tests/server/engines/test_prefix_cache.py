"""The prefix cache (``server/engines/prefix_cache.py``) in ``HFEngine``, on a tiny random model with session
adapters: a prompt that starts like a recent one reuses its prefill in whole chunks and gives exactly the
tokens and log-probabilities a fresh prefill gives; another adapter, or a live one, never reuses; the
kept prompts are bounded. The websocket's window keeps its start while the user types, so successive
prompts share their prefix."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoTokenizer

from adapter_core import Adapter, inject_adapters
from server.app.ws.protocol import CompleteParams, completion_request
from server.engines.base import GenerationRequest
from server.engines.decoding import TAIL_STRIDE, encode_prompt
from server.engines.hf import HFEngine
from server.engines.prefix_cache import PrefixCache
from server.models import DEFAULT_MODEL, ensure_model
from tests.adapter_core.test_layer import random_snapshot
from tests.conftest import build_tiny_model

CHUNK = 4
DOCUMENT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(6))


@pytest.fixture(scope="module")
def model(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    with torch.no_grad():  # sharp attention: a key at a wrong position changes the output
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    inject_adapters(model)
    return model


@pytest.fixture
def cached(model, tokenizer):
    engine = HFEngine(model, tokenizer, "tiny", prefill_chunk=CHUNK)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def fresh(model, tokenizer):
    engine = HFEngine(model, tokenizer, "tiny", prefill_chunk=CHUNK, prefix_cache=False)
    yield engine
    engine.close()


def n_ids(engine, prompt: str) -> int:
    return len(engine.encode(GenerationRequest(prompt=prompt, max_tokens=12)).ids)


def run(engine, prompt: str, adapter=None) -> tuple[list[int], list[float]]:
    request = GenerationRequest(prompt=prompt, max_tokens=12, logprobs=0)
    chunks = list(engine.generate(request, adapter))
    return [t for c in chunks for t in c.token_ids], [lp for c in chunks for lp in (c.logprobs or [])]


def test_a_prompt_that_starts_like_a_recent_one_reuses_its_chunks_and_gives_the_same_output(cached, fresh, model):
    adapter = random_snapshot(model, 0)
    typed = [DOCUMENT + "def g(", DOCUMENT + "def ge(", DOCUMENT + "def get(", DOCUMENT[:-30] + "x"]
    for prompt in typed:
        assert run(cached, prompt, adapter) == run(fresh, prompt, adapter)
    stats = cached.prefix_cache
    # The first prompt is prefilled whole; the two next reuse all but their last chunk or two; the last
    # one (an edit further up) reuses less, but some.
    assert stats.reused_tokens > 2 * (n_ids(cached, typed[0]) - 3 * CHUNK)
    assert stats.reused_tokens % CHUNK == 0
    assert stats.reused_tokens + stats.prefilled_tokens == sum(n_ids(cached, p) for p in typed)


def test_the_same_prompt_again_prefills_only_its_last_chunk(cached):
    prompt = DOCUMENT + "def g("
    first = run(cached, prompt)
    assert run(cached, prompt) == first
    assert cached.prefix_cache.reused_tokens == (n_ids(cached, prompt) - 1) // CHUNK * CHUNK


def test_a_cancelled_prefill_keeps_the_chunks_it_computed(cached, fresh, monkeypatch):
    """The editor cancels a request at the next keystroke: what its prefill did serves the next prompt."""
    cancel, calls, forward = threading.Event(), [], cached._forward_now

    def forward_then_cancel(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after its third chunk
            cancel.set()
        return forward(*args, **kwargs)

    prompt = DOCUMENT + "def g("
    monkeypatch.setattr(cached, "_forward_now", forward_then_cancel)
    chunks = list(cached.generate(GenerationRequest(prompt=prompt, max_tokens=12), None, cancel))
    assert chunks[-1].finish_reason == "cancelled" and len(calls) == 3
    monkeypatch.setattr(cached, "_forward_now", forward)
    assert run(cached, prompt + "x") == run(fresh, prompt + "x")
    assert cached.prefix_cache.reused_tokens == 3 * CHUNK


def test_another_adapter_or_a_live_one_does_not_reuse(cached, fresh, model):
    one, other = random_snapshot(model, 1), random_snapshot(model, 2)
    prompt = DOCUMENT + "def g("
    run(cached, prompt, one)
    assert run(cached, prompt, other) == run(fresh, prompt, other)
    assert run(cached, prompt) == run(fresh, prompt)  # the base model
    assert cached.prefix_cache.reused_tokens == 0
    live = inject_adapters(model)  # modules with no snapshot: what a live adapter binds is not cacheable
    adapter = Adapter.new(live, dict.fromkeys(live, 2), seed=3)
    run(cached, prompt, adapter)
    run(cached, prompt, adapter)
    assert cached.prefix_cache.reused_tokens == 0


def test_kept_prompts_are_bounded_and_a_newer_state_of_a_document_replaces_the_older(cached, model):
    cache = cached.prefix_cache
    cache.max_entries = 2
    adapters = [random_snapshot(model, seed) for seed in (4, 5, 6)]
    for adapter in adapters:
        run(cached, DOCUMENT + "def g(", adapter)
    run(cached, DOCUMENT + "def gh(", adapters[2])  # the same document, typed on: replaces its older state
    assert len(cache._entries) == 2
    assert [e.adapter for e in cache._entries] == adapters[1:]
    before = cache.reused_tokens
    run(cached, DOCUMENT + "def g(", adapters[0])  # dropped: prefilled whole
    assert cache.reused_tokens == before


def test_kept_bytes_are_bounded(cached, model):
    cache = cached.prefix_cache
    adapters = [random_snapshot(model, seed) for seed in (7, 8, 9)]
    run(cached, DOCUMENT + "def g(", adapters[0])
    one = cache._entries[0].nbytes
    cache.max_bytes = 2 * one + one // 2  # two prompts of this length fit, not three
    for adapter in adapters[1:]:
        run(cached, DOCUMENT + "def g(", adapter)
    assert [e.adapter for e in cache._entries] == adapters[1:]
    cache.max_bytes = one - 1  # a prompt larger than the bound is not kept at all
    run(cached, DOCUMENT + "def h(", adapters[0])
    assert [e.adapter for e in cache._entries] == adapters[1:]


def test_prefix_cache_rejects_an_empty_bound():
    with pytest.raises(ValueError, match="max_entries"):
        PrefixCache(max_entries=0)
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCache(max_bytes=0)


@pytest.fixture(scope="module")
def qwen_tokenizer():
    """The default model's tokenizer (FIM tokens), without the model."""
    return AutoTokenizer.from_pretrained(ensure_model(DEFAULT_MODEL, progress=False))


def test_the_editor_window_keeps_its_start_while_the_user_types(qwen_tokenizer):
    """Typing at the cursor in a long file changes only the prompt's end: the char window and the token
    budget both cut the prefix at a start that moves in strides."""
    code = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(800))  # past both windows
    params = CompleteParams()
    prompts = []
    for typed in ("", "r", "re", "ret", "retu", "return"):
        request = completion_request(code + "def g(a):\n    " + typed, "\n\n" + code, params, "line",
                                     max_prompt_tokens=1024)
        prompts.append(encode_prompt(qwen_tokenizer, request, 32768).ids)
    first = prompts[0]
    for ids in prompts[1:]:
        shared = next(i for i, (a, b) in enumerate(zip(first, ids)) if a != b)
        assert shared >= 1024 * 3 // 4 - TAIL_STRIDE - 40  # the whole prefix but the cursor's line


def test_on_the_default_model_keystrokes_reuse_the_prefill_and_complete_alike(qwen_coder):
    """End to end on Qwen2.5-Coder: the websocket's requests while the user types in a long file."""
    model, tokenizer = qwen_coder
    engines = {"cached": HFEngine(model, tokenizer, "qwen"), "fresh": HFEngine(model, tokenizer, "qwen",
                                                                                prefix_cache=False)}
    code = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(400))
    try:
        for typed in ("", "r", "re"):
            request = completion_request(code + "def g(a):\n    " + typed, "\n\n" + code, CompleteParams(max_tokens=8),
                                         "line", max_prompt_tokens=512)
            texts = {name: "".join(c.text for c in engine.generate(request, None)) for name, engine in engines.items()}
            assert texts["cached"] == texts["fresh"] and texts["cached"].strip(), texts
        # The two keystrokes after the first reuse the prefix's first chunk (of 256 tokens in about 380); the
        # rest of the prefix and the suffix are prefilled again.
        assert engines["cached"].prefix_cache.reused_tokens == 2 * engines["cached"].prefill_chunk
    finally:
        for engine in engines.values():
            engine.close()
