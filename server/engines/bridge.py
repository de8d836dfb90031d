"""The one bridge from async handlers to a synchronous engine.

HTTP (``/v1/completions``, ``/v1/chat/completions``) and the websocket
``complete`` message all run generation through ``GenerationBridge.start``,
so admission control, error mapping, cancellation and metrics happen once:

- **Admission:** at most ``max_inflight`` generations at once (all clients
  together), and at most ``client_limit`` per ``client`` when the caller names
  one (the websocket: ``max_ws_inflight_per_connection`` per connection); the
  next one is refused with ``ClientError("too_many_requests")`` (HTTP 429,
  websocket ``error``). A slot is held until the caller is done *and* every
  thread of the generation has ended, so a generation's threads (a cancelled
  one's included) never outlive its slot.
- **Threads:** each choice runs ``engine.generate`` in its own thread and hands
  chunks to the event loop through a queue. The thread runs with
  ``gate.serving_client`` set to the generation's client (or the generation
  itself), so engines that take turns (``gate.FairTurns``) share their steps
  fairly between clients rather than between threads.
- **Errors:** a prompt the engine rejects (``ValueError``, including
  ``ContextLengthError``) becomes a ``ClientError``; anything else is re-raised
  as ``GenerationFailed``.
- **Cancellation:** one event per generation. It is set when the caller stops
  iterating (disconnect, ``cancel`` message, error), so the engine stops
  between two tokens.
- **Metrics:** latency, time to first token, token counts and one
  ``event=completion`` log line per generation, labelled by endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Hashable
from typing import AsyncIterator

from server.engines.base import (
    ContextLengthError,
    Engine,
    GenerationChunk,
    GenerationRequest,
)
from server.engines.gate import serving_client
from server.errors import ClientError
from server.observability.metrics import Metrics, log_event

_DONE = object()


class GenerationFailed(RuntimeError):
    """The engine failed on a request it had accepted (a server error, not the client's)."""


def client_error(exc: ValueError) -> ClientError:
    """How a prompt the engine rejected is reported to the client."""
    code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else "invalid_value"
    return ClientError(code, str(exc))


class Choice:
    """Accumulates one choice's chunks."""

    def __init__(self, index: int):
        self.index = index
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict] = []
        self.finish_reason: str | None = None
        self.confidence: dict | None = None
        self.prompt_tokens = 0
        self.first_token_at: float | None = None

    def add(self, chunk: GenerationChunk) -> None:
        if chunk.token_ids and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.text.append(chunk.text)
        self.token_ids += chunk.token_ids
        self.logprobs += chunk.logprobs or []
        self.top_logprobs += chunk.top_logprobs or []
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
            self.prompt_tokens = chunk.prompt_tokens or 0
            self.confidence = chunk.confidence

    def tail(self, start: int) -> "Choice":
        """The tokens from ``start`` on, as a choice of their own (logprobs of one streamed event)."""
        part = Choice(self.index)
        part.token_ids = self.token_ids[start:]
        part.logprobs = self.logprobs[start:]
        part.top_logprobs = self.top_logprobs[start:]
        return part


