"""Token-level helpers every engine shares: prompt layout (FIM), detokenization, stops, sampling."""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import difflib
import functools
import math
from typing import Any

import torch

from adapter_core import use_adapter
from code_signals.prompts import completion_prompt_ids, has_fim
from server.engines.base import ContextLengthError, GenerationChunk, GenerationRequest

_DETOK_CONTEXT = 5  # prompt tokens that seed the incremental decoder (leading-space handling)


def adapter_context(model, adapter):
    """Bind an adapter snapshot (or a per-row list) for the forwards inside the block."""
    if adapter is None:
        return contextlib.nullcontext()
    return use_adapter(model, adapter)


class IncrementalDecoder:
    """Turns token ids into text deltas that never split a UTF-8 character.

    Decodes a short sliding window (previous tokens + new ones) and emits only
    what the new tokens added, holding back while the window ends in an
    incomplete byte sequence (U+FFFD).
    """

    def __init__(self, tokenizer, context_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(context_ids)
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


class StopMatcher:
    """Cuts generated text at the first stop sequence; holds back a possible stop prefix."""

    def __init__(self, stops):
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Append ``delta``; return the text that is now safe to emit."""
        self.text += delta
        if not self.stops:
            return self._emit(len(self.text))
        longest = max(len(s) for s in self.stops)
        start = max(0, self.emitted - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(min(hits))
        return self._emit(len(self.text) - self._held_back())

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        # Longest tail of the text that could still grow into a stop sequence.
        for n in range(min(len(self.text), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out


def is_greedy(temperature: float) -> bool:
    """Temperature 0, or its limit: dividing by a vanishing temperature (1e-300) gives inf/nan."""
    return temperature < 1e-4


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    """Greedy at temperature 0, else temperature + nucleus sampling from ``generator``."""
    if is_greedy(temperature):
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest head whose mass reaches top_p, and always the first token: a top_p below
        # float32's resolution (1e-300 rounds to 0) would otherwise keep nothing, and multinomial fails.
        keep = (torch.cumsum(sorted_p, -1) - sorted_p) < top_p
        keep[0] = True
        pick = torch.multinomial(sorted_p * keep, 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclasses.dataclass
class Prompt:
    ids: list[int]
    healed: str = ""  # text backed off the end of the prompt: the completion must begin with it


# A prompt longer than the context times this many characters is first measured on its head alone.
# Tokenizing megabytes takes seconds and, through the tokenizer's Python side, holds the GIL in
# stretches long enough to stall the event loop (181 ms gaps for 3 MB here); a head of the prompt
# that already overflows the context settles it in milliseconds.
HEAD_CHARS_PER_TOKEN = 16


def encode_prompt(tokenizer, request: GenerationRequest, max_context: int | None = None) -> Prompt:
    """Prompt token ids of a request (FIM layout when it has a suffix); shared by every engine.

    With ``request.fit_context``, a prompt longer than ``prompt_room`` is cut to fit (``fit_to_context``);
    any other is encoded whole, and the engine refuses it if it does not fit (one far too long is refused
    from its head: ``HEAD_CHARS_PER_TOKEN``).
    """
    if max_context and not request.fit_context and len(request.prompt) > max_context * HEAD_CHARS_PER_TOKEN:
        head = tokenizer(request.prompt[: max_context * HEAD_CHARS_PER_TOKEN], add_special_tokens=False)
        if len(head["input_ids"]) >= max_context:
            raise ContextLengthError(f"the prompt has more than {max_context} tokens; this model's context is "
                                     f"{max_context} tokens")
    ids, healed = completion_prompt_ids(
        tokenizer, request.prompt, request.suffix, heal=request.heal, add_special_tokens=request.add_special_tokens
    )
    room = prompt_room(request, max_context) if request.fit_context else None
    if room is not None and len(ids) > room:
        return fit_to_context(tokenizer, request, room, len(ids))
    return Prompt(ids, healed)


def prompt_room(request: GenerationRequest, max_context: int | None) -> int | None:
    """Tokens a cut prompt may take: the context less room for the completion (at most a quarter of it),
    and at most ``request.max_prompt_tokens``; None when neither limits it."""
    rooms = [max_context - min(request.max_tokens, max_context // 4)] if max_context else []
    rooms += [request.max_prompt_tokens] if request.max_prompt_tokens else []
    return min(rooms, default=None)


_FIT_TRIES = 4


def fit_to_context(tokenizer, request: GenerationRequest, room: int, n_ids: int) -> Prompt:
    """The prompt of a code completion cut to ``room`` tokens: the prefix loses its start and the
    suffix its end (the text nearest the cursor matters most), each at a line break when one is in reach.

    The suffix's share is a quarter of the room, the prefix's the rest; what one side does not need goes to
    the other. The pieces are measured apart, so the cut prompt is encoded again and cut further while it is
    still too long; ContextLengthError if it cannot fit at all.
    """
    prefix = request.prompt
    suffix = (request.suffix or "") if has_fim(tokenizer) else ""  # without FIM tokens the prompt has no suffix
    n_prefix, n_suffix = _count(tokenizer, prefix), _count(tokenizer, suffix)
    overhead = max(0, n_ids - n_prefix - n_suffix)  # BOS, FIM markers
    for _ in range(_FIT_TRIES):
        avail = max(0, room - overhead)
        keep_suffix = min(n_suffix, max(avail // 4, avail - n_prefix))
        keep_prefix = min(n_prefix, avail - keep_suffix)
        cut = dataclasses.replace(request, prompt=_tail(tokenizer, prefix, keep_prefix, n_prefix),
                                  suffix=request.suffix if not suffix else _head(tokenizer, suffix, keep_suffix,
                                                                                  n_suffix))
        ids, healed = completion_prompt_ids(tokenizer, cut.prompt, cut.suffix, heal=cut.heal,
                                            add_special_tokens=cut.add_special_tokens)
        if len(ids) <= room:
            return Prompt(ids, healed)
        overhead += len(ids) - room  # the pieces came out longer together than apart: cut that much more
    raise ContextLengthError(f"the prompt does not fit in {room} tokens (the model's context less room for "
                             "the completion, or the editor's prompt budget)")


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def _token_starts(tokenizer, text: str, n_tokens: int) -> list[int]:
    """Where each token of ``text`` starts; proportional estimates for a tokenizer without offsets (the
    caller measures the result again)."""
    if getattr(tokenizer, "is_fast", False):
        return [a for a, _ in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    return [len(text) * i // n_tokens for i in range(n_tokens)]


# Tokens: a cut prefix's start moves in steps of this many as the text before the cursor grows, so the prompts
# of successive keystrokes start alike and share their cached prefill (engines/prefix_cache.py).
TAIL_STRIDE = 128


def _tail(tokenizer, text: str, n: int, n_tokens: int) -> str:
    """The end of ``text`` holding at most its last ``n`` tokens, from the first line start in it when there is
    one; its start moves in steps of TAIL_STRIDE tokens when ``n`` is at least two strides."""
    if n >= n_tokens:
        return text
    if n <= 0:
        return ""
    drop = n_tokens - n
    if n >= 2 * TAIL_STRIDE:  # a stable start costs at most a stride of the room
        drop = -(-drop // TAIL_STRIDE) * TAIL_STRIDE
    start = _token_starts(tokenizer, text, n_tokens)[drop]
    line = text.find("\n", start)
    return text[line + 1:] if 0 <= line < len(text) - 1 else text[start:]


def _head(tokenizer, text: str, n: int, n_tokens: int) -> str:
    """The start of ``text`` holding its first ``n`` tokens, to the last line end in it when there is one."""
    if n >= n_tokens:
        return text
    if n <= 0:
        return ""
    end = _token_starts(tokenizer, text, n_tokens)[n]  # where token n, the first one left out, starts
    line = text.rfind("\n", 0, end)
    return text[:line + 1] if line > 0 else text[:end]


def stop_token_ids(tokenizer, model_eos=()) -> set[int]:
    """Tokens that end a completion: the model's EOS ids and every special token the tokenizer
    defines (end of text, chat turns, FIM and file markers such as ``<|fim_middle|>``, ``<|file_sep|>``)."""
    ids = set(model_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    ids.update(tid for tid, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


class VocabIndex:
    """Which tokens may come next while a healed text is reproduced.

    A token fits ``pending`` text when it starts with it (and goes on) or is a
    prefix of it (the rest follows in later tokens). Special tokens and byte
    fragments never fit.
    """

    def __init__(self, tokenizer):
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        self.texts = texts
        usable = [(text, i) for i, text in enumerate(texts) if text and "\ufffd" not in text and i not in special]
        self._sorted = sorted(usable)
        self._keys = [text for text, _ in self._sorted]
        self._by_text: dict[str, list[int]] = {}
        for text, i in usable:
            self._by_text.setdefault(text, []).append(i)

    def allowed(self, pending: str) -> list[int]:
        out = []
        for j in range(bisect.bisect_left(self._keys, pending), len(self._keys)):
            if not self._keys[j].startswith(pending):
                break
            out.append(self._sorted[j][1])
        for k in range(1, len(pending)):
            out += self._by_text.get(pending[:k], [])
        return out


class CompletionShaper:
    """Shapes a completion the way an editor shows it, a line at a time.

    - A Markdown fence ends it (chat-tuned models wrap code and then explain it).
    - A line that repeats the suffix's next non-blank line ends it: the text is already there.
    - ``mode="line"``: only the first line with content.
    - ``mode="block"``: at a cursor inside a line, ends at the first later line
      indented at or below that line (the statement and its nested block are done);
      at a cursor in a line's indentation, ends where the code dedents below the
      cursor (the rest of the block), or at the next top-level line for a cursor
      at column 0.
    - Blank lines and the newline after the last line are never left dangling.
    - At a cursor after indentation, the first line adds no more leading whitespace.

    Text is held back until its line is complete, so nothing shown is taken back.
    """

    def __init__(self, mode: str | None, prefix: str, suffix: str | None):
        self.mode = mode
        cursor_line = prefix.rsplit("\n", 1)[-1]
        self.base_indent = _indent(cursor_line)
        self.at_line_start = not cursor_line.strip()
        # After indentation the user already has, more leading whitespace would double it.
        self.strip_first = self.at_line_start and cursor_line != ""
        later = (suffix or "").split("\n")[1:]  # the cursor line's own rest is not a line to repeat
        self.suffix_line = next((line.strip() for line in later if line.strip()), None)
        self.buffer = ""  # the line being generated
        self.held = ""  # newlines and blank lines waiting for more content
        self.lines = 0
        self.content = False
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Append generated text; return what is now safe to show."""
        out = []
        self.buffer += delta
        while not self.stopped and "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            out.append(self._line(line))
            if not self.stopped:
                self.held += "\n"
        return "".join(out)

    def flush(self) -> str:
        """The generation ended: the last, unfinished line."""
        if self.stopped:
            return ""
        text = self._line(self.buffer)
        self.buffer, self.stopped = "", True
        return text

    def _block_ends(self, indent: int) -> bool:
        if self.at_line_start and self.base_indent > 0:
            return indent < self.base_indent  # the rest of the block the cursor is in
        return indent <= self.base_indent  # the statement at the cursor (or one top-level item)

    def _line(self, line: str) -> str:
        whole_line = self.lines > 0 or self.at_line_start
        if self.lines == 0 and self.strip_first:
            line = line.lstrip(" \t")
        self.lines += 1
        stripped = line.strip()
        if not stripped:
            self.held += line
            return ""
        if (stripped.startswith("```")
                or (whole_line and self.suffix_line is not None and _repeats(stripped, self.suffix_line))
                or (self.mode == "block" and self.content and self._block_ends(_indent(line)))):
            self.stopped = True
            return ""
        out, self.held = self.held + line, ""
        self.content = True
        if self.mode == "line":
            self.stopped = True
        return out


def _indent(line: str) -> int:
    line = line.expandtabs(4)
    return len(line) - len(line.lstrip())


def _repeats(line: str, suffix_line: str) -> bool:
    """Whether a generated line begins to reproduce the suffix's line (exactly, or nearly for a long one)."""
    head = line[: len(suffix_line)]
    if head == suffix_line:
        return True
    return len(suffix_line) >= 8 and difflib.SequenceMatcher(None, head, suffix_line).ratio() >= 0.85


class TokenStream:
    """Sampled tokens -> ``GenerationChunk``s, identically in every engine.

    Detokenizes incrementally, reproduces and then drops the healed text (so the
    completion starts at the user's cursor), ends at stop tokens and stop
    sequences, and shapes the text when the request asks for it.
    """

    def __init__(self, tokenizer, request: GenerationRequest, prompt: Prompt, stop_ids: set[int],
                 vocab: "VocabIndex | None" = None):
        # Usage counts the prompt as the client sent it: the healed token is still part of it.
        self.n_prompt = len(prompt.ids) + (1 if prompt.healed else 0)
        self.want_logprobs = request.logprobs is not None
        self.stop_ids = stop_ids
        self.vocab = vocab
        self.pending = prompt.healed  # healed text the next tokens must still reproduce
        self.skip = len(prompt.healed)  # characters of output that are the healed text
        self.decoder = IncrementalDecoder(tokenizer, prompt.ids[-_DETOK_CONTEXT:])
        self.stops = StopMatcher(request.stop)
        self.shaper = CompletionShaper(request.mode, request.prompt, request.suffix) if request.trim else None
        self.logprob_sum = 0.0
        self.first_token_logprob: float | None = None
        self.tokens = 0

    def allowed(self) -> list[int] | None:
        """The tokens the next sample may take (while healing), or None for any."""
        return self.vocab.allowed(self.pending) if self.pending else None

    def push(self, token: int, logprob: float | None = None, lps=None, tops=None) -> GenerationChunk:
        """One sampled token as a chunk; the chunk has ``finish_reason`` when the completion ends here."""
        if token in self.stop_ids:
            return self.finish("stop")
        if self.pending:
            piece = self.vocab.texts[token]
            self.pending = "" if piece.startswith(self.pending) else self.pending[len(piece):]
        if logprob is not None:
            self.logprob_sum += logprob
            if self.first_token_logprob is None:
                self.first_token_logprob = logprob
        self.tokens += 1
        text = self._text(self.decoder.push(token))
        if self.stops.stopped:  # a stop sequence: the text before it is the whole completion
            if self.shaper is not None:
                text += self.shaper.flush()
            return self._chunk(text, [token], lps, tops, "stop")
        if self.shaper is not None and self.shaper.stopped:
            return self._chunk(text, [token], lps, tops, "stop")
        return self._chunk(text, [token], lps, tops)

    def finish(self, reason: str) -> GenerationChunk:
        """The last chunk: what was held back, and why it ended."""
        text = "" if reason == "cancelled" else self._flush()
        return self._chunk(text, [], [] if self.want_logprobs else None, None, reason)

    def _text(self, delta: str) -> str:
        if self.skip:
            cut = min(self.skip, len(delta))
            delta, self.skip = delta[cut:], self.skip - cut
        text = self.stops.feed(delta)
        return self.shaper.feed(text) if self.shaper is not None else text

    def _flush(self) -> str:
        text = self.stops.flush()
        if self.shaper is None:
            return text
        return self.shaper.feed(text) + self.shaper.flush()

    def confidence(self) -> dict | None:
        """Mean token log-probability and the first token's probability (when the engine gave logprobs)."""
        if self.first_token_logprob is None:
            return None
        return {"mean_logprob": round(self.logprob_sum / self.tokens, 6),
                "first_token_prob": round(math.exp(self.first_token_logprob), 6)}

    def _chunk(self, text, token_ids, lps, tops, reason=None) -> GenerationChunk:
        if reason is None:
            return GenerationChunk(text=text, token_ids=token_ids, logprobs=lps, top_logprobs=tops)
        return GenerationChunk(text=text, token_ids=token_ids, logprobs=lps, top_logprobs=tops, finish_reason=reason,
                               prompt_tokens=self.n_prompt, confidence=self.confidence())


class TokenizerEngine:
    """The tokenizer-backed half of ``Engine`` every in-tree engine shares."""

    tokenizer: Any
    stop_ids: set[int]  # set by the engine: stop_token_ids(tokenizer, the model's EOS ids)

    max_context: int | None = None  # set by the engine when the model's context is known

    def encode(self, request: GenerationRequest) -> Prompt:
        return encode_prompt(self.tokenizer, request, self.max_context)

    @functools.cached_property
    def vocab(self) -> VocabIndex:
        """Built on first use (a second or so for a 150k vocabulary): only healed requests need it."""
        return VocabIndex(self.tokenizer)

    def token_stream(self, request: GenerationRequest, prompt: Prompt) -> TokenStream:
        return TokenStream(self.tokenizer, request, prompt, self.stop_ids, self.vocab if prompt.healed else None)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def attach(self, adapters) -> None:
        pass

    def close(self) -> None:
        pass
