"""``RemoteVLLMEngine``: generation in one or several external, already running ``vllm serve``.

Select it with ``dynarank serve --engine vllm --vllm-option url=http://host:8001``
(or ``$DYNARANK_VLLM_URL``); several ``url`` options (or a comma list) are replicas
behind one engine, routed by ``replicas.ReplicaSet`` (adapter affinity, failover,
health checks). Every server must have been started with LoRA and runtime adapter
updates enabled, on the *same* base model::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 vllm serve <model dir> --enable-lora \\
        --max-lora-rank 64 --max-loras 4 --max-cpu-loras 16

It reuses ``VLLMEngine`` entirely (tokenization, detokenization, stop
sequences, logprobs, cancellation, adapter versioning and refcounting); only
the backend differs: instead of an in-process ``AsyncLLM``, a ``ReplicaSet`` of
``VLLMServerClient`` speaks vLLM's OpenAI API:

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
- ``lora_path`` is read by the vLLM servers: ``shared_dir`` must be a directory
  every replica sees at the same path (same host, or a shared mount).
- ``--max-lora-rank`` of the server must cover the rank policies' ``r_max``
  (default 64); this engine cannot check it before the first load fails.
- Runtime LoRA updating is documented by vLLM as "for local development"; put
  the vLLM server on a private network (``api_key`` is sent as a bearer token).
- Seeded sampling is reproducible per server, not equal to the hf engine's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path

from server.engines.vllm.engine import VLLMEngine
from server.engines.vllm.options import DEFAULT_ALLOWED_RANKS, EngineOptionError, choose_max_lora_rank
from server.engines.vllm.replicas import AdapterMissing, NoReplicaAvailable, ReplicaSet, ReplicaUnavailable

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


class VLLMServerClient:
    """One vLLM server over its OpenAI API; transport failures raise ``ReplicaUnavailable``."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0, connect_timeout: float = 5.0,
                 health_timeout: float = 10.0):
        import httpx

        self.url = check_url(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # A host that drops packets must not hold a request for the whole read timeout before its retry.
        self.client = httpx.AsyncClient(base_url=self.url, headers=headers,
                                        timeout=httpx.Timeout(timeout, connect=connect_timeout))
        self.health_timeout = health_timeout

    @contextlib.contextmanager
    def _transport(self):
        import httpx

        try:
            yield
        except httpx.TransportError as exc:  # refused, reset, timed out: the replica, not the request
            raise ReplicaUnavailable(f"{self.url}: {type(exc).__name__}: {exc}") from exc

    async def _get(self, path: str, **kwargs):
        with self._transport():
            return await self.client.get(path, **kwargs)

    async def _post(self, path: str, body: dict):
        with self._transport():
            return await self.client.post(path, json=body)

    async def base_models(self) -> dict[str, int | None]:
        """``{name: max_model_len}`` of the base models the server serves."""
        r = await self._get("/v1/models")
        r.raise_for_status()
        return {m["id"]: m.get("max_model_len") for m in r.json().get("data", []) if not m.get("parent")}

    async def adapters(self) -> set[str]:
        """Names of the LoRA adapters the server lists."""
        r = await self._get("/v1/models")
        r.raise_for_status()
        return {m["id"] for m in r.json().get("data", []) if m.get("parent")}

    async def health(self) -> bool:
        return (await self._get("/health", timeout=self.health_timeout)).status_code == 200

    async def load(self, name: str, path: str) -> None:
        r = await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if r.status_code != 200 and "already been loaded" not in r.text:
            raise RuntimeError(f"load_lora_adapter on {self.url}: {r.status_code} {r.text[:500]}")

    async def unload(self, name: str) -> bool:
        return (await self._post("/v1/unload_lora_adapter", {"lora_name": name})).status_code == 200

    async def generate(self, prompt_ids: list[int], params, model: str):
        """Stream one completion of ``prompt_ids`` (``_Output`` per server event)."""
        body = {
            "model": model, "prompt": list(prompt_ids), "max_tokens": params["max_tokens"],
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
        with self._transport():
            async with self.client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread())[:500]
                    if response.status_code == 404:  # an adapter name the server does not know (restarted)
                        raise AdapterMissing(f"{self.url}: {response.status_code} {text!r}")
                    raise RuntimeError(f"vLLM server {self.url}: {response.status_code} {text!r}")
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    out = _parse_event(json.loads(data))
                    if out is not None:
                        yield out

    async def aclose(self) -> None:
        await self.client.aclose()


def _parse_event(event: dict) -> _Output | None:
    choice = (event.get("choices") or [{}])[0]
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
        return _Output([_Completion(ids, lps, choice.get("finish_reason"))])
    return None


def check_url(url: str) -> str:
    """``url`` without a trailing slash, or a clear error when it is not an http(s) URL with a host and
    no credentials."""
    from urllib.parse import urlsplit

    parts = urlsplit(str(url).strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EngineOptionError(f"bad vLLM server URL {url!r}: expected http://HOST:PORT")
    if parts.username or parts.password:  # the URL is logged and labels /metrics: no secrets in it
        raise EngineOptionError("a vLLM server URL may not hold credentials; give the key as api_key=...")
    return str(url).strip().rstrip("/")


def split_urls(urls) -> list[str]:
    """``"http://a:1,http://b:2"`` or a list of such strings -> the URLs, checked, duplicates dropped."""
    items = [urls] if isinstance(urls, str) else list(urls or ())
    out: list[str] = []
    for item in items:
        for url in str(item).split(","):
            if url.strip() and check_url(url) not in out:
                out.append(check_url(url))
    if not out:
        raise EngineOptionError("no vLLM server URL given")
    return out


class RemoteVLLMEngine(VLLMEngine):
    """``VLLMEngine`` on one or several external vLLM servers (``ReplicaSet``)."""

    def __init__(self, urls, tokenizer, model_name: str, *, model_path, data_dir, api_key: str | None = None,
                 remote_model: str | None = None, r_max: int = 64, max_lora_rank: int | None = None,
                 max_cpu_loras: int = 16, health_interval_s: float = 2.0, client_factory=VLLMServerClient,
                 **kwargs):
        self.urls = split_urls(urls)
        self._remote = ([client_factory(url, api_key) for url in self.urls], remote_model, health_interval_s)
        # Each replica caches up to max_cpu_loras versions; lineages spread over the replicas.
        super().__init__(model_path, tokenizer, model_name, data_dir=data_dir, r_max=r_max,
                         max_lora_rank=max_lora_rank or choose_max_lora_rank(r_max, DEFAULT_ALLOWED_RANKS),
                         max_loras=1, max_cpu_loras=max_cpu_loras * len(self.urls), **kwargs)

    def _api(self) -> dict:
        return dict(SamplingParams=SamplingParams, TokensPrompt=TokensPrompt, LoRARequest=LoRARequest,
                    RequestOutputKind=RequestOutputKind)

    async def _start(self, args):
        clients, model, health_interval_s = self._remote
        replicas = ReplicaSet(clients, model=model, health_interval_s=health_interval_s)
        try:
            await replicas.connect()
        except BaseException as exc:
            await replicas.aclose()
            if isinstance(exc, NoReplicaAvailable):  # a configuration problem: the CLI prints "error: ..."
                raise EngineOptionError(str(exc)) from exc
            raise
        log.info("using %d vLLM server(s) (model %s): %s", len(clients), replicas.model,
                 ", ".join(f"{row['url']} ({'up' if row['up'] else 'down'})" for row in replicas.rows()))
        return replicas

    def _max_model_len(self) -> int:
        if self.llm.max_model_len:
            return self.llm.max_model_len
        return int(json.loads((Path(self.model_path) / "config.json").read_text()).get("max_position_embeddings", 4096))

    async def _shutdown(self):
        await self.llm.aclose()

    def list_loras(self) -> set[int]:
        return set(self._call(self.llm.list_loras()))

    # -- replicas (metrics, tests) ----------------------------------------------------------

    def replica_metrics(self) -> dict:
        """``{"replicas": ReplicaSet.rows(), "routed": {outcome: count}, "stale": n}`` for ``/metrics``."""
        return {"replicas": self.llm.rows(), "routed": dict(self.llm.routed), "stale": self.stats["stale"]}

    def check_health(self) -> None:
        """Probe every replica now (the health task does it every ``health_interval_s``)."""
        self._call(self.llm.check_health())


__all__ = ["RemoteVLLMEngine", "VLLMServerClient", "check_url", "split_urls"]
