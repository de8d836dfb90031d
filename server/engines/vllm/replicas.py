"""Several ``vllm serve`` replicas behind one engine: adapter affinity, failover and health checks.

``ReplicaSet`` is the backend ``RemoteVLLMEngine`` gives ``VLLMEngine`` in place of an in-process
``AsyncLLM`` (the calls the engine makes: ``generate``, ``abort``, ``add_lora``, ``remove_lora``,
``list_loras``). Each replica is a client of one vLLM server (``remote.VLLMServerClient``; the
unit tests use fakes with the same methods).

**Versions and affinity.** The engine writes each adapter version once into the shared
directory (the store every replica reads) and then calls ``add_lora``, which loads it on its
lineage's *home*: the replica that loaded the lineage's previous version, or for a new
lineage the least loaded one. ``VLLMEngine`` counts a version as loaded once its home has it,
so a request reaches this class with a version that some replica holds; it is sent to

1. a healthy replica that holds that version (least in flight first): a *hit*;
2. otherwise the lineage's home if it is up, else the least loaded healthy replica, which first
   loads the version from the shared directory: a *cold* request (after a failover).

**Failure.** A transport error (connection refused, reset mid-stream, timeout) marks the
replica down and forgets what it had loaded; the request goes on on another replica, from the
start if nothing was streamed yet, else from the tokens already streamed (prompt + those
tokens, the rest of the budget). The newest version of every lineage whose home it was is
loaded onto another replica at once. An HTTP error answer is the request's, not the replica's:
it is raised, never retried, so one bad request cannot mark every replica down. A task probes
every replica (``GET /health``) each ``health_interval_s``: a failing one goes down, and a down
one that answers again (and serves the same model) comes back with nothing loaded, since a
restarted vLLM has lost its adapters; adapter names of ours it still lists are unloaded.

All state lives on the engine's event loop (one thread); ``rows`` and ``routed`` are read from
other threads for metrics, which only needs whole numbers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from server.engines.vllm.versions import slug_of_lora_name

log = logging.getLogger("dynarank.engine.vllm_replicas")

ROUTE_OUTCOMES = ("hit", "cold", "base", "retried", "resumed")


class ReplicaUnavailable(ConnectionError):
    """The replica could not be reached or dropped the connection (raised by a replica client)."""


class AdapterMissing(RuntimeError):
    """The replica does not know the adapter name it was asked for (it restarted between health checks)."""


class NoReplicaAvailable(RuntimeError):
    """No replica is up."""


@dataclasses.dataclass(eq=False)
class Replica:
    """One vLLM server and what this process knows about it."""

    index: int
    client: Any
    up: bool = False
    inflight: int = 0
    requests: int = 0  # attempts started here (a retried request counts on each replica it tried)
    failures: int = 0  # times it was marked down
    loaded: dict[str, int] = dataclasses.field(default_factory=dict)  # lora name -> lora_int_id
    loading: dict[str, asyncio.Future] = dataclasses.field(default_factory=dict)
    last_error: str = ""
    changed_at: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return getattr(self.client, "url", f"replica-{self.index}")

    def load_key(self) -> tuple:
        return (self.inflight, len(self.loaded), self.index)


class ReplicaSet:
    def __init__(self, clients, *, model: str | None = None, health_interval_s: float = 2.0):
        if not clients:
            raise ValueError("no vLLM replica given")
        if health_interval_s <= 0:
            raise ValueError(f"health_interval_s must be > 0, got {health_interval_s}")
        self.replicas = [Replica(i, c) for i, c in enumerate(clients)]
        self.model = model  # the base model's name on the servers (None: the first replica's)
        self.max_model_len: int | None = None
        self.health_interval_s = float(health_interval_s)
        self.routed = dict.fromkeys(ROUTE_OUTCOMES, 0)
        self._live: dict[int, Any] = {}  # lora_int_id -> LoRARequest, from add_lora to remove_lora
        self._homes: dict[str, Replica] = {}  # lineage slug -> the replica that loaded its newest version
        self._tasks: dict[str, asyncio.Task] = {}  # request id -> the task streaming it (abort cancels it)
        self._moves: set[asyncio.Task] = set()  # loads of a lost replica's lineages elsewhere
        self._health_task: asyncio.Task | None = None

    # -- start, stop, health --------------------------------------------------------

    async def connect(self) -> None:
        """Ask every replica what it serves; start with those that answer (at least one), probe the rest."""
        answers = await asyncio.gather(*(r.client.base_models() for r in self.replicas), return_exceptions=True)
        for r, models in zip(self.replicas, answers):
            if isinstance(models, BaseException):
                r.last_error = _describe(models)
                continue
            if self.model is None and models:
                self.model = next(iter(models))
            if self._accept(r, models, startup=True):
                r.up = True
        up = [r for r in self.replicas if r.up]
        if not up:
            raise NoReplicaAvailable("no vLLM replica is usable: "
                                     + "; ".join(f"{r.url}: {r.last_error}" for r in self.replicas))
        for r in self.replicas:
            if not r.up:
                log.warning("vLLM replica %s is down at startup (%s); retrying every %.1fs",
                            r.url, r.last_error, self.health_interval_s)
        self._health_task = asyncio.ensure_future(self._health_loop())

    def _accept(self, r: Replica, models: dict, startup: bool = False) -> bool:
        """Whether ``r`` serves our base model with enough context (sets ``max_model_len`` at startup)."""
        if self.model not in models:
            r.last_error = f"serves {sorted(models)}, not {self.model!r}"
            return False
        length = models[self.model]
        if startup and length:
            self.max_model_len = min(self.max_model_len or length, length)
        elif length and self.max_model_len and length < self.max_model_len:
            r.last_error = f"max_model_len {length} < {self.max_model_len}"
            return False
        return True

    async def aclose(self) -> None:
        for task in [self._health_task, *self._moves]:
            if task is not None:
                task.cancel()
        for r in self.replicas:
            try:
                await r.client.aclose()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.debug("closing %s failed", r.url, exc_info=True)

    async def wait_moves(self) -> None:
        """Wait until the lineages of replicas marked down so far are loaded elsewhere (or failed to)."""
        while self._moves:
            await asyncio.gather(*list(self._moves), return_exceptions=True)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_health()

    async def check_health(self) -> None:
        """Probe every replica once: down the failing ones, bring back the ones that answer."""
        await asyncio.gather(*(self._probe(r) for r in self.replicas))

    async def _probe(self, r: Replica) -> None:
        try:
            ok, error = await r.client.health(), "health check failed"
        except ReplicaUnavailable as exc:
            ok, error = False, _describe(exc)
        except Exception as exc:  # noqa: BLE001 - a probe never kills the loop
            ok, error = False, _describe(exc)
        if r.up and not ok:
            self.mark_down(r, error)
        elif not r.up and ok:
            await self._revive(r)

    async def _revive(self, r: Replica) -> None:
        try:
            if not self._accept(r, await r.client.base_models()):
                return
            # What a previous life of ours left there (if the server did not restart): not ours to keep.
            for name in await r.client.adapters():
                if slug_of_lora_name(name) is not None:
                    await r.client.unload(name)
        except Exception as exc:  # noqa: BLE001
            r.last_error = _describe(exc)
            return
        r.up, r.loaded, r.last_error, r.changed_at = True, {}, "", time.monotonic()
        log.info("vLLM replica %s is back", r.url)

    def mark_down(self, r: Replica, error) -> None:
        """``r`` is unreachable: forget what it held and give its lineages a new home now."""
        if not r.up:
            return
        r.up, r.failures, r.last_error, r.changed_at = False, r.failures + 1, _describe(error), time.monotonic()
        lost, r.loaded = r.loaded, {}
        log.warning("vLLM replica %s is down (%s); %d adapter version(s) move", r.url, r.last_error, len(lost))
        newest: dict[str, int] = {}
        for name, int_id in lost.items():
            slug = slug_of_lora_name(name)
            if slug is not None and int_id > newest.get(slug, 0):
                newest[slug] = int_id
        for slug, int_id in newest.items():
            if self._homes.get(slug) is r:
                del self._homes[slug]
            lora = self._live.get(int_id)
            if lora is not None:
                task = asyncio.ensure_future(self._rehome(lora))
                self._moves.add(task)
                task.add_done_callback(self._moves.discard)

    async def _rehome(self, lora) -> None:
        try:
            await self._load_somewhere(lora)
        except Exception as exc:  # noqa: BLE001 - the next request for it loads it (cold)
            log.info("moving %s to another replica failed: %s", lora.lora_name, _describe(exc))

    # -- routing ------------------------------------------------------------------------

    def _up(self) -> list[Replica]:
        up = [r for r in self.replicas if r.up]
        if not up:
            raise NoReplicaAvailable("no vLLM replica is up: "
                                     + "; ".join(f"{r.url}: {r.last_error}" for r in self.replicas))
        return up

    def pick(self, lora) -> tuple[Replica, str]:
        """The replica a request for ``lora`` (None: the base model) goes to, and why (``ROUTE_OUTCOMES``)."""
        up = self._up()
        if lora is None:
            return min(up, key=Replica.load_key), "base"
        holding = [r for r in up if lora.lora_name in r.loaded]
        if holding:
            return min(holding, key=Replica.load_key), "hit"
        return self._home_for(lora, up), "cold"

    def _home_for(self, lora, up: list[Replica]) -> Replica:
        """The lineage's home; a new one (least loaded) is chosen at once, so concurrent requests agree."""
        slug = slug_of_lora_name(lora.lora_name)
        home = self._homes.get(slug)
        if home is None or not home.up:
            home = self._homes[slug] = min(up, key=Replica.load_key)
        return home

    async def _ensure_loaded(self, r: Replica, lora) -> None:
        """Load ``lora`` on ``r`` unless it is there (concurrent callers share one load)."""
        name = lora.lora_name
        if name in r.loaded:
            return
        future = r.loading.get(name)
        if future is None:
            future = r.loading[name] = asyncio.ensure_future(self._load(r, lora))
            future.add_done_callback(lambda _f, r=r, name=name: r.loading.pop(name, None))
        await asyncio.shield(future)

    async def _load(self, r: Replica, lora) -> None:
        try:
            await r.client.load(lora.lora_name, lora.lora_path)
        except ReplicaUnavailable as exc:
            self.mark_down(r, exc)
            raise
        if not r.up:
            raise ReplicaUnavailable(f"{r.url} went down while loading {lora.lora_name}")
        if lora.lora_int_id not in self._live:  # removed meanwhile (only a background move can race this)
            await self._unload(r, lora.lora_name)
            raise RuntimeError(f"{lora.lora_name} was removed while it was loading")
        r.loaded[lora.lora_name] = lora.lora_int_id
        self._homes[slug_of_lora_name(lora.lora_name)] = r

    async def _load_somewhere(self, lora) -> Replica:
        """Load ``lora`` on its home (or the least loaded replica); another one if that one is down."""
        for _ in self.replicas:
            r = self._home_for(lora, self._up())
            try:
                await self._ensure_loaded(r, lora)
                return r
            except ReplicaUnavailable:
                continue
        raise NoReplicaAvailable(f"no vLLM replica could load {lora.lora_name}")

    async def _unload(self, r: Replica, name: str) -> None:
        r.loaded.pop(name, None)
        if not r.up:
            return
        try:
            await r.client.unload(name)
        except ReplicaUnavailable as exc:
            self.mark_down(r, exc)
        except Exception as exc:  # noqa: BLE001 - unloading is best effort (vLLM's LRU bounds memory anyway)
            log.info("unloading %s from %s failed: %s", name, r.url, _describe(exc))

    # -- what VLLMEngine calls ----------------------------------------------------------

    async def generate(self, prompt, params, request_id: str, lora_request=None):
        """Stream ``prompt`` on a replica chosen by ``pick``; on a replica failure go on on another."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks[request_id] = task
        prompt_ids = list(prompt["prompt_token_ids"])
        model = lora_request.lora_name if lora_request is not None else self.model
        streamed: list[int] = []
        failures = missing = 0
        try:
            while True:
                r, outcome = self.pick(lora_request)
                if failures == 0 and missing == 0:
                    self.routed[outcome] += 1
                budget = int(params["max_tokens"]) - len(streamed)
                if budget <= 0:  # the whole budget was streamed before the failure: the engine ends it
                    return
                r.inflight += 1
                r.requests += 1
                try:
                    if lora_request is not None:
                        await self._ensure_loaded(r, lora_request)
                    async for out in r.client.generate(prompt_ids + streamed, {**params, "max_tokens": budget},
                                                       model):
                        streamed += list(out.outputs[0].token_ids)
                        yield out
                    return
                except ReplicaUnavailable as exc:
                    self.mark_down(r, exc)
                    failures += 1
                    if failures >= len(self.replicas) * 2:
                        raise
                    self.routed["resumed" if streamed else "retried"] += 1
                    log.info("request %s: %s failed (%s); going on elsewhere after %d token(s)",
                             request_id, r.url, _describe(exc), len(streamed))
                except AdapterMissing:
                    if lora_request is None or missing:
                        raise
                    r.loaded.pop(lora_request.lora_name, None)  # reload it once, then give up
                    missing += 1
                finally:
                    r.inflight -= 1
        finally:
            self._tasks.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()  # closes the stream; vLLM aborts a request whose client went away

    async def add_lora(self, lora_request) -> bool:
        """A new version is in the shared directory: load it on its lineage's home (it counts as loaded then)."""
        self._live[lora_request.lora_int_id] = lora_request
        try:
            await self._load_somewhere(lora_request)
        except BaseException:
            self._live.pop(lora_request.lora_int_id, None)
            raise
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        lora = self._live.pop(lora_id, None)
        if lora is None:
            return False
        for r in self.replicas:
            if r.loaded.get(lora.lora_name) == lora_id:
                await self._unload(r, lora.lora_name)
        slug = slug_of_lora_name(lora.lora_name)
        if not any(slug_of_lora_name(o.lora_name) == slug for o in self._live.values()):
            self._homes.pop(slug, None)
        return True

    async def list_loras(self) -> set[int]:
        """Our ids of the versions the healthy replicas list (after an unload a name is gone)."""
        ids: set[int] = set()
        for r in self._up():
            try:
                listed = await r.client.adapters()
            except ReplicaUnavailable as exc:
                self.mark_down(r, exc)
                continue
            ids |= {i for name, i in r.loaded.items() if name in listed}
        return ids

    def get_num_unfinished_requests(self) -> int:
        return len(self._tasks)

    def shutdown(self) -> None:
        pass

    # -- introspection (metrics, tests) ----------------------------------------------------

    def rows(self) -> list[dict]:
        """One dict per replica: url, up, inflight, requests, failures, loaded (versions), last_error."""
        return [{"url": r.url, "up": r.up, "inflight": r.inflight, "requests": r.requests,
                 "failures": r.failures, "loaded": len(r.loaded), "last_error": r.last_error}
                for r in list(self.replicas)]

    def holders(self, lora_name: str) -> list[str]:
        """URLs of the healthy replicas that hold ``lora_name``."""
        return [r.url for r in self.replicas if r.up and lora_name in r.loaded]


def _describe(error) -> str:
    if isinstance(error, BaseException):
        return str(error) or type(error).__name__
    return str(error)