async def _thread_chunks(engine: Engine, request: GenerationRequest, adapter, cancel: threading.Event,
                         client: Hashable | None = None, on_start: Callable[[], None] | None = None,
                         on_exit: Callable[[], None] | None = None) -> AsyncIterator[GenerationChunk]:
    """Iterate ``engine.generate`` in a worker thread; abandoning the iterator cancels it.

    The thread serves ``client`` (``gate.serving_client``). ``on_start`` is called just before the thread
    starts and ``on_exit``, in the thread, once the engine is done with it (before the iterator sees the end).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop closed (shutdown): nobody is listening
            cancel.set()

    def work():
        serving_client.set(client)
        failure = None
        try:
            for chunk in engine.generate(request, adapter, cancel):
                put(chunk)
        except BaseException as exc:  # surfaced to the awaiting handler
            failure = exc
        finally:
            # The slot is given back before the handler hears of the end, so a client that retries at
            # once after an error (a 400, say) is not refused as busy by its own finished request.
            if on_exit is not None:
                on_exit()
            if failure is not None:
                put(failure)
            put(_DONE)

    if on_start is not None:
        on_start()
    try:
        threading.Thread(target=work, daemon=True, name="dynarank-generate").start()
    except BaseException:
        if on_exit is not None:
            on_exit()
        raise
    finished = False
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                finished = True
                return
            if isinstance(item, ValueError):
                raise client_error(item)
            if isinstance(item, BaseException):
                raise GenerationFailed(f"generation failed: {item}") from item
            yield item
    finally:
        if not finished:  # abandoned (disconnect, error): stop the thread
            cancel.set()


class Generation:
    """One admitted request: its choices run concurrently, merged as they come, recorded once."""

    def __init__(self, bridge: "GenerationBridge", endpoint: str, requests: list[GenerationRequest], adapter,
                 *, model_name: str, adapter_id: str | None, cancel: threading.Event | None = None,
                 client: Hashable | None = None):
        self.bridge = bridge
        self.endpoint = endpoint
        self.requests = requests
        self.adapter = adapter
        self.model_name = model_name
        self.adapter_id = adapter_id
        self.cancel = cancel or threading.Event()
        self.choices = [Choice(i) for i in range(len(requests))]
        self.started = time.perf_counter()
        self.client = client
        self._closed = False
        # Who keeps the admission slot: the caller until close(), and each running thread until it ends.
        self._holders = 1
        self._holders_lock = threading.Lock()

    @property
    def adapter_version(self) -> int | None:
        return getattr(self.adapter, "version", None)

    async def chunks(self) -> AsyncIterator[tuple[Choice, GenerationChunk]]:
        """All choices' chunks as they come, tagged with their choice."""
        merged: asyncio.Queue = asyncio.Queue()
        engine = self.bridge.engine

        # Steps are shared fairly between clients: a generation without one is a client of its own.
        client = self.client if self.client is not None else ("generation", id(self))

        async def pump(choice: Choice, request: GenerationRequest):
            if self._closed:  # closed before it began: start no thread
                return
            try:
                async for chunk in _thread_chunks(engine, request, self.adapter, self.cancel, client,
                                                  self._hold, self._unhold):
                    choice.add(chunk)
                    await merged.put((choice, chunk))
            except BaseException as exc:
                await merged.put(exc)
            finally:
                await merged.put(_DONE)

        tasks = [asyncio.create_task(pump(c, r)) for c, r in zip(self.choices, self.requests)]
        running = len(tasks)
        try:
            while running:
                item = await merged.get()
                if item is _DONE:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            self.cancel.set()
            for task in tasks:
                task.cancel()
            self.close()

    async def run(self) -> None:
        async for _ in self.chunks():
            pass

    def text(self, choice: Choice) -> str:
        return "".join(choice.text)

    def usage(self, n: int = 1) -> dict:
        # Choices i*n .. i*n+n-1 share prompt i: count each prompt once.
        prompt = sum(c.prompt_tokens for c in self.choices if c.index % n == 0)
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def close(self) -> None:
        """Cancel, record metrics and give up the caller's hold on the admission slot (once; also for a
        generation never iterated). The slot itself is free once the generation's threads have ended too."""
        if self._closed:
            return
        self._closed = True
        self.cancel.set()
        self._record()
        self._unhold()

    def _hold(self) -> None:
        with self._holders_lock:
            self._holders += 1

    def _unhold(self) -> None:
        with self._holders_lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self.bridge.release(self.client)

    def _record(self) -> None:
        end = time.perf_counter()
        tokens = sum(len(c.token_ids) for c in self.choices)
        firsts = [c.first_token_at for c in self.choices if c.first_token_at]
        metrics = self.bridge.metrics
        if metrics is not None:
            metrics.generated_tokens.inc(tokens)
            metrics.prompt_tokens.inc(sum(c.prompt_tokens for c in self.choices))
            metrics.completion_latency.labels(self.endpoint).observe(end - self.started)
            if firsts:
                metrics.ttft.labels(self.endpoint).observe(min(firsts) - self.started)
                if end > min(firsts) and tokens > 1:
                    metrics.tokens_per_second.set(tokens / (end - min(firsts)))
        log_event("completion", endpoint=self.endpoint, model=self.model_name, adapter=self.adapter_id,
                  choices=len(self.choices), tokens=tokens,
                  ttft_ms=round((min(firsts) - self.started) * 1000, 1) if firsts else None,
                  duration_ms=round((end - self.started) * 1000, 1),
                  finish=",".join(sorted({c.finish_reason or "none" for c in self.choices})))


class GenerationBridge:
    """Admits generations on one engine and runs them (see the module docstring)."""

    def __init__(self, engine: Engine, metrics: Metrics | None = None, max_inflight: int = 32):
        self.engine = engine
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.inflight = 0
        self._by_client: dict[Hashable, int] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def start(self, endpoint: str, requests: list[GenerationRequest], adapter, *, model_name: str,
              adapter_id: str | None = None, cancel: threading.Event | None = None,
              client: Hashable | None = None, client_limit: int | None = None) -> Generation:
        """Admit one request (raises ``ClientError('too_many_requests')`` when full); iterate or close it.

        ``client`` names who asks (a websocket connection): the engine shares its steps fairly between
        clients, and ``client_limit`` caps the generations one client may have in flight.
        """
        with self._lock:
            if self.inflight >= self.max_inflight:
                raise ClientError("too_many_requests", "The server is busy; retry shortly.")
            held = self._by_client.get(client, 0) if client is not None else 0
            if client_limit is not None and client is not None and held >= client_limit:
                raise ClientError("too_many_requests",
                                  f"At most {client_limit} completions in flight on this connection; "
                                  "wait for one to finish, or cancel one.")
            self.inflight += 1
            if client is not None:
                self._by_client[client] = held + 1
        if self.metrics is not None:
            self.metrics.inflight.inc()
        return Generation(self, endpoint, requests, adapter, model_name=model_name, adapter_id=adapter_id,
                          cancel=cancel, client=client)

    def release(self, client: Hashable | None = None) -> None:
        with self._lock:
            self.inflight -= 1
            if client is not None:
                left = self._by_client.get(client, 0) - 1
                if left > 0:
                    self._by_client[client] = left
                else:
                    self._by_client.pop(client, None)
            self._idle.notify_all()
        if self.metrics is not None:
            self.metrics.inflight.dec()

    def inflight_of(self, client: Hashable) -> int:
        """Generations ``client`` has in flight (threads included)."""
        with self._lock:
            return self._by_client.get(client, 0)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no generation holds a slot (threads included); False if ``timeout`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self.inflight == 0, timeout)

    @contextlib.asynccontextmanager
    async def generation(self, *args, **kwargs) -> AsyncIterator[Generation]:
        """``start`` as a context: the generation is closed however the block ends."""
        gen = self.start(*args, **kwargs)
        try:
            yield gen
        finally:
            gen.close()
