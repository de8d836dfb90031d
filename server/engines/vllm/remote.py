"""``RemoteVLLMEngine``: generation in an external, already running ``vllm serve``.

Select it with ``dynarank serve --engine vllm --vllm-option url=http://host:8001``
(or ``$DYNARANK_VLLM_URL``). The server must have been started with LoRA and
runtime adapter updates enabled, on the *same* base model::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 vllm serve <model dir> --enable-lora \\
        --max-lora-rank 64 --max-loras 4 --max-cpu-loras 16

It reuses ``VLLMEngine`` entirely (tokenization, detokenization, stop
sequences, logprobs, cancellation, adapter versioning and refcounting); only
the backend differs: instead of an in-process ``AsyncLLM``, a small client
speaks vLLM's OpenAI API:

- generation: ``POST /v1/completions`` with the prompt as token ids, ``stream``,
  ``return_token_ids`` and ``return_tokens_as_token_ids`` (vLLM extensions), the
  EOS ids as ``stop_token_ids``; cancel = closing the stream (vLLM aborts a
  request whose client went away);
- a new version: written with ``save_peft`` to ``<shared_dir>/vllm_adapters/...``
  and ``POST /v1/load_lora_adapter {lora_name, lora_path}`` (a new name per
  version, so the prefix cache never reuses KV computed with older weights);
- an old version: ``POST /v1/unload_lora_adapter``.

Limits (vLLM 0.32/0.33):

- **The unload bug**: ``/v1/unload_lora_adapter`` only forgets the name in the
  API server; it never calls the engine's ``remove_lora`` (vLLM issues #42633,
  #54839; fix PR #54939 open). Unloaded versions keep their worker CPU-cache
  entry (and GPU slot) until vLLM's LRU evicts them, so the server holds up to
  ``--max-cpu-loras`` adapters however few are in use, and GPU slots are freed
  only by eviction. Memory stays bounded by ``--max-cpu-loras`` but is not
  returned early as with the in-process engine.
- ``lora_path`` is read by the vLLM server: ``shared_dir`` must be a directory
  both machines see at the same path (same host, or a shared mount).
- ``--max-lora-rank`` of the server must cover the rank policies' ``r_max``
  (default 64); this engine cannot check it before the first load fails.
- Runtime LoRA updating is documented by vLLM as "for local development"; put
  the vLLM server on a private network (``api_key`` is sent as a bearer token).
- Seeded sampling is reproducible per server, not equal to the hf engine's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path

from server.engines.vllm.engine import VLLMEngine
from server.engines.vllm.options import DEFAULT_ALLOWED_RANKS, choose_max_lora_rank

log = logging.getLogger("dynarank.engine.vllm_remote")


# -- stand-ins for the vLLM classes VLLMEngine uses (vLLM need not be installed here) --

@dataclasses.dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""


class SamplingParams(dict):
    def __init__(self, **kwargs):
        super().__init__(kwargs)


def TokensPrompt(prompt_token_ids):  # noqa: N802 - mirrors vllm.inputs.TokensPrompt
    return {"prompt_token_ids": list(prompt_token_ids)}


class RequestOutputKind:
    DELTA = "delta"


@dataclasses.dataclass
class _Logprob:
    logprob: float
    rank: int | None


@dataclasses.dataclass
class _Completion:
    token_ids: list[int]
    logprobs: list[dict[int, _Logprob]] | None
    finish_reason: str | None


@dataclasses.dataclass
class _Output:
    outputs: list[_Completion]


def _token_id(token: str) -> int:
    # With return_tokens_as_token_ids, tokens are spelled "token_id:<id>".
    return int(str(token).rsplit(":", 1)[-1])


class RemoteAsyncLLM:
    """The subset of ``AsyncLLM`` VLLMEngine calls, over vLLM's OpenAI API."""

    def __init__(self, url: str, api_key: str | None, model: str | None, timeout: float = 600.0):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)
        self.model = model
        self.max_model_len = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._names: dict[int, str] = {}

    async def connect(self) -> None:
        r = await self.client.get("/v1/models")
        r.raise_for_status()
        models = r.json().get("data", [])
        base = [m for m in models if not m.get("parent")] or models
        if not base:
            raise RuntimeError(f"{self.url} serves no model")
        if self.model is None:
            self.model = base[0]["id"]
        self.max_model_len = next((m.get("max_model_len") for m in base if m["id"] == self.model), None)

    async def generate(self, prompt, params: dict, request_id: str, lora_request=None):
        body = {
            "model": lora_request.lora_name if lora_request is not None else self.model,
            "prompt": prompt["prompt_token_ids"], "max_tokens": params["max_tokens"],
            "temperature": params["temperature"], "top_p": params["top_p"], "stream": True,
            "stop_token_ids": params["stop_token_ids"], "skip_special_tokens": False,
            "return_token_ids": True, "return_tokens_as_token_ids": True,
        }
        if params.get("seed") is not None:
            body["seed"] = params["seed"]
        if params.get("logprobs") is not None:
            body["logprobs"] = params["logprobs"]
        if params.get("allowed_token_ids"):  # token healing (vLLM's extra sampling parameter)
            body["allowed_token_ids"] = params["allowed_token_ids"]
        task = asyncio.current_task()
        if task is not None:
            self._tasks[request_id] = task
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"vLLM server: {response.status_code} {(await response.aread())[:500]!r}")
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    choice = (json.loads(data).get("choices") or [{}])[0]
                    ids = list(choice.get("token_ids") or [])
                    lps = None
                    if choice.get("logprobs"):
                        lp = choice["logprobs"]
                        lps = []
                        for i, tok in enumerate(lp.get("tokens") or []):
                            entry = {}
                            tops = (lp.get("top_logprobs") or [None] * (i + 1))[i] or {}
                            for rank, (t, v) in enumerate(sorted(tops.items(), key=lambda kv: -kv[1]), 1):
                                entry[_token_id(t)] = _Logprob(float(v), rank)
                            tid = _token_id(tok)
                            if tid not in entry:
                                entry[tid] = _Logprob(float(lp["token_logprobs"][i]), None)
                            lps.append(entry)
                    if ids or choice.get("finish_reason"):
                        yield _Output([_Completion(ids, lps, choice.get("finish_reason"))])
        finally:
            self._tasks.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()  # closes the stream; vLLM aborts the request

    async def add_lora(self, lora_request) -> bool:
        r = await self.client.post("/v1/load_lora_adapter",
                                   json={"lora_name": lora_request.lora_name, "lora_path": lora_request.lora_path})
        if r.status_code != 200:
            raise RuntimeError(f"load_lora_adapter: {r.status_code} {r.text[:500]}")
        self._names[lora_request.lora_int_id] = lora_request.lora_name
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        name = self._names.pop(lora_id, None)
        if name is None:
            return False
        r = await self.client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        return r.status_code == 200

    async def list_loras(self) -> set[int]:
        """Our ids of the adapters the server lists (after an unload the name is gone; see the module doc)."""
        r = await self.client.get("/v1/models")
        r.raise_for_status()
        listed = {m["id"] for m in r.json().get("data", [])}
        return {i for i, n in self._names.items() if n in listed}

    def get_num_unfinished_requests(self) -> int:
        return len(self._tasks)

    def shutdown(self) -> None:
        pass


