"""Prometheus metrics (one ``CollectorRegistry`` per app) and request logs.

``Metrics`` attributes, all prefixed ``dynarank_`` in the exposition:

Serving (updated by the HTTP layer):
  request_latency      Histogram  request_duration_seconds{endpoint,method,status}
  ttft                 Histogram  time_to_first_token_seconds{endpoint}
  completion_latency   Histogram  completion_duration_seconds{endpoint}
  generated_tokens     Counter    generated_tokens_total
  prompt_tokens        Counter    prompt_tokens_total
  tokens_per_second    Gauge      tokens_per_second (of the last finished completion)
  inflight             Gauge      inflight_completions

Adaptation (updated by the session layer; ``session`` = session id):
  queue_depth          Gauge      session_queue_depth{session}
  adaptation_steps     Counter    adaptation_steps_total{session}
  last_loss            Gauge      adaptation_last_loss{session}
  rank                 Gauge      adapter_rank{session,module}
  swaps                Counter    adapter_swaps_total{session}  (new snapshot published to serving)

Completion feedback (read from server/feedback/ at scrape time, so label sets
stay as bounded as the feedback books; ``scope`` = session|model, ``name`` =
session id or model name, ``adapter_version`` = N, ``base`` or ``all``):
  completion_feedback_total   Counter  {scope,name,adapter_version,event}
                                       (event: completions|shown|accepted|partially_accepted|rejected)
  acceptance_rate             Gauge    {scope,name,adapter_version}  (accepted+partial over decided)

Sessions and fine-tuning jobs (read from the session layer at scrape time, all keys together):
  sessions_resident    Gauge      sessions_resident  (sessions held in memory)
  sessions_connected   Gauge      sessions_connected  (resident sessions with at least one open websocket)
  fine_tuning_jobs     Gauge      fine_tuning_jobs{state}  (state: one of JOB_STATES, zeros included)

Call ``forget_session(session_id)`` when a session ends so its label sets go.
"""

from __future__ import annotations

import logging

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

access_log = logging.getLogger("dynarank.access")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SESSION_METRICS = ("queue_depth", "adaptation_steps", "last_loss", "swaps")
# The states a fine-tuning job walks through (server/adaptation/jobs.py), in order.
JOB_STATES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")


def session_counts(sessions) -> dict:
    """``{"resident", "connected"}`` of an iterable of sessions (shared by /metrics and the dashboard)."""
    sessions = list(sessions)
    return {"resident": len(sessions), "connected": sum(1 for s in sessions if s.connections > 0)}


def job_counts(jobs) -> dict:
    """Jobs per state, every state of ``JOB_STATES`` present (zero when none)."""
    counts = dict.fromkeys(JOB_STATES, 0)
    for job in jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    return counts


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        p = "dynarank_"
        self.request_latency = Histogram(p + "request_duration_seconds", "HTTP request latency",
                                         ["endpoint", "method", "status"], registry=r, buckets=_LATENCY_BUCKETS)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to the first generated token",
                              ["endpoint"], registry=r, buckets=_LATENCY_BUCKETS)
        self.completion_latency = Histogram(p + "completion_duration_seconds", "Whole completion latency",
                                            ["endpoint"], registry=r, buckets=_LATENCY_BUCKETS)
        self.generated_tokens = Counter(p + "generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens processed", registry=r)
        self.tokens_per_second = Gauge(p + "tokens_per_second", "Decode speed of the last completion", registry=r)
        self.inflight = Gauge(p + "inflight_completions", "Completions being generated", registry=r)
        self.queue_depth = Gauge(p + "session_queue_depth", "Training examples waiting per session",
                                 ["session"], registry=r)
        self.adaptation_steps = Counter(p + "adaptation_steps", "Adaptation steps run", ["session"], registry=r)
        self.last_loss = Gauge(p + "adaptation_last_loss", "Loss of the last adaptation step", ["session"],
                               registry=r)
        self.rank = Gauge(p + "adapter_rank", "Current LoRA rank per module", ["session", "module"], registry=r)
        self.swaps = Counter(p + "adapter_swaps", "Adapter snapshots published to serving", ["session"],
                             registry=r)

    def watch_feedback(self, source) -> None:
        """Expose ``source.metric_rows()`` (a FeedbackRegistry) on every scrape."""
        self.registry.register(_FeedbackCollector(source))

    def watch_services(self, sessions, jobs) -> None:
        """Expose session and job counts of a SessionManager and a JobManager on every scrape."""
        self.registry.register(_ServicesCollector(sessions, jobs))

    def forget_session(self, session_id: str) -> None:
        for name in _SESSION_METRICS:
            try:
                getattr(self, name).remove(session_id)
            except KeyError:
                pass
        # rank has a second label: drop every module of the session.
        for labels in [k for k in self.rank._metrics if k[0] == session_id]:
            self.rank.remove(*labels)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _FeedbackCollector:
    def __init__(self, source):
        self.source = source

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from server.feedback import COUNTS, rate

        # Two keys may share a session id or a model name: sum them so label sets stay unique.
        merged: dict[tuple, dict] = {}
        for scope, name, stats in self.source.metric_rows():
            rows = [(str(r["adapter_version"] if r["adapter_version"] is not None else "base"), r)
                    for r in stats["by_version"]] + [("all", stats)]
            for version, row in rows:
                acc = merged.setdefault((scope, name, version), dict.fromkeys(COUNTS, 0))
                for k in COUNTS:
                    acc[k] += row.get(k, 0)
        events = CounterMetricFamily("dynarank_completion_feedback", "Completions and feedback events",
                                     labels=["scope", "name", "adapter_version", "event"])
        rates = GaugeMetricFamily("dynarank_acceptance_rate", "Accepted (incl. partially) over decided completions",
                                  labels=["scope", "name", "adapter_version"])
        for (scope, name, version), counts in sorted(merged.items()):
            for k in COUNTS:
                events.add_metric([scope, name, version, k], counts[k])
            r = rate(counts)
            if r is not None:
                rates.add_metric([scope, name, version], r)
        yield events
        yield rates

    def describe(self):
        return []  # collected lazily: nothing to check at registration


class _ServicesCollector:
    """Counts read at scrape time, so no code path has to remember to update a gauge."""

    def __init__(self, sessions, jobs):
        self.sessions, self.jobs = sessions, jobs

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        sessions = session_counts(self.sessions.sessions())
        yield GaugeMetricFamily("dynarank_sessions_resident", "Sessions held in memory",
                                value=sessions["resident"])
        yield GaugeMetricFamily("dynarank_sessions_connected", "Resident sessions with an open websocket",
                                value=sessions["connected"])
        jobs = GaugeMetricFamily("dynarank_fine_tuning_jobs", "Fine-tuning jobs by state", labels=["state"])
        # list() first: the dict may gain a job while we count.
        for state, n in job_counts(list(self.jobs.jobs.values())).items():
            jobs.add_metric([state], n)
        yield jobs

    def describe(self):
        return []


def log_event(event: str, **fields) -> None:
    """One structured log line: ``event=NAME k=v ...`` (values with spaces are quoted)."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = "null" if value is None else str(value)
        if not text or any(c in text for c in ' "='):
            text = '"' + text.replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    access_log.info(" ".join(parts))


