"""Prometheus metrics (one ``CollectorRegistry`` per app) and request logs.

``/metrics`` is server-wide: every key that may scrape sees the same text, so
nothing in it names a session, an adapter or a key, and no label set grows
with the number of sessions. Per-session figures live in ``SessionFigures``
(below), keyed by (owner, session id), and are served only to the owner
(``GET /v1/sessions/{id}/stats``).

``Metrics`` attributes, all prefixed ``dynarank_`` in the exposition:

Serving (updated by the HTTP layer):
  request_latency      Histogram  request_duration_seconds{endpoint,method,status}
  ttft                 Histogram  time_to_first_token_seconds{endpoint}
  completion_latency   Histogram  completion_duration_seconds{endpoint}
  generated_tokens     Counter    generated_tokens_total
  prompt_tokens        Counter    prompt_tokens_total
  tokens_per_second    Gauge      tokens_per_second (of the last finished completion)
  inflight             Gauge      inflight_completions

Adaptation, all sessions together (updated by ``session_step``):
  adaptation_steps     Counter    adaptation_steps_total
  swaps                Counter    adapter_swaps_total  (new snapshot published to serving)
  step_loss            Histogram  adaptation_loss  (loss of every adaptation step)

Completion feedback, all keys together (read from server/feedback/ at scrape
time; ``scope`` = session (session adapters' books) | model (per-model books:
the base model and stored adapters)):
  completion_feedback_total   Counter  {scope,event}
                                       (event: completions|shown|accepted|partially_accepted|rejected|hidden)
  acceptance_rate             Gauge    {scope}  (accepted+partial over decided)

Sessions and fine-tuning jobs (read from the session layer at scrape time, all keys together):
  sessions_resident    Gauge      sessions_resident  (sessions held in memory)
  sessions_connected   Gauge      sessions_connected  (resident sessions with at least one open websocket)
  training_queue_depth Gauge      training_queue_depth  (examples waiting, all resident sessions)
  fine_tuning_jobs     Gauge      fine_tuning_jobs{state}  (state: one of JOB_STATES, zeros included)

vLLM replicas (``--engine vllm`` with several ``url``s; read from the engine at scrape time,
``replica`` = the server's URL, a configured and bounded set):
  vllm_replica_up              Gauge    {replica}  (1 up, 0 down)
  vllm_replica_inflight        Gauge    {replica}  (requests streaming there now)
  vllm_replica_loaded_versions Gauge    {replica}  (adapter versions loaded there)
  vllm_replica_requests_total  Counter  {replica}  (attempts sent there)
  vllm_replica_failures_total  Counter  {replica}  (times marked down)
  vllm_routed_total            Counter  {outcome}  (hit: a replica held the version; cold: loaded first;
                                                    base; retried / resumed: moved after a failure)
  vllm_stale_requests_total    Counter  (ran on an older version: theirs was not loaded yet)

Per session (``Metrics.figures``, never in ``/metrics``): steps and swaps since
the session became resident, last loss, rank per module, queue depth. The
session manager calls ``track_session`` when a session becomes resident and
``forget_session`` when it is evicted or deleted, so the figures are bounded by
the resident sessions; updates for a session object that is not tracked (evicted,
deleted, or replaced by a new session of the same id) are dropped.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

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
_LOSS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12)
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
        self.adaptation_steps = Counter(p + "adaptation_steps", "Adaptation steps run, all sessions", registry=r)
        self.swaps = Counter(p + "adapter_swaps", "Adapter snapshots published to serving, all sessions",
                             registry=r)
        self.step_loss = Histogram(p + "adaptation_loss", "Loss of adaptation steps, all sessions",
                                   registry=r, buckets=_LOSS_BUCKETS)
        self.figures = SessionFigures()
        self._replica_engines: list = []  # engines whose replicas /metrics reports (watch_replicas)

    def watch_feedback(self, source) -> None:
        """Expose ``source.metric_rows()`` (a FeedbackRegistry) on every scrape."""
        self.registry.register(_FeedbackCollector(source))

    def watch_replicas(self, engine) -> None:
        """Expose ``engine.replica_metrics()`` on every scrape (once per engine; engines without it: nothing)."""
        if not hasattr(engine, "replica_metrics") or any(e is engine for e in self._replica_engines):
            return
        self._replica_engines.append(engine)
        self.registry.register(_ReplicaCollector(engine))

    def watch_prefix_cache(self, engine) -> None:
        """Expose the figures of ``engine.prefix_cache`` on every scrape (engines without one: nothing)."""
        cache = getattr(engine, "prefix_cache", None)
        if cache is not None:
            self.registry.register(_PrefixCacheCollector(cache))

    def watch_services(self, sessions, jobs) -> None:
        """Expose session and job counts of a SessionManager and a JobManager on every scrape."""
        self.registry.register(_ServicesCollector(sessions, jobs))

    # -- per session: kept apart from the registry, served only to the session's owner ----------

    def track_session(self, session) -> None:
        """``session`` became resident: its figures start (from zero) and updates count from now on."""
        self.figures.track(session)

    def forget_session(self, session) -> None:
        """``session`` was evicted or deleted: drop its figures (a newer session of the same id keeps its own)."""
        self.figures.forget(session)

    def session_step(self, session, loss: float, ranks: dict) -> None:
        """One adaptation step of ``session`` published a snapshot with ``ranks``."""
        self.adaptation_steps.inc()
        self.swaps.inc()
        self.step_loss.observe(loss)
        self.figures.step(session, loss, ranks)

    def session_queue(self, session, depth: int) -> None:
        self.figures.queue(session, depth)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class SessionFigures:
    """Per-session figures keyed by (owner, session id): two keys' sessions of one id never share them.

    An entry holds a weak reference to the session object it was tracked for; updates
    from any other object (an evicted or replaced session still finishing a step) are dropped.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._rows: dict[tuple, dict] = {}

    @staticmethod
    def _key(session) -> tuple:
        return (session.owner, session.id)

    def track(self, session) -> None:
        with self._lock:
            # Rows whose session object is gone (dropped without forget) go too: the dict stays bounded.
            for key in [k for k, row in self._rows.items() if row["ref"]() is None]:
                del self._rows[key]
            self._rows[self._key(session)] = {"ref": weakref.ref(session), "since": time.time(), "steps": 0,
                                              "swaps": 0, "last_loss": None, "last_step_at": None,
                                              "ranks": {}, "queue_depth": 0}

    def forget(self, session) -> None:
        with self._lock:
            row = self._rows.get(self._key(session))
            if row is not None and row["ref"]() in (session, None):
                del self._rows[self._key(session)]

    def _row(self, session) -> dict | None:
        row = self._rows.get(self._key(session))
        return row if row is not None and row["ref"]() is session else None

    def step(self, session, loss: float, ranks: dict) -> None:
        with self._lock:
            row = self._row(session)
            if row is not None:
                row["steps"] += 1
                row["swaps"] += 1
                row["last_loss"] = float(loss)
                row["last_step_at"] = time.time()
                row["ranks"] = dict(ranks)

    def queue(self, session, depth: int) -> None:
        with self._lock:
            row = self._row(session)
            if row is not None:
                row["queue_depth"] = int(depth)

    def get(self, session) -> dict | None:
        """A copy of ``session``'s figures (None when it is not tracked)."""
        with self._lock:
            row = self._row(session)
            if row is None:
                return None
            return {k: (dict(v) if k == "ranks" else v) for k, v in row.items() if k != "ref"}

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)

    def __contains__(self, key: tuple) -> bool:
        """Whether (owner, session id) has figures."""
        with self._lock:
            return key in self._rows

    def keys(self) -> list[tuple]:
        """The (owner, session id) pairs that have figures."""
        with self._lock:
            return list(self._rows)


