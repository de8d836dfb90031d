"""The confidence gate: starts from a prior on confidence, then learns from the session's own outcomes."""

from __future__ import annotations

import random

from server.feedback import FeedbackBook
from server.feedback.gate import BREAK_EVEN_MEAN_LOGPROB, EXPLORE_AFTER, SHOW_ABOVE, ConfidenceGate

SURE = {"mean_logprob": -0.05, "first_token_prob": 0.95}
UNSURE = {"mean_logprob": -2.5, "first_token_prob": 0.1}


def test_a_new_gate_shows_confident_suggestions_and_hides_unsure_ones():
    just_above = {"mean_logprob": BREAK_EVEN_MEAN_LOGPROB + 0.02, "first_token_prob": 0.5}
    just_below = {"mean_logprob": BREAK_EVEN_MEAN_LOGPROB - 0.02, "first_token_prob": 0.5}
    for confidence, shown in ((SURE, True), (UNSURE, False), (None, True), (just_above, True), (just_below, False)):
        assert ConfidenceGate().decide(confidence) is shown, confidence


def test_after_enough_hidden_in_a_row_one_is_shown_so_the_gate_keeps_learning():
    gate = ConfidenceGate()
    decisions = [gate.decide(UNSURE) for _ in range(2 * (EXPLORE_AFTER + 1))]
    assert decisions == 2 * ([False] * EXPLORE_AFTER + [True])
    gate = ConfidenceGate()
    assert [gate.decide(c) for c in [UNSURE] * (EXPLORE_AFTER - 1) + [SURE] + [UNSURE]] == \
        [False] * (EXPLORE_AFTER - 1) + [True, False]  # a shown suggestion ends the streak
    assert ConfidenceGate.from_json(gate.to_json()).hidden_in_a_row == 1


def test_a_session_that_accepts_unsure_suggestions_gets_them_shown():
    gate = ConfidenceGate()
    for _ in range(200):
        gate.update(UNSURE, accepted=True)
    assert gate.p_accept(UNSURE) > SHOW_ABOVE and gate.decide(UNSURE)


def test_a_session_that_rejects_confident_suggestions_stops_seeing_them():
    gate = ConfidenceGate()
    for _ in range(100):
        gate.update(SURE, accepted=False)
    assert gate.p_accept(SURE) < SHOW_ABOVE and not gate.decide(SURE)


def test_it_learns_to_hide_what_gets_rejected_and_keep_what_gets_accepted():
    gate, rng = ConfidenceGate(), random.Random(0)
    for _ in range(200):
        confident = rng.random() < 0.5
        confidence = SURE if confident else UNSURE
        gate.update(confidence, accepted=confident and rng.random() < 0.8)
    assert gate.decide(SURE) and not gate.decide(UNSURE)
    assert gate.p_accept(SURE) > 0.6 and gate.p_accept(UNSURE) < SHOW_ABOVE


def test_the_gate_is_saved_with_its_book_and_learns_from_feedback():
    book = FeedbackBook()
    book.record("c1", version=1, model="m", text="x = 1", confidence=UNSURE)
    book.record("c2", version=1, model="m", text="y = 2", confidence=UNSURE, hidden=True)
    before = list(book.gate.weights)
    book.apply("c1", "rejected")
    assert book.gate.weights != before and book.gate.updates == 1
    stats = book.stats()
    assert stats["hidden"] == 1 and stats["completions"] == 2 and stats["gate"]["updates"] == 1
    again = FeedbackBook.from_json(book.to_json())
    assert again.gate.weights == book.gate.weights and again.stats()["hidden"] == 1
