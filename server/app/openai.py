"""What ``/v1/completions`` and ``/v1/chat/completions`` share: request schemas,
model resolution, feedback records, and one way to answer (JSON or SSE stream).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field, field_validator
from starlette.background import BackgroundTask

from server.app import params
from server.app.params import GenerationParams, MaxTokens, Strict, valid_text
from server.app.state import ServerState
from server.engines.bridge import Generation
from server.errors import ClientError

# --- request schemas -------------------------------------------------------
# The fields /v1/completions shares with the websocket's `complete` and their rules: server/app/params.py.


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(GenerationParams):
    """Temperature, top_p, stop and seed as the websocket's ``complete`` takes them (server/app/params.py)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("model", "user")
    @classmethod
    def _text(cls, value):
        return valid_text(value)

    def seed_of(self, j: int) -> int | None:
        """Choice j's seed: distinct choices of one seeded request sample differently, reproducibly."""
        return None if self.seed is None else self.seed + j

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(Sampling):
    prompt: str | list[str]
    suffix: str | None = None
    max_tokens: MaxTokens = 16
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    # Extensions (docs/api.md): code completion as an editor wants it.
    trim: bool = True  # token healing at the prompt's end, and shaping (fences, suffix repeats, mode)
    mode: Literal["line", "block"] | None = None  # with trim: stop at the end of the line / of the block

    @field_validator("prompt", "suffix")
    @classmethod
    def _prompt_text(cls, value):
        return valid_text(value)

    @property
    def heal(self) -> bool:
        # Healing regenerates the prompt's last token, which echo and per-token logprobs would have to show.
        return self.trim and not self.echo and self.logprobs is None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", "name")
    @classmethod
    def _text(cls, value):
        return valid_text(value)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# --- shared steps ----------------------------------------------------------


def resolve_model(state: ServerState, name: str | None, key_id: str | None):
    """(snapshot or None, adapter id or None, model name to report). Call it off the event loop:
    resolving may read an adapter from disk or wait on a session lock."""
    base = state.settings.served_name
    name = name or base
    if state.adapters is None:
        if name not in (base, state.engine.model_name if state.engine else base):
            raise ClientError("model_not_found", f"The model '{name}' does not exist.", param="model")
        return None, None, name
    try:
        snapshot, adapter_id = state.adapters.resolve(name, key_id)
    except KeyError:
        raise ClientError("model_not_found", f"The model '{name}' does not exist or you do not have access to it.",
                          param="model") from None
    return snapshot, adapter_id, name


def check_max_tokens(state: ServerState, value: int) -> None:
    params.check_max_tokens(value, state.settings.max_tokens_limit)


def record_feedback(state: ServerState, key_id, gen: Generation, rid: str, prompts: list[str]) -> None:
    """Remember each returned choice so feedback on it can be checked (server/feedback/).

    Choice i of a request is ``rid`` (i = 0) or ``rid.i``; a completion on a
    session's model belongs to that session, any other to its model.
    """
    if state.services is None:
        return
    book, _ = state.services.feedback.book_for(key_id, gen.model_name, gen.adapter_id)
    per_prompt = max(1, len(gen.choices) // max(1, len(prompts)))
    for c in gen.choices:
        book.record(rid if c.index == 0 else f"{rid}.{c.index}", version=gen.adapter_version, model=gen.model_name,
                    text=gen.text(c), prompt=prompts[min(c.index // per_prompt, len(prompts) - 1)])


def new_response_id(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())


def base_fields(gen: Generation, obj: str, rid: str, created: int) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": gen.model_name,
            "adapter": gen.adapter_id, "adapter_version": gen.adapter_version}


async def _watch_disconnect(request: Request, gen: Generation) -> None:
    while not gen.cancel.is_set():
        if await request.is_disconnected():
            gen.cancel.set()
            return
        await asyncio.sleep(0.25)


def _sse(payload) -> bytes:
    return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n".encode()


async def respond(request: Request, gen: Generation, *, stream: bool, body: Callable[[], dict],
                  events: Callable[[], AsyncIterator[dict]], usage: Callable[[], dict] | None,
                  on_finished: Callable[[], None], offload: bool = False):
    """Answer one request: a JSON ``body()`` after the run, or SSE ``events()`` then ``[DONE]``.

    ``on_finished`` runs once every choice has finished; ``usage`` (when the
    client asked for it) adds a last streamed event. The stream starts only
    after its first event, so errors raised before it keep their status code.
    ``offload``: build and serialize the JSON body in a worker thread (a large
    one, such as an echoed prompt, would hold up the event loop).
    """
    watcher = asyncio.create_task(_watch_disconnect(request, gen))
    if not stream:
        try:
            await gen.run()
        finally:
            watcher.cancel()
            gen.close()
        await asyncio.to_thread(on_finished)  # a key's first completion reads its feedback books from disk
        if offload:
            return await asyncio.to_thread(lambda: JSONResponse(body()))
        return JSONResponse(body())

    async def all_events():
        try:
            async for event in events():
                yield event
            await asyncio.to_thread(on_finished)
            if usage is not None:
                yield usage()
        finally:
            watcher.cancel()
            gen.close()

    iterator = all_events().__aiter__()
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await iterator.aclose()
        raise

    async def sse_body():
        try:
            if first is not None:
                yield _sse(first)
            async for event in iterator:
                yield _sse(event)
            yield _sse("[DONE]")
        finally:
            await iterator.aclose()

    # The background close covers a response whose body never started (client gone at once).
    return StreamingResponse(sse_body(), media_type="text/event-stream", background=BackgroundTask(gen.close),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
