"""Training examples from edits and from whole files.

An example is one token sequence: context tokens (loss weight 0) followed by
target tokens (weighted by class). With `context_after=True` and a tokenizer that
has the FIM tokens, it is `<|fim_prefix|> before <|fim_suffix|> after
<|fim_middle|> target`; without them the text after the edit is left out (a
causal model cannot use it for the targets).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .align import align_with_errors
from .classes import Span, TokenClass
from .classify import classify
from .edits import NEW_CODE, changed_regions, classify_edit_type, is_whitespace_only
from .errors import CodeSignalsError
from .languages import detect_language
from .walker import chunk_ranges
from .weights import resolve_table

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
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
    context_after: also show the text after the edit (FIM) when the tokenizer
    has FIM tokens.
    weights: overrides for DEFAULT_WEIGHTS.
    """

    def __init__(
        self,
        tokenizer,
        max_tokens: int = 256,
        max_examples: int = 4,
        context_after: bool = False,
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
        self.context_after = context_after
        self.weights = resolve_table(weights)
        vocab = tokenizer.get_vocab()
        ids = [vocab.get(t) for t in FIM_TOKENS]
        self.fim_ids: tuple[int, int, int] | None = (
            tuple(ids) if None not in ids else None
        )

    @property
    def uses_fim(self) -> bool:
        return self.context_after and self.fim_ids is not None

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
        if end - start > self.max_tokens * _CHARS_PER_TOKEN:
            end = start + self.max_tokens * _CHARS_PER_TOKEN
        lo = max(0, start - self.max_tokens * _CHARS_PER_TOKEN)
        hi = (
            min(len(text), end + self.max_tokens * _CHARS_PER_TOKEN)
            if self.uses_fim
            else end
        )
        spans = whole if whole is not None else _shift(classify(text[lo:hi], lang), lo)
        if self.uses_fim:
            return self._fim_example(text, lo, start, end, hi, spans, lang)
        return self._causal_example(text, lo, start, end, spans, lang)

    def _causal_example(
        self, text, lo, start, end, spans, lang
    ) -> TrainingExample | None:
        ids, classes, errors, offsets = self._encode(text, lo, end, spans)
        first_target = next(
            (i for i, (_, e) in enumerate(offsets) if e > start), len(ids)
        )
        n_targets = min(len(ids) - first_target, self.max_tokens * 3 // 4)
        if n_targets <= 0:
            return None
        n_context = min(first_target, self.max_tokens - n_targets)
        keep = slice(first_target - n_context, first_target + n_targets)
        weights = [0.0] * n_context + [
            self.weights[c] for c in classes[first_target : first_target + n_targets]
        ]
        target_end = offsets[first_target + n_targets - 1][1]
        return TrainingExample(
            input_ids=ids[keep],
            loss_weights=weights,
            token_classes=[int(c) for c in classes[keep]],
            edit_type=NEW_CODE,
            path=None,
            language=lang,
            target_text=text[offsets[first_target][0] : target_end],
            target_start=offsets[first_target][0],
            target_end=target_end,
            in_error=errors[keep],
        )

    def _fim_example(
        self, text, lo, start, end, hi, spans, lang
    ) -> TrainingExample | None:
        mid_ids, mid_cls, mid_err, mid_offsets = self._encode(text, start, end, spans)
        budget = self.max_tokens - 3
        n_mid = min(len(mid_ids), budget * 3 // 4)
        if n_mid <= 0:
            return None
        pre_ids, pre_cls, pre_err, _ = self._encode(text, lo, start, spans)
        suf_ids, suf_cls, suf_err, _ = self._encode(text, end, hi, spans)
        room = budget - n_mid
        n_suf = min(len(suf_ids), max(room // 3, room - len(pre_ids)))
        n_pre = min(len(pre_ids), room - n_suf)
        p, s, m = self.fim_ids
        other = TokenClass.OTHER
        ids = [
            p,
            *pre_ids[len(pre_ids) - n_pre :],
            s,
            *suf_ids[:n_suf],
            m,
            *mid_ids[:n_mid],
        ]
        classes = [
            other,
            *pre_cls[len(pre_cls) - n_pre :],
            other,
            *suf_cls[:n_suf],
            other,
            *mid_cls[:n_mid],
        ]
        errors = [
            False,
            *pre_err[len(pre_err) - n_pre :],
            False,
            *suf_err[:n_suf],
            False,
            *mid_err[:n_mid],
        ]
        n_context = len(ids) - n_mid
        weights = [0.0] * n_context + [self.weights[c] for c in mid_cls[:n_mid]]
        target_end = mid_offsets[n_mid - 1][1]
        return TrainingExample(
            input_ids=ids,
            loss_weights=weights,
            token_classes=[int(c) for c in classes],
            edit_type=NEW_CODE,
            path=None,
            language=lang,
            target_text=text[start:target_end],
            target_start=start,
            target_end=target_end,
            fim=True,
            in_error=errors,
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
