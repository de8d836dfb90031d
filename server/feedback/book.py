"""Completion feedback: which completions users accepted, per adapter version.

Every completion the server returns is recorded in a small bounded book (one per
session, one per model of a key for completions outside sessions) so feedback
can be checked against what was actually returned. Counts per adapter version
survive record eviction; the acceptance rate is
``(accepted + partially_accepted) / (accepted + partially_accepted + rejected)``
(``shown`` alone is not a decision).

An accepted completion becomes a training example only once the accepted text
is found, ``feedback_check_s`` later, in the session's mirror of the document:
the user kept it. Only accepted records are ever looked at for training, so
rejected text can never become a target.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time

from server.errors import ClientError
from server.feedback.gate import ConfidenceGate

log = logging.getLogger("dynarank.feedback")

EVENTS = ("shown", "accepted", "partially_accepted", "rejected")
OUTCOMES = ("accepted", "partially_accepted", "rejected")
COUNTS = ("completions", "shown", "accepted", "partially_accepted", "rejected", "hidden")
MAX_TEXT = 4096  # chars of a completion kept for validation and training
ANCHOR = 64  # chars of context before the cursor kept to find the text again
MAX_VERSIONS = 500  # per-version rows kept per book (totals are kept apart)




def version_key(version) -> str:
    return "base" if version is None else str(int(version))


def rate(counts: dict) -> float | None:
    yes = counts.get("accepted", 0) + counts.get("partially_accepted", 0)
    decided = yes + counts.get("rejected", 0)
    return round(yes / decided, 6) if decided else None


def summary(counts: dict) -> dict:
    row = {k: counts.get(k, 0) for k in COUNTS}
    row["acceptance_rate"] = rate(row)
    return row


@dataclasses.dataclass
class Record:
    id: str
    version: int | None
    model: str
    text: str
    anchor: str = ""  # the end of the prompt: where the text should appear
    path: str | None = None
    created: float = 0.0
    events: list = dataclasses.field(default_factory=list)
    accepted_text: str | None = None
    check_at: float | None = None  # wall time of the "kept in the document?" check
    kept: bool | None = None
    confidence: dict | None = None  # the completion's {"mean_logprob", "first_token_prob"}: the gate learns from it

    @property
    def outcome(self) -> str | None:
        return next((e for e in self.events if e in OUTCOMES), None)


class FeedbackBook:
    """Completions of one scope and their feedback; thread safe, bounded, JSON-serialisable."""

    def __init__(self, max_records: int = 256):
        self.max_records = max(1, max_records)
        self.records: collections.OrderedDict[str, Record] = collections.OrderedDict()
        self.by_version: dict[str, collections.Counter] = {}
        self.totals: collections.Counter = collections.Counter()
        self.trained = 0  # training examples built from kept accepted completions
        self.gate = ConfidenceGate()  # which suggestions are worth showing, learned from this book's outcomes
        self.lock = threading.Lock()

    def _count(self, version, what: str) -> None:
        key = version_key(version)
        row = self.by_version.setdefault(key, collections.Counter())
        row[what] += 1
        self.totals[what] += 1
        if len(self.by_version) > MAX_VERSIONS:  # forget the oldest versions' rows
            oldest = min(self.by_version, key=lambda k: -1 if k == "base" else int(k))
            self.by_version.pop(oldest)

    def record(self, cid: str, *, version, model: str, text: str, prompt: str = "", path: str | None = None,
               confidence: dict | None = None, hidden: bool = False) -> None:
        """Remember a returned completion; ``hidden`` ones were withheld by the gate (no feedback will come)."""
        rec = Record(cid, version, model, text[:MAX_TEXT], prompt[-ANCHOR:], path, time.time(),
                     confidence=confidence)
        with self.lock:
            self.records[cid] = rec
            while len(self.records) > self.max_records:
                self.records.popitem(last=False)
            self._count(version, "completions")
            if hidden:
                self._count(version, "hidden")

    def get(self, cid: str) -> Record | None:
        with self.lock:
            return self.records.get(cid)

    def apply(self, cid: str, event, accepted_text=None, *, check_after_s: float = 1.0) -> Record:
        """Validate and apply one event; on any error nothing changes."""
        if event not in EVENTS:
            raise ClientError("invalid_feedback", f"event must be one of {', '.join(EVENTS)}")
        if accepted_text is not None and not isinstance(accepted_text, str):
            raise ClientError("invalid_feedback", "accepted_text must be a string")
        if accepted_text is not None and event not in ("accepted", "partially_accepted"):
            raise ClientError("invalid_feedback",
                              f"accepted_text goes with accepted or partially_accepted, not {event}")
        with self.lock:
            rec = self.records.get(cid)
            if rec is None:
                raise ClientError("unknown_completion", f"no recorded completion {cid!r} here")
            if event in rec.events:
                raise ClientError("duplicate_feedback", f"{cid}: {event} was already recorded")
            if rec.outcome is not None:
                raise ClientError("contradictory_feedback", f"{cid} was already {rec.outcome}; {event} contradicts it")
            if event == "accepted" and accepted_text not in (None, rec.text):
                raise ClientError("invalid_feedback", "accepted_text differs from the completion; "
                                                        "use partially_accepted for a prefix")
            if event == "partially_accepted" and not (accepted_text and rec.text.startswith(accepted_text)):
                raise ClientError("invalid_feedback", "partially_accepted needs accepted_text, "
                                                        "a non-empty prefix of the completion")
            rec.events.append(event)
            if event in OUTCOMES:
                self.gate.update(rec.confidence, accepted=event != "rejected")
            if event in ("accepted", "partially_accepted"):
                rec.accepted_text = accepted_text or rec.text
                rec.check_at = time.time() + check_after_s
            self._count(rec.version, event)
            return rec

    def due(self, now: float) -> list[Record]:
        """Accepted records whose kept-in-document check is due (each returned once)."""
        out = []
        with self.lock:
            for rec in self.records.values():
                if rec.check_at is not None and rec.kept is None and rec.check_at <= now \
                        and rec.outcome in ("accepted", "partially_accepted"):
                    rec.kept = False  # set True by the caller if the text is found
                    out.append(rec)
        return out

    def stats(self) -> dict:
        with self.lock:
            rows = [{"adapter_version": None if k == "base" else int(k), **summary(c)}
                    for k, c in self.by_version.items()]
            rows.sort(key=lambda r: -1 if r["adapter_version"] is None else r["adapter_version"])
            return {**summary(self.totals), "trained_examples": self.trained, "gate": self.gate.to_json(),
                    "by_version": rows}

    # -- persistence ---------------------------------------------------------------

    def to_json(self) -> dict:
        with self.lock:
            return {"records": [dataclasses.asdict(r) for r in self.records.values()],
                    "by_version": {k: dict(c) for k, c in self.by_version.items()},
                    "totals": dict(self.totals), "trained": self.trained, "gate": self.gate.to_json()}

    @classmethod
    def from_json(cls, data: dict | None, max_records: int = 256) -> FeedbackBook:
        book = cls(max_records)
        if not isinstance(data, dict):
            return book
        fields = {f.name for f in dataclasses.fields(Record)}
        for raw in data.get("records", [])[-book.max_records:]:
            try:
                rec = Record(**{k: v for k, v in raw.items() if k in fields})
            except TypeError:
                continue
            book.records[rec.id] = rec
        book.by_version = {k: collections.Counter(v) for k, v in (data.get("by_version") or {}).items()}
        book.totals = collections.Counter(data.get("totals") or {})
        book.trained = int(data.get("trained", 0))
        book.gate = ConfidenceGate.from_json(data.get("gate"))
        return book


# -- training signal ---------------------------------------------------------------


# -- the server's books --------------------------------------------------------------


