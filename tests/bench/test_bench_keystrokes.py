"""bench/keystrokes.py: the table's split of first requests and keystrokes, and what one request reports
(on a tiny model: the tokens it reused from the request before)."""

from __future__ import annotations

import pytest

from bench.keystrokes import complete, summarize


def run(seconds, tokens, reused=0, prompt_tokens=100):
    return {"seconds": seconds, "tokens": tokens, "reused_tokens": reused, "prompt_tokens": prompt_tokens}


def test_first_requests_and_keystrokes_are_compared_apart():
    rows = [{"language": "go", "keystroke": 0, "fresh": run(6.0, [1]), "cached": run(6.0, [1])},
            {"language": "go", "keystroke": 1, "fresh": run(6.0, [1]), "cached": run(3.0, [1], reused=60)},
            {"language": "go", "keystroke": 2, "fresh": run(4.0, [2]), "cached": run(2.0, [3], reused=80)}]
    first, typing, *_ = summarize(rows)
    assert (first["requests"], first["n"], first["reused"], first["same"]) == ("first", 1, 0.0, "1/1")
    assert first["time_vs"]["n"] == 1  # one pair: no interval
    assert (typing["requests"], typing["n"], typing["same"]) == ("typing", 2, "1/2")
    assert typing["reused"] == pytest.approx(70.0) and typing["time_vs"]["rel"] == pytest.approx(-0.5)
    assert typing["fresh_s"] == 5.0 and typing["cached_s"] == 2.5


def test_a_request_reports_the_prompt_tokens_it_reused(tokenizer):
    from server.engines.hf import HFEngine
    from tests.conftest import build_tiny_model

    engine = HFEngine(build_tiny_model("llama", len(tokenizer)), tokenizer, "tiny", prefill_chunk=8)
    try:
        prefix = "".join(f"x{i} = {i}\n" for i in range(20))
        first = complete(engine, prefix, "\n", budget=400)
        again = complete(engine, prefix + "y", "\n", budget=400)
    finally:
        engine.close()
    assert first["reused_tokens"] == 0 and first["prompt_tokens"] > 16
    assert again["reused_tokens"] >= first["prompt_tokens"] - 16 and again["reused_tokens"] % 8 == 0
