"""server/feedback/ on its own: validation, stats, persistence and the training signal."""

from __future__ import annotations

import dataclasses
import types

import pytest

from code_signals import TrainingExample
from server.errors import ClientError
from server.feedback import FeedbackBook, find_kept, rate, settle_feedback
from server.sessions import Document


def book_with(*texts, version=3):
    book = FeedbackBook(max_records=8)
    for i, text in enumerate(texts):
        book.record(f"c{i}", version=version, model="m", text=text, prompt="x = ")
    return book


def test_rates_per_version_and_totals():
    book = FeedbackBook()
    for i, v in enumerate([0, 0, 0, 1, 1, None]):
        book.record(f"c{i}", version=v, model="m", text=f"t{i}")
    book.apply("c0", "shown")
    book.apply("c0", "accepted")
    book.apply("c1", "rejected")
    book.apply("c2", "shown")  # shown alone is no decision
    book.apply("c3", "partially_accepted", "t")
    book.apply("c4", "rejected")
    book.apply("c5", "accepted")
    stats = book.stats()
    rows = {r["adapter_version"]: r for r in stats["by_version"]}
    assert rows[0] == {"adapter_version": 0, "completions": 3, "shown": 2, "accepted": 1, "partially_accepted": 0,
                       "rejected": 1, "hidden": 0, "acceptance_rate": 0.5}
    assert rows[1]["acceptance_rate"] == 0.5 and rows[None]["acceptance_rate"] == 1.0
    assert stats["completions"] == 6 and stats["acceptance_rate"] == 0.6
    assert rate({}) is None


@pytest.mark.parametrize("cid, event, text, code", [
    ("nope", "accepted", None, "unknown_completion"),
    ("c0", "liked", None, "invalid_feedback"),
    ("c0", "rejected", "x", "invalid_feedback"),  # text only goes with acceptance
    ("c0", "accepted", "something else", "invalid_feedback"),
    ("c0", "partially_accepted", None, "invalid_feedback"),
    ("c0", "partially_accepted", "width", "invalid_feedback"),  # not a prefix
])
def test_bad_feedback_changes_nothing(cid, event, text, code):
    book = book_with("return width * height")
    before = book.to_json()
    with pytest.raises(ClientError) as err:
        book.apply(cid, event, text)
    assert err.value.code == code and err.value.message
    assert book.to_json() == before


def test_duplicate_and_contradictory():
    book = book_with("a + b", "c + d")
    book.apply("c0", "rejected")
    before = book.to_json()
    for event, code in [("rejected", "duplicate_feedback"), ("accepted", "contradictory_feedback"),
                        ("shown", "contradictory_feedback")]:
        with pytest.raises(ClientError) as err:
            book.apply("c0", event)
        assert err.value.code == code and err.value.status == 409
    assert book.to_json() == before


def test_bounded_and_round_trips():
    book = FeedbackBook(max_records=2)
    for i in range(5):
        book.record(f"c{i}", version=i, model="m", text="x" * 10_000)
    assert list(book.records) == ["c3", "c4"] and len(book.records["c4"].text) == 4096
    book.apply("c4", "accepted")
    copy = FeedbackBook.from_json(book.to_json(), max_records=2)
    assert copy.stats() == book.stats()
    with pytest.raises(ClientError):
        copy.apply("c4", "accepted")  # the event survived the round trip
    with pytest.raises(ClientError):
        copy.apply("c0", "accepted")  # evicted: unknown, but still counted
    assert copy.stats()["completions"] == 5


class FakeBuilder:
    def __init__(self):
        self.calls = []

    def from_edit(self, before, after, path=None, language=None):
        self.calls.append((before, after, path))
        target = after[len(before):] if after.startswith(before) else "?"
        return [TrainingExample([1, 2, 3], [0.0, 1.0, 0.5], [0, 0, 0], "new_code", path, "python", target)]


@dataclasses.dataclass
class FakeSession:
    feedback: FeedbackBook
    docs: dict

    def __post_init__(self):
        import threading

        self.lock = threading.RLock()
        self.queue = []

    def enqueue(self, examples):
        self.queue.extend(examples)


SETTINGS = types.SimpleNamespace(feedback_training=True, feedback_weight=3.0)


def test_kept_accepted_text_becomes_weighted_example():
    book = book_with("width * height")
    book.apply("c0", "accepted", check_after_s=0)
    doc = Document("def area(width, height):\n    x = width * height\n", 2, "python")
    session = FakeSession(book, {"a.py": doc})
    builder = FakeBuilder()
    assert settle_feedback(session, builder, SETTINGS, now=1e12) == 1
    before, after, path = builder.calls[0]
    assert after == doc.text and before == doc.text.replace("width * height", "") and path == "a.py"
    assert session.queue[0].weight == 3.0 and session.queue[0].loss_weights == [0.0, 1.0, 0.5]
    assert book.stats()["trained_examples"] == 1 and book.records["c0"].kept is True
    assert settle_feedback(session, builder, SETTINGS, now=1e12) == 0  # checked once


def test_rejected_or_removed_text_is_never_a_target():
    book = book_with("width * height", "width + height", "width - height")
    book.apply("c0", "rejected")
    book.apply("c1", "accepted", check_after_s=0)  # accepted, then deleted by the user
    book.apply("c2", "shown")
    # Every text is in the document, yet only accepted-and-kept text could be trained on.
    doc = Document("a = width * height\nb = width - height\n", 3, "python")
    builder = FakeBuilder()
    session = FakeSession(book, {"a.py": doc})
    assert settle_feedback(session, builder, SETTINGS, now=1e12) == 0
    assert builder.calls == [] and session.queue == []
    assert book.records["c1"].kept is False
    assert find_kept(book.records["c0"], {"a.py": doc}) is None  # no accepted_text on a rejected record


def test_training_can_be_switched_off():
    book = book_with("width * height")
    book.apply("c0", "accepted", check_after_s=0)
    session = FakeSession(book, {"a.py": Document("y = width * height\n", 1, "python")})
    off = types.SimpleNamespace(feedback_training=False, feedback_weight=3.0)
    assert settle_feedback(session, FakeBuilder(), off, now=1e12) == 0 and session.queue == []