class _FeedbackCollector:
    def __init__(self, source):
        self.source = source

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from server.feedback import COUNTS, rate

        # Server-wide: books of every key summed per scope, so no label names a session, a model or a key.
        merged: dict[str, dict] = {scope: dict.fromkeys(COUNTS, 0) for scope in ("session", "model")}
        for scope, _name, stats in self.source.metric_rows():
            acc = merged.setdefault(scope, dict.fromkeys(COUNTS, 0))
            for k in COUNTS:
                acc[k] += stats.get(k, 0)
        events = CounterMetricFamily("dynarank_completion_feedback", "Completions and feedback events, all keys",
                                     labels=["scope", "event"])
        rates = GaugeMetricFamily("dynarank_acceptance_rate",
                                  "Accepted (incl. partially) over decided completions, all keys", labels=["scope"])
        for scope, counts in sorted(merged.items()):
            for k in COUNTS:
                events.add_metric([scope, k], counts[k])
            r = rate(counts)
            if r is not None:
                rates.add_metric([scope], r)
        yield events
        yield rates

    def describe(self):
        return []  # collected lazily: nothing to check at registration


class _ReplicaCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        figures = self.engine.replica_metrics()
        p = "dynarank_vllm_"
        families = {
            "up": GaugeMetricFamily(p + "replica_up", "vLLM replica up (1) or down (0)", labels=["replica"]),
            "inflight": GaugeMetricFamily(p + "replica_inflight", "Requests streaming on the replica",
                                          labels=["replica"]),
            "loaded": GaugeMetricFamily(p + "replica_loaded_versions", "Adapter versions loaded on the replica",
                                        labels=["replica"]),
            "requests": CounterMetricFamily(p + "replica_requests", "Requests sent to the replica",
                                            labels=["replica"]),
            "failures": CounterMetricFamily(p + "replica_failures", "Times the replica was marked down",
                                            labels=["replica"]),
        }
        for row in figures["replicas"]:
            for key, family in families.items():
                family.add_metric([row["url"]], float(row[key]))
        yield from families.values()
        routed = CounterMetricFamily(p + "routed", "Requests by routing outcome", labels=["outcome"])
        for outcome, n in figures["routed"].items():
            routed.add_metric([outcome], n)
        yield routed
        yield CounterMetricFamily(p + "stale_requests", "Requests run on an older adapter version than asked",
                                  value=figures["stale"])

    def describe(self):
        return []


