"""``POST /v1/completions``: OpenAI's legacy completions, with ``suffix`` for fill-in-the-middle."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from server.app import openai
from server.app.deps import AUTH, BridgeDep, EngineDep, Owner, StateDep
from server.engines.base import GenerationRequest
from server.engines.bridge import Choice
from server.errors import ClientError

router = APIRouter(tags=["completions"], dependencies=AUTH)

MAX_CHOICES = 32  # prompts x n in one request


def prompt_token_texts(engine, prompt: str) -> list[str]:
    """The prompt's tokens as text, for ``echo`` with ``logprobs``. Call it off the event loop: a prompt
    of megabytes takes seconds to tokenize."""
    ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    texts = {t: engine.token_text(t) for t in set(ids)}  # each distinct token decoded once
    return [texts[t] for t in ids]


def legacy_logprobs(engine, choice: Choice, prompt_tokens: list[str] | None, offset0: int) -> dict:
    prompt_tokens = prompt_tokens or []
    tokens = prompt_tokens + [engine.token_text(t) for t in choice.token_ids]
    lps: list = [None] * len(prompt_tokens) + list(choice.logprobs)
    tops: list = [None] * len(prompt_tokens) + (list(choice.top_logprobs) or [None] * len(choice.token_ids))
    offsets, pos = [], offset0
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


@router.post("/v1/completions")
async def completions(body: openai.CompletionRequest, request: Request, state: StateDep, engine: EngineDep,
                      bridge: BridgeDep, key_id: Owner):
    openai.check_max_tokens(state, body.max_tokens)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise ClientError("invalid_value", "prompt must not be empty.", param="prompt")
    if len(prompts) * body.n > MAX_CHOICES:
        raise ClientError("invalid_value", f"At most {MAX_CHOICES} choices (prompts x n) per request.", param="n")
    snapshot, adapter_id, model_name = await asyncio.to_thread(openai.resolve_model, state, body.model, key_id)
    stops = body.stops()
    requests = [
        GenerationRequest(prompt=p, suffix=body.suffix, max_tokens=body.max_tokens, temperature=body.temperature,
                          top_p=body.top_p, stop=stops, seed=body.seed_of(j), logprobs=body.logprobs,
                          heal=body.heal, trim=body.trim, mode=body.mode)
        for p in prompts for j in range(body.n)
    ]
    rid, created = openai.new_response_id("cmpl")
    gen = bridge.start("/v1/completions", requests, snapshot, model_name=model_name, adapter_id=adapter_id)
    base = openai.base_fields(gen, "text_completion", rid, created)

    def prompt_of(choice: Choice) -> str:
        return prompts[choice.index // body.n]

    def json_body() -> dict:  # with echo, in a worker thread (offload below): it tokenizes the prompts
        prompt_tokens = [prompt_token_texts(engine, p) for p in prompts] \
            if body.echo and body.logprobs is not None else None
        choices = []
        for c in gen.choices:
            text = gen.text(c)
            logprobs = None
            if body.logprobs is not None:
                echoed = prompt_tokens[c.index // body.n] if prompt_tokens else None
                logprobs = legacy_logprobs(engine, c, echoed, 0)
            choices.append({"text": prompt_of(c) + text if body.echo else text, "index": c.index,
                            "logprobs": logprobs, "finish_reason": c.finish_reason, "confidence": c.confidence})
        return {**base, "choices": choices, "usage": gen.usage(body.n)}

    async def events():
        echoed: set[int] = set()
        text_len: dict[int, int] = {}
        reported: dict[int, int] = {}  # tokens already covered by an event's logprobs, per choice
        async for choice, chunk in gen.chunks():
            text = chunk.text
            if body.echo and choice.index not in echoed:
                echoed.add(choice.index)
                text = prompt_of(choice) + text
            if not text and not chunk.finish_reason:
                continue
            lp = None
            if body.logprobs is not None:
                part = choice.tail(reported.get(choice.index, 0))
                reported[choice.index] = len(choice.token_ids)
                lp = legacy_logprobs(engine, part, None, text_len.get(choice.index, 0))
            text_len[choice.index] = text_len.get(choice.index, 0) + len(text)
            yield {**base, "choices": [{"text": text, "index": choice.index, "logprobs": lp,
                                        "finish_reason": chunk.finish_reason, "confidence": chunk.confidence}]}

    return await openai.respond(request, gen, stream=body.stream, body=json_body, events=events,
                         usage=(lambda: {**base, "choices": [], "usage": gen.usage(body.n)})
                         if body.include_usage else None,
                         on_finished=lambda: openai.record_feedback(state, key_id, gen, rid, prompts),
                         offload=body.echo)  # an echoed prompt may be megabytes of JSON
