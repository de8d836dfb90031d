"""OpenAI-compatible HTTP API: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Each choice runs the engine's synchronous generator in its own thread and
hands chunks to the event loop through a queue. One cancel event per request
is set when the client disconnects (or the response is abandoned), so the
engine stops between two tokens.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import AsyncIterator, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from server.app.auth import require_api_key
from server.app.errors import APIError
from server.engines.base import GenerationChunk, GenerationRequest
from server.observability.metrics import log_event

router = APIRouter()

MAX_CHOICES = 32  # prompts x n in one request


# --- request schemas -------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stops) > 16:
            raise APIError(400, "At most 16 stop sequences are allowed.", param="stop", code="invalid_value")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    suffix: str | None = None
    max_tokens: int = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# --- shared plumbing -------------------------------------------------------

def _state(request: Request):
    return request.app.state.dynarank


def _engine(state):
    if state.engine is None:
        raise APIError(503, "No model is loaded.", code="model_not_loaded")
    return state.engine


def resolve_model(state, name: str | None, key_id: str | None):
    """(snapshot or None, adapter id or None, model name to report)."""
    base = state.settings.served_name
    name = name or base
    if state.adapters is None:
        if name not in (base, state.engine.model_name if state.engine else base):
            raise APIError(404, f"The model '{name}' does not exist.", param="model", code="model_not_found")
        return None, None, name
    try:
        snapshot, adapter_id = state.adapters.resolve(name, key_id)
    except KeyError:
        raise APIError(404, f"The model '{name}' does not exist or you do not have access to it.",
                       param="model", code="model_not_found") from None
    return snapshot, adapter_id, name


def _check_max_tokens(state, value: int) -> None:
    limit = state.settings.max_tokens_limit
    if value > limit:
        raise APIError(400, f"max_tokens is {value}; this server allows at most {limit}.",
                       param="max_tokens", code="invalid_value")


class _Inflight:
    """Admission control: 429 beyond ``settings.max_inflight_requests``; drives the gauge."""

    def __init__(self, state):
        self.state = state

    def __enter__(self):
        extras = self.state.extras
        if extras.get("inflight", 0) >= self.state.settings.max_inflight_requests:
            raise APIError(429, "The server is busy; retry shortly.", code="too_many_requests",
                           headers={"Retry-After": "1"})
        extras["inflight"] = extras.get("inflight", 0) + 1
        if self.state.metrics:
            self.state.metrics.inflight.inc()
        return self

    def __exit__(self, *exc):
        self.state.extras["inflight"] -= 1
        if self.state.metrics:
            self.state.metrics.inflight.dec()


_DONE = object()


async def run_generation(engine, request: GenerationRequest, adapter, cancel: threading.Event
                         ) -> AsyncIterator[GenerationChunk]:
    """Iterate ``engine.generate`` in a worker thread; abandoning the iterator cancels it."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop closed (shutdown): nobody is listening
            cancel.set()

    def work():
        try:
            for chunk in engine.generate(request, adapter, cancel):
                put(chunk)
        except BaseException as exc:  # surfaced to the awaiting handler
            put(exc)
        finally:
            put(_DONE)

    threading.Thread(target=work, daemon=True, name="dynarank-generate").start()
    finished = False
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                finished = True
                return
            if isinstance(item, BaseException):
                if isinstance(item, ValueError):
                    raise APIError(400, str(item), param="prompt", code="context_length_exceeded"
                                   if "context" in str(item) else "invalid_value")
                raise item
            yield item
    finally:
        if not finished:  # abandoned (disconnect, error): stop the thread; the event is per request
            cancel.set()


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    while not cancel.is_set():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(0.25)


class Choice:
    """Accumulates one choice's chunks."""

    def __init__(self, index: int):
        self.index = index
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict] = []
        self.finish_reason: str | None = None
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


