"""Knowing when to stay silent: a per-session gate on a completion's confidence.

A suggestion costs the user attention. Following Cursor's write-up of their Tab
model, a shown suggestion is worth about +0.75 when accepted and -0.25 when
rejected, so it is worth showing when ``p(accept) > 0.25``. The gate estimates
``p(accept)`` with a logistic model of the completion's confidence (mean token
log-probability and the log-probability of its first token). It starts from a
prior (below) and learns online from the session's own accept/reject feedback.
Suggestions never shown get no feedback, so a hidden one never teaches the gate;
after ``EXPLORE_AFTER`` hidden in a row the next one is shown anyway, so a gate that
started too strict for this user or model still hears what they would take.
"""

from __future__ import annotations

import math
import threading

ACCEPT_REWARD, REJECT_COST = 0.75, 0.25
SHOW_ABOVE = REJECT_COST / (ACCEPT_REWARD + REJECT_COST)  # p(accept) where showing breaks even: 0.25
LEARNING_RATE = 0.1  # one outcome moves the gate a little: it takes several to hide a kind of suggestion
FLOOR = -10.0  # log-probabilities below this carry no more information
EXPLORE_AFTER = 4  # hidden suggestions in a row after which the next is shown anyway


def features(confidence: dict) -> tuple[float, float, float]:
    """Bias, mean token log-probability and first-token log-probability, scaled to about unit size."""
    first = max(math.log(max(confidence["first_token_prob"], 1e-12)), FLOOR)
    return 1.0, max(confidence["mean_logprob"], FLOOR) / 2, first / 4


# The prior a new session starts from. Its slope on the mean log-probability is what a
# logistic fit of exact matches found on the click and starlette points of
# `dynarank bench infill` (14 on the feature, 7 per nat; the first token's probability
# separated matches poorly there, so it starts at 0). Its break-even point is set at
# -0.3 nats per token (a geometric-mean token probability of 0.74) instead of the fitted
# one: exact match understates acceptance (people take near misses and edit them), and
# the fitted intercept hid nearly every suggestion. See docs/bench_infill.md.
PRIOR_SLOPE = 14.0
BREAK_EVEN_MEAN_LOGPROB = -0.3
PRIOR_WEIGHTS = (math.log(SHOW_ABOVE / (1 - SHOW_ABOVE))
                 - PRIOR_SLOPE * features({"mean_logprob": BREAK_EVEN_MEAN_LOGPROB, "first_token_prob": 1.0})[1],
                 PRIOR_SLOPE, 0.0)


class ConfidenceGate:
    def __init__(self, weights: list[float] | None = None):
        self.weights = list(weights) if weights else list(PRIOR_WEIGHTS)
        self.updates = 0
        self.hidden_in_a_row = 0
        self._lock = threading.Lock()

    def p_accept(self, confidence: dict) -> float:
        z = sum(w * x for w, x in zip(self.weights, features(confidence)))
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))

    def decide(self, confidence: dict | None) -> bool:
        """Whether to show this suggestion: unless the expected reward of showing is negative (no
        confidence: show), or to explore after ``EXPLORE_AFTER`` hidden in a row. Counts the decision."""
        with self._lock:
            show = (confidence is None or self.p_accept(confidence) > SHOW_ABOVE
                    or self.hidden_in_a_row >= EXPLORE_AFTER)
            self.hidden_in_a_row = 0 if show else self.hidden_in_a_row + 1
            return show

    def update(self, confidence: dict | None, accepted: bool) -> None:
        """One step of logistic regression on a shown suggestion's outcome."""
        if confidence is None:
            return
        with self._lock:
            x = features(confidence)
            error = (1.0 if accepted else 0.0) - self.p_accept(confidence)
            self.weights = [w + LEARNING_RATE * error * xi for w, xi in zip(self.weights, x)]
            self.updates += 1

    def to_json(self) -> dict:
        return {"weights": self.weights, "updates": self.updates, "hidden_in_a_row": self.hidden_in_a_row}

    @classmethod
    def from_json(cls, data: dict | None) -> "ConfidenceGate":
        gate = cls((data or {}).get("weights"))
        gate.updates = int((data or {}).get("updates", 0))
        gate.hidden_in_a_row = int((data or {}).get("hidden_in_a_row", 0))
        return gate
