"""Training examples from edits and from whole files.

An example is one token sequence: context tokens (loss weight 0) followed by
target tokens (weighted by class). An edit's context is exactly the prompt the
serving engine builds for a completion where the edit starts
(`code_signals.prompts`): `<|fim_prefix|> before <|fim_suffix|> after
<|fim_middle|>` for a share of the edits with text after them (`fim_ratio`) when
the tokenizer has FIM tokens, the text before otherwise, with its last token
backed off (token healing) and moved to the targets.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from .align import align_with_errors
from .classes import Span, TokenClass
from .classify import classify
from .edits import NEW_CODE, changed_regions, classify_edit_type, is_whitespace_only
from .errors import CodeSignalsError
from .languages import detect_language
from .prompts import FIM_TOKENS, completion_prompt_ids
from .walker import chunk_ranges
from .weights import resolve_table

# Documents up to this size are classified whole (right parse context); larger
# ones only around each edit.
CLASSIFY_WHOLE_CHARS = 300_000
_CHARS_PER_TOKEN = 8  # generous: windows of text are cut before tokenizing
_WORD_TAIL = re.compile(r"\w*")


@dataclass
class TrainingExample:
    input_ids: list[int]
    loss_weights: list[float]  # 0.0 for context tokens
    token_classes: list[int]  # TokenClass per token (special tokens: OTHER)
    edit_type: str  # "new_code" | "modification" | "bug_fix"
    path: str | None
    language: str
    target_text: str = ""
    target_start: int = 0  # character range of the targets in the document
    target_end: int = 0
    fim: bool = False
    weight: float = 1.0  # example weight: accepted completions count more than plain edits
    # The completion request whose prompt the context is (edit examples): prefix
    # text[a:b] (the cursor at b), suffix text[c:d] or None for a prefix-only prompt.
    prefix_range: tuple[int, int] | None = None
    suffix_range: tuple[int, int] | None = None
    in_error: list[bool] = field(
        default_factory=list
    )  # token lies in a parse-error region

    @property
    def num_targets(self) -> int:
        return sum(1 for w in self.loss_weights if w > 0)


class ExampleBuilder:
    """Builds TrainingExamples with a Hugging Face fast tokenizer.

    max_tokens: length cap of one example (context + targets + FIM markers);
    targets take at most 3/4 of it, the rest is context.
    max_examples: cap per edit (the largest changed regions are kept).
    fim_ratio: the share of edit examples laid out fill-in-the-middle, with the
    text after the edit as suffix, when there is such text and the tokenizer has
    FIM tokens (the rest are prefix-only). Both are prompts the engine serves:
    FIM for a cursor inside a document, prefix-only at its end or over plain
    `/v1/completions`. Default 0: prefix-only.
    weights: overrides for DEFAULT_WEIGHTS.
    """

    def __init__(
        self,
        tokenizer,
        max_tokens: int = 256,
        max_examples: int = 4,
        fim_ratio: float = 0.0,
        weights: Mapping | None = None,
    ):
        if max_tokens < 16:
            raise CodeSignalsError(f"max_tokens must be at least 16, got {max_tokens}")
        if max_examples < 1:
            raise CodeSignalsError(
                f"max_examples must be at least 1, got {max_examples}"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise CodeSignalsError(
                "ExampleBuilder needs a Hugging Face *fast* tokenizer (character offsets)"
            )
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.max_examples = max_examples
        if not 0 <= fim_ratio <= 1:
            raise CodeSignalsError(f"fim_ratio must be in [0, 1], got {fim_ratio}")
        self.fim_ratio = fim_ratio
        self.weights = resolve_table(weights)
        vocab = tokenizer.get_vocab()
        ids = [vocab.get(t) for t in FIM_TOKENS]
        self.fim_ids: tuple[int, int, int] | None = (
            tuple(ids) if None not in ids else None
        )

    # ------------------------------------------------------------ edits

    def from_edit(
        self,
        before: str,
        after: str,
        path: str | None = None,
        language: str | None = None,
    ) -> list[TrainingExample]:
        """Examples for the regions that changed from `before` to `after`.
        Whitespace-only changes and pure deletions give no example."""
        if not isinstance(before, str) or not isinstance(after, str):
            raise CodeSignalsError("from_edit needs str before and after texts")
        lang = detect_language(path, after, language)
        regions = []
        for change in changed_regions(before, after):
            old, new = change.old(before), change.new(after)
            if not new.strip() or is_whitespace_only(old, new):
                continue
            regions.append((change, classify_edit_type(old, new)))
        # Keep the biggest regions, in document order.
        regions.sort(key=lambda r: r[0].after_start - r[0].after_end)
        regions = sorted(regions[: self.max_examples], key=lambda r: r[0].after_start)
        if not regions:
            return []
        whole = classify(after, lang) if len(after) <= CLASSIFY_WHOLE_CHARS else None
        examples = []
        for change, edit_type in regions:
            example = self._edit_example(
                after, change.after_start, change.after_end, whole, lang
            )
            if example is not None:
                example.edit_type, example.path = edit_type, path
                examples.append(example)
        return examples

    def _edit_example(self, text, start, end, whole, lang) -> TrainingExample | None:
        # Finish the word the edit ends in: the model should not learn to stop mid-name.
        end = _WORD_TAIL.match(text, end).end()
        window = self.max_tokens * _CHARS_PER_TOKEN
        end = min(end, start + window)
        lo = max(0, start - window)
        hi = min(len(text), end + window) if self._wants_fim(text, start, end) else None
        spans = whole if whole is not None else _shift(classify(text[lo : hi or end], lang), lo)
        return self._served_example(text, lo, start, end, hi, spans, lang)

    def _wants_fim(self, text: str, start: int, end: int) -> bool:
        """FIM for a share ``fim_ratio`` of the edits that have text after them, when the model
        has FIM tokens. The choice hashes the position, so a replay builds the same examples."""
        if self.fim_ids is None or self.fim_ratio <= 0 or not text[end:].strip():
            return False
        return zlib.crc32(f"{start}:{end}:{len(text)}".encode()) % 10_000 < self.fim_ratio * 10_000

    def _served_example(self, text, lo, start, end, hi, spans, lang) -> TrainingExample | None:
        """Context: the prompt the engine builds for a completion at ``start`` (prefix
        ``text[lo:start]``, suffix ``text[end:hi]`` when ``hi`` is given, last prefix token
        healed: code_signals.prompts). Targets: the healed text and the edit."""
        fim = hi is not None
        budget = self.max_tokens - (3 if fim else 0)
        n_mid = min(len(self._encode(text, start, end, spans)[0]) + 1, budget * 3 // 4)
        room = budget - n_mid
        pre_ids, _, _, pre_offsets = self._encode(text, lo, start, spans)
        suf_ids, _, _, suf_offsets = self._encode(text, end, hi, spans) if fim else ([], [], [], [])
        n_suf = min(len(suf_ids), max(room // 3, room - len(pre_ids)))
        n_pre = min(len(pre_ids), room - n_suf)
        # Cut the windows at token boundaries so the prompt fits its share of the budget.
        lo = pre_offsets[len(pre_ids) - n_pre][0] if n_pre else start
        hi = suf_offsets[n_suf - 1][1] if n_suf else end
        context, healed = completion_prompt_ids(self.tokenizer, text[lo:start], text[end:hi] if fim else None)
        target_start = start - len(healed)
        mid_ids, mid_cls, mid_err, mid_offsets = self._encode(text, target_start, end, spans)
        n_mid = min(len(mid_ids), self.max_tokens - len(context), budget * 3 // 4)
        if n_mid <= 0 or not context:
            return None
        target_end = mid_offsets[n_mid - 1][1]
        return TrainingExample(
            input_ids=context + mid_ids[:n_mid],
            loss_weights=[0.0] * len(context) + [self.weights[c] for c in mid_cls[:n_mid]],
            # Context tokens only condition; their classes are not used.
            token_classes=[int(TokenClass.OTHER)] * len(context) + [int(c) for c in mid_cls[:n_mid]],
            edit_type=NEW_CODE,
            path=None,
            language=lang,
            target_text=text[target_start:target_end],
            target_start=target_start,
            target_end=target_end,
            fim=fim,
            in_error=[False] * len(context) + mid_err[:n_mid],
            prefix_range=(lo, start),
            suffix_range=(end, hi) if fim else None,
        )

    # ------------------------------------------------------------ files

    def from_file(
        self,
        text: str,
        path: str | None = None,
        language: str | None = None,
        max_examples: int | None = None,
    ) -> list[TrainingExample]:
        """Examples covering a whole file (repository fine-tuning): the file is cut
        at syntax boundaries into chunks of about max_tokens tokens; every token
        is a target. `max_examples` (default: no cap) bounds the count."""
        if not isinstance(text, str):
            raise CodeSignalsError("from_file needs str text")
        lang = detect_language(path, text, language)
        if not text.strip():
            return []
        spans = classify(text, lang)
        examples: list[TrainingExample] = []
        for ids, classes, errors, offsets in self._file_pieces(
            text, 0, len(text), lang, spans, self.max_tokens * 4, 2
        ):
            start, end = offsets[0][0], offsets[-1][1]
            examples.append(
                TrainingExample(
                    input_ids=ids,
                    loss_weights=[self.weights[c] for c in classes],
                    token_classes=[int(c) for c in classes],
                    edit_type=NEW_CODE,
                    path=path,
                    language=lang,
                    target_text=text[start:end],
                    target_start=start,
                    target_end=end,
                    in_error=errors,
                )
            )
            if max_examples is not None and len(examples) >= max_examples:
                break
        return examples

    def _file_pieces(self, text, lo, hi, lang, spans, max_chars, retries):
        """Encoded chunks of text[lo:hi] of at most max_tokens tokens each. A chunk
        that tokenizes too long is chunked again with a smaller character budget
        (`retries` times), then cut by token count."""
        for a, b in chunk_ranges(text[lo:hi], lang, max_chars):
            a, b = a + lo, b + lo
            if not text[a:b].strip():
                continue
            ids, classes, errors, offsets = self._encode(text, a, b, spans)
            if len(ids) <= self.max_tokens:
                yield ids, classes, errors, offsets
            elif retries > 0:
                smaller = max(16, int((b - a) * self.max_tokens / len(ids) * 0.9))
                yield from self._file_pieces(
                    text, a, b, lang, spans, smaller, retries - 1
                )
            else:
                for i in range(0, len(ids), self.max_tokens):
                    piece = slice(i, i + self.max_tokens)
                    yield ids[piece], classes[piece], errors[piece], offsets[piece]

    # ------------------------------------------------------------ helpers

    def _encode(self, text: str, lo: int, hi: int, spans: list[Span]):
        """Token ids, classes, error flags and offsets (document characters) of text[lo:hi]."""
        if hi <= lo:
            return [], [], [], []
        enc = self.tokenizer(
            text[lo:hi], add_special_tokens=False, return_offsets_mapping=True
        )
        offsets = [(a + lo, b + lo) for a, b in enc["offset_mapping"]]
        aligned = align_with_errors(spans, offsets)
        return (
            list(enc["input_ids"]),
            [c for c, _ in aligned],
            [e for _, e in aligned],
            offsets,
        )


def _shift(spans: list[Span], by: int) -> list[Span]:
    return [Span(s.start + by, s.end + by, s.cls, s.in_error) for s in spans]