class _PrefixCacheCollector:
    def __init__(self, cache):
        self.cache = cache

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        figures = self.cache.figures()
        p = "dynarank_prefix_cache_"
        yield CounterMetricFamily(p + "reused_tokens", "Prompt tokens whose prefill came from a recent prompt",
                                  value=figures["reused_tokens"])
        yield CounterMetricFamily(p + "prefilled_tokens", "Prompt tokens prefilled by the engine",
                                  value=figures["prefilled_tokens"])
        yield GaugeMetricFamily(p + "entries", "Recent prompts kept", value=figures["entries"])
        yield GaugeMetricFamily(p + "bytes", "Bytes of keys and values kept", value=figures["bytes"])

    def describe(self):
        return []


class _ServicesCollector:
    """Counts read at scrape time, so no code path has to remember to update a gauge."""

    def __init__(self, sessions, jobs):
        self.sessions, self.jobs = sessions, jobs

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        resident = self.sessions.sessions()
        sessions = session_counts(resident)
        yield GaugeMetricFamily("dynarank_sessions_resident", "Sessions held in memory",
                                value=sessions["resident"])
        yield GaugeMetricFamily("dynarank_sessions_connected", "Resident sessions with an open websocket",
                                value=sessions["connected"])
        yield GaugeMetricFamily("dynarank_training_queue_depth", "Training examples waiting, all resident sessions",
                                value=sum(len(getattr(s, "queue", ())) for s in resident))
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


