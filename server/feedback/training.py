"""Accepted completions the user kept become weighted training examples."""

from __future__ import annotations

import dataclasses
import logging
import time

from server.feedback.book import Record

log = logging.getLogger("dynarank.feedback")


def find_kept(rec: Record, docs: dict) -> tuple[str, str, str, str | None] | None:
    """(before, after, path, language) if the accepted text is in a mirrored document.

    ``before`` is the document without that occurrence, so the edit builder's
    target is exactly the accepted text in its real context.
    """
    text = rec.accepted_text
    if not text or not text.strip():
        return None
    from code_signals.privacy import PrivacyFilter

    privacy = PrivacyFilter()  # a document the privacy rules refuse never trains (docs/privacy.md)
    paths = ([rec.path] if rec.path in docs else []) + [p for p in docs if p != rec.path]
    for path in paths:
        doc = docs[path]
        i = doc.text.find(rec.anchor + text) if rec.anchor else -1
        i = i + len(rec.anchor) if i >= 0 else doc.text.rfind(text)
        # The text search first: the privacy scan reads the whole document, so only the one that holds it.
        if i >= 0 and privacy.reason(path, doc.text) is None:
            return doc.text[:i] + doc.text[i + len(text):], doc.text, path, doc.language
    return None



def weighted(examples, weight: float):
    """Copies whose example weight is multiplied by ``weight`` (see adapter_core.train: a larger step)."""
    return [dataclasses.replace(ex, weight=ex.weight * weight) for ex in examples]



def settle_feedback(session, builder, settings, now: float | None = None) -> int:
    """Queue examples for the session's accepted completions that were kept; returns how many."""
    book = getattr(session, "feedback", None)
    if book is None or not settings.feedback_training:
        return 0
    queued = 0
    for rec in book.due(time.time() if now is None else now):
        with session.lock:
            found = find_kept(rec, session.docs)
        if found is None:
            continue
        before, after, path, language = found
        try:
            examples = builder.from_edit(before, after, path=path, language=language)
        except Exception as exc:
            log.warning("no example from accepted completion %s: %s", rec.id, exc)
            continue
        rec.kept = True
        if examples:
            session.enqueue(weighted(examples, settings.feedback_weight))
            with book.lock:
                book.trained += len(examples)
            queued += len(examples)
    return queued