class Job:
    """One API request's choices: runs them, merges their chunks, records metrics."""

    def __init__(self, request: Request, state, endpoint: str, gen_requests: list[GenerationRequest], adapter,
                 *, n: int, model_name: str, adapter_id: str | None):
        self.request = request
        self.n = n
        self.model_name = model_name
        self.adapter_id = adapter_id
        self.state = state
        self.engine = _engine(state)
        self.endpoint = endpoint
        self.gen_requests = gen_requests
        self.adapter = adapter
        self.cancel = threading.Event()
        self.choices = [Choice(i) for i in range(len(gen_requests))]
        self.started = time.perf_counter()

    async def chunks(self) -> AsyncIterator[tuple[Choice, GenerationChunk]]:
        """All choices' chunks as they come, tagged with their choice."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice, gen: GenerationRequest):
            try:
                async for chunk in run_generation(self.engine, gen, self.adapter, self.cancel):
                    choice.add(chunk)
                    await merged.put((choice, chunk))
            except BaseException as exc:
                await merged.put(exc)
            finally:
                await merged.put(_DONE)

        tasks = [asyncio.create_task(pump(c, g)) for c, g in zip(self.choices, self.gen_requests)]
        watcher = asyncio.create_task(_watch_disconnect(self.request, self.cancel))
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
            watcher.cancel()
            for task in tasks:
                task.cancel()
            self._record()

    async def run(self) -> None:
        async for _ in self.chunks():
            pass

    def usage(self) -> dict:
        # Choices i*n .. i*n+n-1 share prompt i: count each prompt once.
        prompt = sum(c.prompt_tokens for c in self.choices if c.index % self.n == 0)
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _record(self) -> None:
        end = time.perf_counter()
        tokens = sum(len(c.token_ids) for c in self.choices)
        firsts = [c.first_token_at for c in self.choices if c.first_token_at]
        metrics = self.state.metrics
        if metrics:
            metrics.generated_tokens.inc(tokens)
            metrics.prompt_tokens.inc(sum(c.prompt_tokens for c in self.choices))
            metrics.completion_latency.labels(self.endpoint).observe(end - self.started)
            if firsts:
                metrics.ttft.labels(self.endpoint).observe(min(firsts) - self.started)
                if end > min(firsts) and tokens > 1:
                    metrics.tokens_per_second.set(tokens / (end - min(firsts)))
        log_event("completion", endpoint=self.endpoint, model=self.model_name, adapter=self.adapter_id, choices=len(self.choices), tokens=tokens,
                  ttft_ms=round((min(firsts) - self.started) * 1000, 1) if firsts else None,
                  duration_ms=round((end - self.started) * 1000, 1),
                  finish=",".join(sorted({c.finish_reason or "none" for c in self.choices})))


def record_feedback(state, key_id, job: Job, rid: str, prompts: list[str]) -> None:
    """Remember each returned choice so feedback on it can be checked (server/feedback/).

    Choice i of a request is ``rid`` (i = 0) or ``rid.i``; a completion on a
    session's model belongs to that session, any other to its model.
    """
    registry = state.extras.get("feedback")
    if registry is None:
        return
    book, _ = registry.book_for(key_id, job.model_name, job.adapter_id)
    version = getattr(job.adapter, "version", None)
    per_prompt = max(1, len(job.choices) // max(1, len(prompts)))
    for c in job.choices:
        book.record(rid if c.index == 0 else f"{rid}.{c.index}", version=version, model=job.model_name,
                    text="".join(c.text), prompt=prompts[min(c.index // per_prompt, len(prompts) - 1)])


def _sse(payload) -> bytes:
    return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n".encode()


async def _respond_stream(job: Job, events: AsyncIterator[dict]) -> StreamingResponse:
    """Start streaming only after the first event so early errors keep their status code."""
    iterator = events.__aiter__()
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        first = None

    async def body():
        try:
            if first is not None:
                yield _sse(first)
            async for event in iterator:
                yield _sse(event)
            yield _sse("[DONE]")
        finally:
            job.cancel.set()
            await iterator.aclose()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _base_fields(job: Job, obj: str, rid: str, created: int) -> dict:
    snapshot = job.adapter
    return {
        "id": rid, "object": obj, "created": created, "model": job.model_name,
        "adapter": job.adapter_id, "adapter_version": getattr(snapshot, "version", None),
    }


# --- /v1/completions -------------------------------------------------------

def _legacy_logprobs(engine, choice: Choice, prompt_ids: list[int] | None, offset0: int) -> dict:
    tokens = [engine.token_text(t) for t in (prompt_ids or [])] + [engine.token_text(t) for t in choice.token_ids]
    lps: list = [None] * len(prompt_ids or []) + list(choice.logprobs)
    tops: list = [None] * len(prompt_ids or []) + (list(choice.top_logprobs) or [None] * len(choice.token_ids))
    offsets, pos = [], offset0
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, key_id=Depends(require_api_key)):
    state = _state(request)
    engine = _engine(state)
    _check_max_tokens(state, body.max_tokens)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise APIError(400, "prompt must not be empty.", param="prompt", code="invalid_value")
    if len(prompts) * body.n > MAX_CHOICES:
        raise APIError(400, f"At most {MAX_CHOICES} choices (prompts x n) per request.", param="n",
                       code="invalid_value")
    # Off the event loop: resolving may read an adapter from disk or wait on a session lock.
    snapshot, adapter_id, model_name = await asyncio.to_thread(resolve_model, state, body.model, key_id)
    stops = body.stops()
    gens = [
        GenerationRequest(prompt=p, suffix=body.suffix, max_tokens=body.max_tokens, temperature=body.temperature,
                          top_p=body.top_p, stop=stops,
                          seed=None if body.seed is None else body.seed + j, logprobs=body.logprobs)
        for p in prompts for j in range(body.n)
    ]
    prompt_ids = [engine.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts] \
        if body.echo and body.logprobs is not None else None
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    inflight = _Inflight(state).__enter__()
    job = Job(request, state, "/v1/completions", gens, snapshot, n=body.n, model_name=model_name,
              adapter_id=adapter_id)

    def prompt_of(choice: Choice) -> str:
        return prompts[choice.index // body.n]

    def logprobs_of(choice: Choice, echo_prompt: bool, offset0: int = 0):
        if body.logprobs is None:
            return None
        ids = prompt_ids[choice.index // body.n] if (echo_prompt and prompt_ids) else None
        return _legacy_logprobs(engine, choice, ids, offset0)

    if not body.stream:
        try:
            await job.run()
        finally:
            inflight.__exit__()
        record_feedback(state, key_id, job, rid, prompts)
        choices = []
        for c in job.choices:
            text = "".join(c.text)
            choices.append({"text": prompt_of(c) + text if body.echo else text, "index": c.index,
                            "logprobs": logprobs_of(c, body.echo), "finish_reason": c.finish_reason})
        return JSONResponse({**_base_fields(job, "text_completion", rid, created), "choices": choices,
                             "usage": job.usage()})

    async def events():
        try:
            base = _base_fields(job, "text_completion", rid, created)
            echoed: set[int] = set()
            text_len: dict[int, int] = {}
            pending: dict[int, Choice] = {}  # tokens whose text is still held back
            async for choice, chunk in job.chunks():
                text = chunk.text
                if body.echo and choice.index not in echoed:
                    echoed.add(choice.index)
                    text = prompt_of(choice) + text
                if not text and not chunk.finish_reason:
                    continue
                lp = None
                if body.logprobs is not None:
                    # Report the tokens since this choice's previous event.
                    part = Choice(choice.index)
                    seen = pending.get(choice.index, 0)
                    part.token_ids = choice.token_ids[seen:]
                    part.logprobs = choice.logprobs[seen:]
                    part.top_logprobs = choice.top_logprobs[seen:]
                    pending[choice.index] = len(choice.token_ids)
                    lp = _legacy_logprobs(engine, part, None, text_len.get(choice.index, 0))
                text_len[choice.index] = text_len.get(choice.index, 0) + len(text)
                yield {**base, "choices": [{"text": text, "index": choice.index, "logprobs": lp,
                                            "finish_reason": chunk.finish_reason}]}
            record_feedback(state, key_id, job, rid, prompts)
            if body.stream_options and body.stream_options.include_usage:
                yield {**base, "choices": [], "usage": job.usage()}
        finally:
            inflight.__exit__()

    return await _respond_stream(job, events())


# --- /v1/chat/completions --------------------------------------------------

def _chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "This model has no chat template; use /v1/completions.", param="messages",
                       code="chat_not_supported")
    convo = [{"role": m.role, "content": m.text()} for m in messages]
    return tokenizer.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)


def _chat_logprobs(engine, choice_part: Choice) -> dict:
    content = []
    tops = choice_part.top_logprobs or [{}] * len(choice_part.token_ids)
    for tok, lp, top in zip(choice_part.token_ids, choice_part.logprobs, tops):
        text = engine.token_text(tok)
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                         for t, v in (top or {}).items()]})
    return {"content": content}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, key_id=Depends(require_api_key)):
    state = _state(request)
    engine = _engine(state)
    max_tokens = body.max_completion_tokens or body.max_tokens or min(256, state.settings.max_tokens_limit)
    _check_max_tokens(state, max_tokens)
    # Off the event loop: resolving may read an adapter from disk or wait on a session lock.
    snapshot, adapter_id, model_name = await asyncio.to_thread(resolve_model, state, body.model, key_id)
    prompt = _chat_prompt(engine.tokenizer, body.messages)
    top = (body.top_logprobs or 0) if body.logprobs else None
    gens = [
        GenerationRequest(prompt=prompt, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          stop=body.stops(), seed=None if body.seed is None else body.seed + j, logprobs=top,
                          add_special_tokens=False)
        for j in range(body.n)
    ]
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    inflight = _Inflight(state).__enter__()
    job = Job(request, state, "/v1/chat/completions", gens, snapshot, n=body.n, model_name=model_name,
              adapter_id=adapter_id)

    if not body.stream:
        try:
            await job.run()
        finally:
            inflight.__exit__()
        record_feedback(state, key_id, job, rid, [prompt])
        choices = [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                    "logprobs": _chat_logprobs(engine, c) if body.logprobs else None,
                    "finish_reason": c.finish_reason} for c in job.choices]
        return JSONResponse({**_base_fields(job, "chat.completion", rid, created), "choices": choices,
                             "usage": job.usage()})

    async def events():
        try:
            base = _base_fields(job, "chat.completion.chunk", rid, created)
            seen: dict[int, int] = {}
            async for choice, chunk in job.chunks():
                if choice.index not in seen:
                    # The role comes first, once the choice is known to run (errors keep their status).
                    seen[choice.index] = 0
                    yield {**base, "choices": [{"index": choice.index, "logprobs": None, "finish_reason": None,
                                                "delta": {"role": "assistant", "content": ""}}]}
                if not chunk.text and not chunk.finish_reason:
                    continue
                lp = None
                if body.logprobs:
                    part = Choice(choice.index)
                    start = seen.get(choice.index, 0)
                    part.token_ids = choice.token_ids[start:]
                    part.logprobs = choice.logprobs[start:]
                    part.top_logprobs = choice.top_logprobs[start:]
                    seen[choice.index] = len(choice.token_ids)
                    lp = _chat_logprobs(engine, part)
                delta = {"content": chunk.text} if chunk.text else {}
                yield {**base, "choices": [{"index": choice.index, "delta": delta, "logprobs": lp,
                                            "finish_reason": chunk.finish_reason}]}
            record_feedback(state, key_id, job, rid, [prompt])
            if body.stream_options and body.stream_options.include_usage:
                yield {**base, "choices": [], "usage": job.usage()}
        finally:
            inflight.__exit__()

    return await _respond_stream(job, events())


# --- /v1/models ------------------------------------------------------------

@router.get("/v1/models")
async def list_models(request: Request, key_id=Depends(require_api_key)):
    state = _state(request)
    created = int(state.extras.get("started", time.time()))
    data = [{"id": state.settings.served_name, "object": "model", "created": created, "owned_by": "dynarank"}]
    if state.adapters is not None:
        data += await asyncio.to_thread(state.adapters.list_for, key_id)
    return {"object": "list", "data": data}
