"""Prometheus metrics and the structured access/event log."""
