"""Scores of one adapter snapshot on one training example (before it adapts on it).

``score_tokens``: NLL and top-1 correctness of every target (changed) token given
everything before it, with its token class. ``complete_lines``: greedy line
completions at sampled points inside the changed text, against the document's
actual rest of line.
"""

from __future__ import annotations

import difflib
import random

import torch
import torch.nn.functional as F

from adapter_core import use_adapter
from code_signals import TokenClass

KEYWORD = {int(TokenClass.KEYWORD)}
IDENTIFIER = {int(TokenClass.IDENTIFIER_DEF), int(TokenClass.IDENTIFIER_USE)}
# Token groups reported separately; "all" is every changed token.
GROUPS = {"all": None, "keyword": KEYWORD, "identifier": IDENTIFIER}


def target_positions(example) -> list[int]:
    """Positions t >= 1 whose token is a target (predicted from tokens < t)."""
    return [t for t, w in enumerate(example.loss_weights) if t >= 1 and w > 0]


@torch.no_grad()
def score_tokens(model, snapshot, example) -> dict[str, list]:
    """{"nll": [...], "correct": [...], "cls": [...]} over the example's target tokens (one forward)."""
    pos = target_positions(example)
    if not pos:
        return {"nll": [], "correct": [], "cls": []}
    ids = torch.tensor([list(example.input_ids)], dtype=torch.long)
    with use_adapter(model, snapshot):
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
    prev = torch.tensor([t - 1 for t in pos])
    logits = model.get_output_embeddings()(hidden[prev]).float()
    targets = ids[0, pos]
    nll = F.cross_entropy(logits, targets, reduction="none")
    correct = logits.argmax(-1) == targets
    return {"nll": nll.tolist(), "correct": correct.tolist(), "cls": [int(example.token_classes[t]) for t in pos]}


def completion_points(example, after: str, tokenizer, k: int, seed: int,
                      max_ref_tokens: int = 24) -> list[tuple[int, str]]:
    """Up to ``k`` (token position, reference rest of line) inside the changed text.

    A point is a target token boundary whose rest of line in the document is not blank
    and fits in ``max_ref_tokens`` tokens (so a greedy completion of that length can match).
    The character offset of a token comes from decoding the targets before it; examples
    whose targets do not decode to their text exactly (split multi-byte characters) give none.
    """
    pos = target_positions(example)
    if not pos or k <= 0:
        return []
    first = pos[0]

    def text_of(a, b):
        return tokenizer.decode(example.input_ids[a:b], clean_up_tokenization_spaces=False)

    if text_of(first, pos[-1] + 1) != example.target_text:
        return []
    candidates = []
    for t in pos:
        char = example.target_start + len(text_of(first, t))
        eol = after.find("\n", char)
        eol = len(after) if eol < 0 else eol
        rest = after[char:eol]
        if rest.strip() and len(tokenizer.encode(rest, add_special_tokens=False)) <= max_ref_tokens:
            candidates.append((t, rest))
    rng = random.Random(seed)
    return sorted(rng.sample(candidates, min(k, len(candidates))))


def newline_token_ids(tokenizer) -> torch.Tensor:
    cached = getattr(tokenizer, "_bench_newline_ids", None)
    if cached is None:
        vocab = tokenizer.get_vocab().values()
        cached = torch.tensor(sorted(i for i in vocab if "\n" in tokenizer.decode([i])), dtype=torch.long)
        tokenizer._bench_newline_ids = cached
    return cached


@torch.no_grad()
def greedy_lines(model, tokenizer, snapshot, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prompt (one left-padded batch), cut at the first line break."""
    if not prompts:
        return []
    from transformers import StoppingCriteria, StoppingCriteriaList

    newline = newline_token_ids(tokenizer)
    start = max(len(p) for p in prompts)

    class EndOfLine(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.isin(input_ids[:, start:], newline).any(dim=1)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(prompts), start), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, start - len(p):] = torch.tensor(p)
        mask[i, start - len(p):] = 1
    with use_adapter(model, snapshot):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, stopping_criteria=StoppingCriteriaList([EndOfLine()]))
    lines = []
    for row in out[:, start:]:
        text = tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        lines.append(text.split("\n", 1)[0])
    return lines


def complete_lines(model, tokenizer, snapshot, example, points, max_new_tokens: int) -> list[dict]:
    prompts = [list(example.input_ids[:t]) for t, _ in points]
    hyps = greedy_lines(model, tokenizer, snapshot, prompts, max_new_tokens)
    return [{"hyp": h, "ref": ref, "exact": h.rstrip() == ref.rstrip(),
             "edit_sim": difflib.SequenceMatcher(None, h.rstrip(), ref.rstrip()).ratio()}
            for h, (_, ref) in zip(hyps, points)]


def edit_point(example, after: str) -> tuple[str, str, str] | None:
    """(prefix, suffix, reference) of a completion where the example's edit starts in ``after``.

    The reference is the first non-blank line of the changed text (from the cursor, or from the
    start of the first non-blank changed line); the suffix is the document after the change.
    """
    if example.prefix_range is None:
        return None
    cursor, end = example.prefix_range[1], example.target_end
    while cursor < end:
        eol = after.find("\n", cursor)
        eol = len(after) if eol < 0 else eol
        ref = after[cursor:min(eol, end)]
        if ref.strip():
            return after[:cursor], after[end:], ref
        cursor = eol + 1
    return None


def complete_at_edit(engine, snapshot, point: tuple[str, str, str], max_new_tokens: int,
                     prefix_chars: int | None = None, suffix_chars: int | None = None) -> dict:
    """The completion a user sees at the edit point: the server's engine, FIM prompt (when the model has
    FIM tokens), healed and trimmed to one line, as the websocket asks in ``line`` mode.

    The prompt keeps the websocket's windows of document text around the cursor, or narrower
    ``prefix_chars``/``suffix_chars`` (a cheaper evaluation: prefill dominates its cost)."""
    from server.app.ws.protocol import MAX_PREFIX_CHARS, MAX_SUFFIX_CHARS
    from server.engines.base import GenerationRequest

    prefix, suffix, ref = point
    prefix_chars = min(prefix_chars or MAX_PREFIX_CHARS, MAX_PREFIX_CHARS)
    suffix_chars = min(suffix_chars or MAX_SUFFIX_CHARS, MAX_SUFFIX_CHARS)
    request = GenerationRequest(prompt=prefix[-prefix_chars:], suffix=suffix[:suffix_chars],
                                max_tokens=max_new_tokens, heal=True, trim=True, mode="line")
    hyp = "".join(chunk.text for chunk in engine.generate(request, snapshot)).split("\n", 1)[0]
    return {"hyp": hyp, "ref": ref, "exact": hyp.rstrip() == ref.rstrip(), "chrf": chrf(hyp, ref)}


def chrf(hyp: str, ref: str) -> float | None:
    """sacrebleu's sentence chrF (0-100); None when sacrebleu is not installed."""
    try:
        import sacrebleu
    except ImportError:
        return None
    return float(sacrebleu.sentence_chrf(hyp.rstrip(), [ref.rstrip()]).score)


def bleu(hyps: list[str], refs: list[str]) -> float | None:
    """Corpus BLEU (sacrebleu) of line completions; None when sacrebleu is not installed."""
    try:
        import sacrebleu
    except ImportError:
        return None
    if not hyps:
        return None
    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)
