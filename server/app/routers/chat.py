"""``POST /v1/chat/completions``: the model's chat template over the same generation path."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from server.app import openai
from server.app.deps import AUTH, BridgeDep, EngineDep, Owner, StateDep
from server.engines.base import GenerationRequest
from server.engines.bridge import Choice
from server.errors import ClientError

router = APIRouter(tags=["chat"], dependencies=AUTH)


def chat_prompt(tokenizer, messages: list[openai.ChatMessage]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ClientError("chat_not_supported", "This model has no chat template; use /v1/completions.",
                          param="messages")
    convo = [{"role": m.role, "content": m.text()} for m in messages]
    return tokenizer.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)


def chat_logprobs(engine, choice: Choice) -> dict:
    content = []
    tops = choice.top_logprobs or [{}] * len(choice.token_ids)
    for tok, lp, top in zip(choice.token_ids, choice.logprobs, tops):
        text = engine.token_text(tok)
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                         for t, v in (top or {}).items()]})
    return {"content": content}


@router.post("/v1/chat/completions")
async def chat_completions(body: openai.ChatCompletionRequest, request: Request, state: StateDep, engine: EngineDep,
                           bridge: BridgeDep, key_id: Owner):
    max_tokens = body.max_completion_tokens or body.max_tokens or min(256, state.settings.max_tokens_limit)
    openai.check_max_tokens(state, max_tokens)
    snapshot, adapter_id, model_name = await asyncio.to_thread(openai.resolve_model, state, body.model, key_id)
    prompt = await asyncio.to_thread(chat_prompt, engine.tokenizer, body.messages)  # templating long messages
    top = (body.top_logprobs or 0) if body.logprobs else None
    requests = [
        GenerationRequest(prompt=prompt, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          stop=body.stops(), seed=body.seed_of(j), logprobs=top, add_special_tokens=False)
        for j in range(body.n)
    ]
    rid, created = openai.new_response_id("chatcmpl")
    gen = bridge.start("/v1/chat/completions", requests, snapshot, model_name=model_name, adapter_id=adapter_id)

    def json_body() -> dict:
        choices = [{"index": c.index, "message": {"role": "assistant", "content": gen.text(c)},
                    "logprobs": chat_logprobs(engine, c) if body.logprobs else None,
                    "finish_reason": c.finish_reason} for c in gen.choices]
        return {**openai.base_fields(gen, "chat.completion", rid, created), "choices": choices,
                "usage": gen.usage(body.n)}

    base = openai.base_fields(gen, "chat.completion.chunk", rid, created)

    async def events():
        reported: dict[int, int] = {}  # tokens already covered by an event's logprobs, per choice
        async for choice, chunk in gen.chunks():
            if choice.index not in reported:
                # The role comes first, once the choice is known to run (errors keep their status).
                reported[choice.index] = 0
                yield {**base, "choices": [{"index": choice.index, "logprobs": None, "finish_reason": None,
                                            "delta": {"role": "assistant", "content": ""}}]}
            if not chunk.text and not chunk.finish_reason:
                continue
            lp = None
            if body.logprobs:
                lp = chat_logprobs(engine, choice.tail(reported[choice.index]))
                reported[choice.index] = len(choice.token_ids)
            delta = {"content": chunk.text} if chunk.text else {}
            yield {**base, "choices": [{"index": choice.index, "delta": delta, "logprobs": lp,
                                        "finish_reason": chunk.finish_reason}]}

    return await openai.respond(request, gen, stream=body.stream, body=json_body, events=events,
                         usage=(lambda: {**base, "choices": [], "usage": gen.usage(body.n)})
                         if body.include_usage else None,
                         on_finished=lambda: openai.record_feedback(state, key_id, gen, rid, [prompt]))
