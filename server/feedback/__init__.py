"""Completion feedback: which completions users accepted, and kept ones as training examples."""

from server.feedback.book import (
           COUNTS,
           EVENTS,
           OUTCOMES,
           FeedbackBook,
           Record,
           rate,
           summary,
)
from server.feedback.registry import FeedbackRegistry
from server.feedback.training import find_kept, settle_feedback, weighted

__all__ = ["COUNTS", "EVENTS", "OUTCOMES", "FeedbackBook", "FeedbackRegistry", "Record",
           "find_kept", "rate", "settle_feedback", "summary", "weighted"]
