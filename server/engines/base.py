"""The generation-engine interface shared by the HTTP API and the websocket.

An engine generates from the frozen base model with an adapter snapshot given
per call (``None`` = base model). ``generate`` is synchronous and is run in a
worker thread by the API layers; it yields chunks as tokens are produced and
stops at once when ``cancel`` is set.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Iterator, Protocol

from server.engines.gate import ServingGate


@dataclasses.dataclass
class GenerationRequest:
    prompt: str  # text before the cursor (or the whole prompt)
    suffix: str | None = None  # text after the cursor: fill-in-the-middle when the model has FIM tokens
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # top-k logprobs per token, None = off
    add_special_tokens: bool = True  # False when the prompt is already fully formatted (chat template)
    heal: bool = False  # back off the prompt's last token and regenerate it (token healing)
    trim: bool = False  # shape the text as an editor shows it (decoding.CompletionShaper)
    mode: str | None = None  # with trim: "line" or "block" (None: only fences and suffix repeats end it)
    # Cut a prompt too long for the model's context to fit (decoding.fit_to_context): code completion at a
    # cursor, where the text nearest it matters most. Off: such a prompt is refused (context_length_exceeded).
    fit_context: bool = False
    # With fit_context: cut the prompt to this many tokens even where the model's context holds more (an
    # editor's budget; on a CPU the prompt's prefill is most of a completion's time). None: the context decides.
    max_prompt_tokens: int | None = None


@dataclasses.dataclass
class GenerationChunk:
    text: str  # new text since the previous chunk (stop sequences already cut)
    token_ids: list[int]
    logprobs: list[float] | None = None  # logprob of each sampled token
    finish_reason: str | None = None  # set on the last chunk: "stop" | "length" | "cancelled"
    top_logprobs: list[dict[str, float]] | None = None  # per token, when request.logprobs > 0
    prompt_tokens: int | None = None  # set on the last chunk
    confidence: dict | None = None  # on the last chunk: {"mean_logprob", "first_token_prob"}


@dataclasses.dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    logprobs: list[float] | None = None


class Engine(Protocol):
    """What the app needs of a generation engine (``hf``, ``vllm``; see ``server.engines.ENGINES``).

    ``generate`` is synchronous: ``server.engines.bridge`` runs it in a thread.
    ``gate`` is the ``ServingGate`` the engine holds open while it generates, so
    background training yields to it.
    """

    model_name: str
    tokenizer: Any
    gate: ServingGate

    def count_tokens(self, text: str) -> int: ...

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included (logprobs)."""
        ...

    def generate(
        self, request: GenerationRequest, adapter=None, cancel: threading.Event | None = None
    ) -> Iterator[GenerationChunk]:
        """Yield chunks; the last one carries finish_reason. Raises ContextLengthError for too long a prompt."""
        ...

    def attach(self, adapters) -> None:
        """Called once the app's adapter resolver exists (engines that track adapter versions use it)."""
        ...

    def close(self) -> None:
        """Release the engine (at app shutdown)."""
        ...


class ContextLengthError(ValueError):
    """The prompt does not leave room for a single new token."""