class RemoteVLLMEngine(VLLMEngine):
    def __init__(self, url: str, tokenizer, model_name: str, *, model_path, data_dir, api_key: str | None = None,
                 remote_model: str | None = None, r_max: int = 64, max_lora_rank: int | None = None,
                 max_cpu_loras: int = 16, **kwargs):
        self._remote = (url, api_key, remote_model)
        super().__init__(model_path, tokenizer, model_name, data_dir=data_dir, r_max=r_max,
                         max_lora_rank=max_lora_rank or choose_max_lora_rank(r_max, DEFAULT_ALLOWED_RANKS),
                         max_loras=1, max_cpu_loras=max_cpu_loras, **kwargs)

    def _api(self) -> dict:
        return dict(SamplingParams=SamplingParams, TokensPrompt=TokensPrompt, LoRARequest=LoRARequest,
                    RequestOutputKind=RequestOutputKind)

    async def _start(self, args):
        url, api_key, model = self._remote
        llm = RemoteAsyncLLM(url, api_key, model)
        await llm.connect()
        log.info("using the vLLM server at %s (model %s)", url, llm.model)
        return llm

    def _max_model_len(self) -> int:
        if self.llm.max_model_len:
            return self.llm.max_model_len
        return int(json.loads((Path(self.model_path) / "config.json").read_text()).get("max_position_embeddings", 4096))

    async def _shutdown(self):
        await self.llm.client.aclose()

    def list_loras(self) -> set[int]:
        return set(self._call(self.llm.list_loras()))


__all__ = ["RemoteAsyncLLM", "RemoteVLLMEngine"]
