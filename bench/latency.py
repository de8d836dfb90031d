"""Completion latency of a real server while sessions adapt.

    python -m bench.latency --phase-s 45 --sessions 3
    python -m bench.latency --mode streaming --clients 8 --sessions 2 --phase-s 60
    dynarank bench latency

Starts ``python -m server serve`` on a free port with its own data dir. Two modes:

``phases`` (default): an open-loop HTTP client issues ``/v1/completions`` on the
base model at a steady rate. Phases: idle, one session adapting, several sessions
adapting (websocket ``/v1/ws`` clients keep sending file edits from the replay
data). Between the idle and the adapting phases, edit-to-live trials on an
otherwise idle session. Finally the in-process cost of publishing a snapshot (the
swap). Writes docs/bench_latency.md and .png.

``streaming`` (the load of issue 15): ``--clients`` concurrent ``openai`` clients,
each streaming one completion after another, so serving never goes quiet. Phases:
idle, then ``--sessions`` websocket sessions adapting (one runs edit-to-live
trials back to back, the others keep editing). p50/p95 of each phase as a ratio to
idle, and edit-to-live against its target: the quiet time + one step + 0.5 s.
Writes docs/bench_latency_streaming.md and .json.

Edit-to-live, both modes: from sending an edit to its ``adapted`` push (the version
is live from then on), and to the end of the first completion asked for after
the push, which must carry the new ``adapter_version``. The step's own time comes
from the server's ``event=training_step`` log lines (one per step: its wall time,
and how long it waited for serving at its start and at its pause points).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.edits import DEFAULT_DATA, read_jsonl_edits

DOCS = Path(__file__).resolve().parents[1] / "docs"
PROMPT = "import os\n\n\ndef list_python_files(root):\n    \"\"\"Return the .py files under root.\"\"\"\n"
LIVE_MARGIN_S = 0.5  # edit-to-live target: the quiet time + one step + this
STEP_LINE = re.compile(r"event=training_step total_s=(\S+) waited_s=(\S+) paused_s=(\S+) pauses=(\d+)"
                       r"(?: session=(\S+) version=(\d+))?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `dynarank serve` that writes every thread's stack to its log on SIGUSR1 (a hang can then be read).
SERVE = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
         "from server.cli import main; sys.exit(main())")


def start_server(model: str, port: int, data_dir: Path, log_path: Path, extra=()) -> subprocess.Popen:
    cmd = [sys.executable, "-c", SERVE, "serve", "--model", model, "--port", str(port), "--data-dir", str(data_dir),
           *extra]
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])


def wait_ready(base_url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base_url + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError("server did not become ready")


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class RequestLog:
    """Completion records ``{"t", "latency", "tokens", "ok"}`` (``t``: start, monotonic), kept across threads."""

    def __init__(self):
        self.records: list[dict] = []
        self._lock = threading.Lock()
        self.started = 0

    def _record(self, rec: dict) -> None:
        with self._lock:
            self.records.append(rec)

    def drain(self, timeout: float) -> None:
        """Wait for the requests still in flight (their records count for the phase they started in)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            with self._lock:
                if len(self.records) >= self.started:
                    return
            time.sleep(0.2)

    def window(self, t0: float, t1: float) -> list[dict]:
        with self._lock:
            return [r for r in self.records if t0 <= r["t"] < t1 and r["latency"] is not None]


class LoadClient(RequestLog):
    """Open loop: one completion every 1/rate seconds, each in its own thread, whatever the others do."""

    def __init__(self, base_url: str, model: str, rate: float, max_tokens: int):
        super().__init__()
        self.base_url, self.model, self.rate, self.max_tokens = base_url, model, rate, max_tokens
        self._stop = threading.Event()
        self._thread = None

    def _one(self, t_sched: float) -> None:
        import httpx

        t0 = time.monotonic()
        rec = {"t": t0, "latency": None, "tokens": 0, "ok": False}
        try:
            r = httpx.post(self.base_url + "/v1/completions", timeout=120, json={
                "model": self.model, "prompt": PROMPT, "max_tokens": self.max_tokens, "temperature": 0})
            rec["ok"] = r.status_code == 200
            if rec["ok"]:
                rec["tokens"] = r.json().get("usage", {}).get("completion_tokens", 0)
        except Exception:
            pass
        rec["latency"] = time.monotonic() - t0
        self._record(rec)

    def _loop(self) -> None:
        k, t_start = 0, time.monotonic()
        while not self._stop.is_set():
            t_next = t_start + k / self.rate
            if self._stop.wait(max(0.0, t_next - time.monotonic())):
                break
            threading.Thread(target=self._one, args=(t_next,), daemon=True).start()
            k += 1
            self.started = k

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


class StreamingClients(RequestLog):
    """Closed loop: ``n`` ``openai`` clients, each streaming one completion after another (the next as soon
    as its last one ended), so serving stays busy. Records also carry ``ttft`` (seconds to the first text)."""

    def __init__(self, base_url: str, model: str, n: int, max_tokens: int):
        super().__init__()
        self.base_url, self.model, self.n, self.max_tokens = base_url, model, n, max_tokens
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._count_lock = threading.Lock()

    def _loop(self) -> None:
        from openai import OpenAI

        # The server asks for no key unless started with one; the client insists on some string.
        client = OpenAI(base_url=self.base_url + "/v1", api_key="bench", max_retries=0, timeout=300)
        while not self._stop.is_set():
            with self._count_lock:
                self.started += 1
            t0 = time.monotonic()
            rec = {"t": t0, "latency": None, "ttft": None, "tokens": 0, "ok": False}
            try:
                stream = client.completions.create(model=self.model, prompt=PROMPT, max_tokens=self.max_tokens,
                                                   temperature=0, stream=True, stream_options={"include_usage": True})
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].text and rec["ttft"] is None:
                        rec["ttft"] = time.monotonic() - t0
                    if chunk.usage is not None:  # the last chunk
                        rec["tokens"] = chunk.usage.completion_tokens
                rec["ok"] = True
            except Exception as exc:
                rec["error"] = type(exc).__name__
            rec["latency"] = time.monotonic() - t0
            self._record(rec)

    def start(self) -> None:
        for i in range(self.n):
            t = threading.Thread(target=self._loop, name=f"stream-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()


class EditingSession:
    """A websocket session that opens documents and edits them (one file edit = open before, edit to after)."""

    def __init__(self, ws_url: str, edits: list[dict], name: str):
        from websockets.sync.client import connect

        # websockets wants connect() used as a context manager; the session spans several phases.
        self._conn = connect(ws_url, max_size=None, ping_interval=None)
        self.ws = self._conn.__enter__()
        self.edits, self.name, self.n = edits, name, 0
        self.adapted: list[tuple[float, int]] = []  # (monotonic time, version)
        self._adapted_cond = threading.Condition()
        self.queue_depth = 0
        self._send_lock = threading.Lock()
        self.send({"type": "hello", "client": {"name": "bench", "version": "1"}})
        ready = json.loads(self.ws.recv())
        if ready.get("type") != "ready":
            raise RuntimeError(f"no ready: {ready}")
        self.session_id, self.version = ready["session_id"], ready["adapter_version"]
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._stop = threading.Event()

    def send(self, msg: dict) -> None:
        with self._send_lock:
            self.ws.send(json.dumps(msg))

    def _read(self) -> None:
        try:
            for raw in self.ws:
                msg = json.loads(raw)
                if msg.get("type") == "adapted":
                    with self._adapted_cond:
                        self.version = msg["version"]
                        self.adapted.append((time.monotonic(), msg["version"]))
                        self._adapted_cond.notify_all()
                elif msg.get("type") == "status":
                    self.queue_depth = msg.get("queue_depth", 0)
        except Exception:
            pass

    def wait_adapted(self, after_version: int, since: float, timeout: float) -> tuple[float, int] | None:
        """(monotonic time, version) of the first ``adapted`` push of a version above ``after_version``
        received at or after ``since``; None if none came within ``timeout`` seconds."""
        def first():
            return next(((t, v) for t, v in self.adapted if v > after_version and t >= since), None)

        with self._adapted_cond:
            self._adapted_cond.wait_for(lambda: first() is not None, timeout)
            return first()

    def send_edit(self) -> float:
        """Open the next file edit's before text, then send its after text; returns the edit's send time."""
        edit = self.edits[self.n % len(self.edits)]
        path = f"{self.name}/{self.n}/{edit['path']}"
        self.n += 1
        self.send({"type": "open", "path": path, "language": edit.get("language") or "python",
                   "text": edit["before"], "version": 1})
        t = time.monotonic()
        self.send({"type": "edit", "path": path, "version": 2, "text": edit["after"]})
        return t

    def keep_editing(self, interval: float) -> None:
        """Send an edit whenever the queue is short, at most one per ``interval`` seconds, until stopped."""

        def loop():
            while not self._stop.is_set():
                if self.queue_depth < 2:
                    self.send_edit()
                self._stop.wait(interval)

        threading.Thread(target=loop, daemon=True).start()

    def stop_editing(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        try:
            self._conn.__exit__(None, None, None)
        except Exception:
            pass


def phase_stats(records: list[dict], seconds: float) -> dict:
    lat = [r["latency"] for r in records if r["ok"]]
    tokens = sum(r["tokens"] for r in records if r["ok"])
    per_req = [r["tokens"] / r["latency"] for r in records if r["ok"] and r["latency"] > 0]
    ttft = [r["ttft"] for r in records if r["ok"] and r.get("ttft") is not None]
    return {"requests": len(records), "errors": sum(not r["ok"] for r in records),
            "p50": percentile(lat, 0.5), "p95": percentile(lat, 0.95), "p99": percentile(lat, 0.99),
            "ttft_p50": percentile(ttft, 0.5) if ttft else None, "ttft_p95": percentile(ttft, 0.95) if ttft else None,
            "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
            "tokens_per_s_per_request": statistics.mean(per_req) if per_req else float("nan")}


def edit_to_live(base_url: str, served: str, session: EditingSession, trials: int, timeout: float = 300.0,
                 until: float | None = None) -> list[dict]:
    """Per trial: seconds from sending an edit to its ``adapted`` push, and to the end of the first completion
    asked for after the push (it must carry the new version). Stops early at the monotonic time ``until``."""
    import httpx

    out = []
    model = f"{served}:session-{session.session_id}"
    for _ in range(trials):
        if until is not None and time.monotonic() >= until:
            break
        t_wait = time.monotonic()
        while (session.queue_depth > 0 or (session.adapted and time.monotonic() - session.adapted[-1][0] < 1.0)) \
                and time.monotonic() - t_wait < timeout:
            time.sleep(0.2)  # start from an idle session, so the next version is this edit's
        v0 = session.version
        t0 = session.send_edit()
        adapted = session.wait_adapted(v0, t0, timeout)
        adapted_s = live_s = served_version = version = None
        if adapted is not None:
            adapted_s, version = adapted[0] - t0, adapted[1]
            r = httpx.post(base_url + "/v1/completions", timeout=timeout, json={
                "model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0})
            served_version = r.json().get("adapter_version") if r.status_code == 200 else None
            if served_version is not None and served_version > v0:
                live_s = time.monotonic() - t0
        out.append({"session": session.session_id, "from_version": v0, "version": version,
                    "edit_to_adapted_s": adapted_s, "edit_to_live_s": live_s, "served_version": served_version})
    return out


def step_times(log_text: str) -> dict:
    """The server's ``event=training_step`` lines: per published version (``by_version``: "session:version"
    -> seconds from start to publish with the pauses for serving (``step_s``), computing alone
    (``compute_s``), waiting before it started (``waited_s``)), and medians over all steps, with the share
    of started steps' time they spent paused for serving (``paused_share``)."""
    rows, by_version = [], {}
    for m in STEP_LINE.finditer(log_text):
        total, waited, paused = (float(g) for g in m.group(1, 2, 3))
        row = {"step_s": total - waited, "compute_s": total - waited - paused, "waited_s": waited, "paused_s": paused}
        rows.append(row)
        if m.group(5) is not None:
            by_version[f"{m.group(5)}:{m.group(6)}"] = row
    if not rows:
        return {"steps": 0, "by_version": {}}
    started = sum(r["step_s"] for r in rows)
    return {"steps": len(rows), "by_version": by_version,
            **{key: statistics.median(r[key] for r in rows) for key in ("step_s", "compute_s", "waited_s")},
            "paused_share": sum(r["paused_s"] for r in rows) / started if started > 0 else float("nan")}


def live_verdicts(trials: list[dict], quiet_s: float, steps: dict) -> dict:
    """Each trial's edit -> adapted push (the version is live from the push on) against its target: the
    quiet time + the step that published it + LIVE_MARGIN_S, with the step as the server ran it (pauses
    for serving included, ``step_s``) and as its compute alone (``compute_s``). Adds the targets to the
    trials; returns how many met each, and the medians."""
    out = {"trials": len(trials), "met_step_s": 0, "met_compute_s": 0}
    for trial in trials:
        step = steps.get("by_version", {}).get(f"{trial.get('session')}:{trial.get('version')}")
        for key in ("step_s", "compute_s"):
            target = None if step is None else quiet_s + step[key] + LIVE_MARGIN_S
            trial[f"target_{key}"] = target
            if target is not None and trial["edit_to_adapted_s"] is not None and trial["edit_to_adapted_s"] <= target:
                out[f"met_{key}"] += 1
    for key in ("edit_to_adapted_s", "edit_to_live_s", "target_step_s", "target_compute_s"):
        values = [t[key] for t in trials if t.get(key) is not None]
        out[f"median_{key}"] = statistics.median(values) if values else None
    return out


class ServerUnderTest:
    """``dynarank serve`` on a free port with its own data dir; ``stop()`` ends it and keeps its log."""

    def __init__(self, model: str, extra=()):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/ws"
        self.work = Path(tempfile.mkdtemp(prefix="dynarank-bench-latency-"))
        self.log_path = self.work / "server.log"
        t0 = time.monotonic()
        self.proc = start_server(model, self.port, self.work / "data", self.log_path, extra=extra)
        try:
            wait_ready(self.base_url, self.proc)
        except Exception:
            self.stop()
            raise
        self.start_s = time.monotonic() - t0

    @property
    def served(self) -> str:
        import httpx

        return httpx.get(self.base_url + "/v1/models").json()["data"][0]["id"]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def swap_cost(model_name: str, repeats: int = 20) -> dict:
    """In process: time to publish a snapshot (clone factors) and to swap the reference under the session lock."""
    import torch

    from adapter_core import AdapterConfig, new_session_adapter
    from server.models import load_model, resolve_model

    torch.set_num_threads(1)
    model, _ = load_model(resolve_model(model_name, progress=False))
    out = {}
    for rank in (8, 32):
        adapter, _ = new_session_adapter(model, AdapterConfig(policy="fixed", r_init=rank))
        lock, holder = threading.RLock(), {"snap": adapter.snapshot(bump=False)}
        publish, swap = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            snap = adapter.snapshot()
            t1 = time.perf_counter()
            with lock:
                holder["snap"] = snap
            swap.append(time.perf_counter() - t1)
            publish.append(t1 - t0)
        out[f"r{rank}"] = {"params": snap.num_params, "publish_ms": 1000 * statistics.median(publish),
                           "swap_us": 1e6 * statistics.median(swap)}
    return out


def _load_edits(args) -> list[dict]:
    return [e for e in read_jsonl_edits(args.data, limit=400) if e["before"] and e["after"] != e["before"]]


def _trial_edits(edits: list[dict]) -> list[dict]:
    return [e for e in edits if len(e["after"]) < 6000]  # one step each, not a huge file


def run(args) -> int:
    return run_streaming(args) if args.mode == "streaming" else run_phases(args)


def run_phases(args) -> int:
    edits = _load_edits(args)
    server = ServerUnderTest(args.model, extra=("--edit-quiet-s", str(args.edit_quiet_s)))
    results = {"config": {"model": Path(args.model).name, "rate": args.rate, "max_tokens": args.max_tokens,
                          "phase_s": args.phase_s, "sessions": args.sessions, "trials": args.trials,
                          "edit_quiet_s": args.edit_quiet_s, "server_start_s": server.start_s}}
    sessions: list[EditingSession] = []
    try:
        served = server.served
        client = LoadClient(server.base_url, served, args.rate, args.max_tokens)
        client.start()
        windows = {}  # phase -> (start, end); stats once every request of the phase has finished

        def measure(name: str) -> None:
            t0 = time.monotonic()
            v0 = sum(len(s.adapted) for s in sessions)
            time.sleep(args.phase_s)
            windows[name] = (t0, time.monotonic(), sum(len(s.adapted) for s in sessions) - v0)
            print(f"phase {name} done", flush=True)

        time.sleep(3)  # warm-up request(s)
        measure("idle")
        # Edit-to-live before the other sessions load the worker (their queues would come first).
        trial_session = EditingSession(server.ws_url, _trial_edits(edits), "live")
        results["edit_to_live"] = edit_to_live(server.base_url, served, trial_session, args.trials)
        results["steps_edit_to_live"] = step_times(server.log_text())
        print(f"edit-to-live: {results['edit_to_live']}", flush=True)
        trial_session.close()
        sessions.append(EditingSession(server.ws_url, edits, "s0"))
        sessions[0].keep_editing(args.edit_interval)
        measure("1 session adapting")
        for i in range(1, args.sessions):
            sessions.append(EditingSession(server.ws_url, edits[i * 37:] + edits[: i * 37], f"s{i}"))
            sessions[-1].keep_editing(args.edit_interval)
        measure(f"{args.sessions} sessions adapting")
        for s in sessions:
            s.stop_editing()
        client.stop()
        client.drain(timeout=120)
        results["phases"] = _phases(client, windows)
        results["live"] = live_verdicts(results["edit_to_live"], args.edit_quiet_s, results["steps_edit_to_live"])
    finally:
        for s in sessions:
            s.close()
        server.stop()
    results["swap"] = swap_cost(args.model)
    table = write_report(results, args.out)
    print(table)
    print(f"server log: {server.log_path}")  # printed, not saved: results carry no machine paths
    return 0


def run_streaming(args) -> int:
    """The issue-15 load: ``--clients`` streaming clients throughout; idle, then ``--sessions`` adapting."""
    if args.sessions < 1:
        raise SystemExit("--mode streaming needs --sessions >= 1 (one of them runs the edit-to-live trials)")
    edits = _load_edits(args)
    server = ServerUnderTest(args.model, extra=("--edit-quiet-s", str(args.edit_quiet_s)))
    results = {"config": {"mode": "streaming", "model": Path(args.model).name, "clients": args.clients,
                          "max_tokens": args.max_tokens, "phase_s": args.phase_s, "sessions": args.sessions,
                          "edit_quiet_s": args.edit_quiet_s, "server_start_s": server.start_s}}
    sessions: list[EditingSession] = []
    clients = None
    try:
        served = server.served
        clients = StreamingClients(server.base_url, served, args.clients, args.max_tokens)
        clients.start()
        time.sleep(3)  # every client has its first completion under way
        windows = {}
        t0 = time.monotonic()
        time.sleep(args.phase_s)
        windows["idle"] = (t0, time.monotonic(), 0)
        print("phase idle done", flush=True)

        trial_session = EditingSession(server.ws_url, _trial_edits(edits), "live")
        sessions.append(trial_session)
        for i in range(1, args.sessions):
            sessions.append(EditingSession(server.ws_url, edits[i * 37:] + edits[: i * 37], f"s{i}"))
            sessions[-1].keep_editing(args.edit_interval)
        name = f"{args.sessions} sessions adapting"
        t0 = time.monotonic()
        # Trials back to back until the phase ends (at least one, however long it takes).
        trials = edit_to_live(server.base_url, served, trial_session, 1)
        trials += edit_to_live(server.base_url, served, trial_session, 10_000, until=t0 + args.phase_s)
        remaining = t0 + args.phase_s - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        windows[name] = (t0, time.monotonic(), sum(len(s.adapted) for s in sessions))
        print(f"phase {name} done; edit-to-live: {trials}", flush=True)
        for s in sessions:
            s.stop_editing()
        clients.stop()
        clients.drain(timeout=300)
        results["phases"] = _phases(clients, windows)
        idle = results["phases"]["idle"]
        for st in results["phases"].values():
            for q in ("p50", "p95"):
                st[f"{q}_vs_idle"] = st[q] / idle[q] if idle[q] else float("nan")
        results["edit_to_live"] = trials
        results["steps"] = step_times(server.log_text())
        results["live"] = live_verdicts(trials, args.edit_quiet_s, results["steps"])
    finally:
        if clients is not None:
            clients.stop()
        for s in sessions:
            s.close()
        server.stop()
    table = write_streaming_report(results, args.out)
    print(table)
    print(f"server log: {server.log_path}")
    return 0


def _phases(log: RequestLog, windows: dict) -> dict:
    phases = {}
    for name, (t0, t1, versions) in windows.items():
        phases[name] = phase_stats(log.window(t0, t1), t1 - t0)
        phases[name]["adapted_versions"] = versions
        print(f"{name}: {phases[name]}", flush=True)
    return phases


LIVE_COLUMNS = [("phase", "trial"), ("from_version", "version before"), ("edit_to_adapted_s", "edit -> adapted push (s)"),
                ("target_step_s", "target, step as run (s)"), ("target_compute_s", "target, step's compute (s)"),
                ("edit_to_live_s", "edit -> first completion on it (s)")]


def _live_text(results: dict, steps: dict) -> str:
    """The edit-to-live trials with their targets, the step times and the verdicts, as markdown."""
    from bench.report import fmt, markdown_table

    trials = results.get("edit_to_live", [])
    table = markdown_table([{"phase": str(i + 1), **t} for i, t in enumerate(trials)], LIVE_COLUMNS)
    live = results.get("live", {})
    lines = [table, ""]
    if steps.get("steps"):
        lines.append(
            f"Steps ({steps['steps']}, from the server's `event=training_step` lines): median "
            f"{fmt(steps['step_s'])} s from start to publish, pauses for serving included; "
            f"{fmt(steps['compute_s'])} s of it computing; median wait for serving before a step started "
            f"{fmt(steps['waited_s'])} s; paused {fmt(100 * steps['paused_share'])}% of started steps' time.")
    if live.get("trials"):
        lines.append(
            f"Target met (edit -> adapted push within the quiet time + the trial's own step + {LIVE_MARGIN_S} s): "
            f"{live['met_step_s']} of {live['trials']} trials with the step as run, {live['met_compute_s']} of "
            f"{live['trials']} with its compute alone. Medians: edit -> adapted push "
            f"{fmt(live['median_edit_to_adapted_s'])} s, -> first completion on it {fmt(live['median_edit_to_live_s'])} s.")
    return "\n".join(lines)


def write_streaming_report(results: dict, out: Path) -> str:
    from bench.report import fmt, machine, markdown_table

    out.mkdir(parents=True, exist_ok=True)
    cfg = results["config"]
    rows = [{"phase": name, **st} for name, st in results["phases"].items()]
    table = markdown_table(rows, [
        ("phase", "phase"), ("requests", "completions"), ("errors", "errors"), ("p50", "p50 s"), ("p95", "p95 s"),
        ("p50_vs_idle", "p50 / idle"), ("p95_vs_idle", "p95 / idle"), ("ttft_p95", "first token p95 s"),
        ("tokens_per_s", "tokens/s (all)"), ("adapted_versions", "versions published")]).replace("|---:|", "|---|", 1)
    live = _live_text(results, results.get("steps", {}))
    text = "\n".join([
        "# Latency under adaptation: streaming clients", "",
        f"Server `python -m server serve --model {cfg['model']} --edit-quiet-s {cfg['edit_quiet_s']}` (hf engine, "
        f"defaults otherwise), started in {fmt(cfg['server_start_s'])} s. Load: {cfg['clients']} `openai` clients, "
        f"each streaming one `/v1/completions` ({cfg['max_tokens']} tokens, greedy, base model) after another, "
        f"so serving never goes quiet; {cfg['phase_s']} s per phase. In the adapting phase {cfg['sessions']} "
        f"websocket sessions adapt: one runs the edit-to-live trials back to back, the others send click edits "
        f"whenever their queue is short. Machine: {machine()}, shared with other work.", "",
        table, "",
        "Edit-to-live under that load: from sending `edit` to the `adapted` push (the version is live from the "
        "push on), and to the end of the first completion asked for after it (`max_tokens` 1, on the session's "
        f"model; it must carry the new version). Target: the quiet time + one step + {LIVE_MARGIN_S} s, the "
        "step being the one that published the trial's version.", "",
        live, "",
    ])
    (out / "bench_latency_streaming.md").write_text(text)
    (out / "bench_latency_streaming.json").write_text(json.dumps(results, indent=1, default=str))
    return table + "\n\n" + live


def write_report(results: dict, out: Path) -> str:
    from bench.report import _plot, fmt, machine, markdown_table

    out.mkdir(parents=True, exist_ok=True)
    rows = [{"phase": name, **st} for name, st in results["phases"].items()]
    cols = [("phase", "phase"), ("requests", "requests"), ("errors", "errors"), ("p50", "p50 s"), ("p95", "p95 s"),
            ("p99", "p99 s"), ("tokens_per_s", "tokens/s (all)"), ("tokens_per_s_per_request", "tokens/s per request"),
            ("adapted_versions", "versions published")]
    table = markdown_table(rows, cols).replace("|---:|", "|---|", 1)
    live = _live_text(results, results.get("steps_edit_to_live", {}))
    swap_rows = [{"phase": k, **v} for k, v in results["swap"].items()]
    swap = markdown_table(swap_rows, [("phase", "adapter"), ("params", "params"), ("publish_ms", "publish (snapshot clone) ms"),
                                      ("swap_us", "reference swap µs")])
    cfg = results["config"]
    text = "\n".join([
        "# Latency under adaptation", "",
        f"Server `python -m server serve --model {cfg['model']} --edit-quiet-s {cfg['edit_quiet_s']}` (hf engine, "
        f"defaults otherwise: 1 adaptation worker, "
        f"1 training thread), started in {fmt(cfg.get('server_start_s'))} s. Client: open loop, one "
        f"`/v1/completions` on the base model every {fmt(1 / cfg['rate'])} s, {cfg['max_tokens']} tokens, greedy; "
        f"{cfg['phase_s']} s per phase. Adapting sessions send file edits (click history) over `/v1/ws` whenever "
        f"their queue is short. Machine: {machine()}, shared with other work. 'tokens/s (all)' is the tokens "
        f"served per second of the phase (equal to the offered load while the server keeps up); 'tokens/s per "
        f"request' is completion tokens over each request's latency. Percentiles of few requests are rough "
        f"(p99 is about the maximum).", "",
        table, "",
        "Edit-to-live (after the idle phase, load still running, no other session adapting): time from sending "
        "`edit` to the `adapted` push of the first version trained on it (live from then on), and to the end of "
        "the first HTTP completion asked for after the push (`max_tokens` 1; it must carry the new "
        f"`adapter_version`). Includes the server's edit coalescing quiet time ({cfg['edit_quiet_s']} s here); "
        f"target: the quiet time + one step + {LIVE_MARGIN_S} s.", "",
        live, "",
        "Cost of a swap (in process): publishing a version clones the factors into an immutable snapshot; "
        "serving then swaps one reference under the session lock (the swap time includes freeing the "
        "previous version, which nothing else holds here).", "",
        swap, "",
    ])
    if _plot(out / "bench_latency.png", [("completion latency p50/p95/p99 (s)", {
            q: [results["phases"][p][q] for p in results["phases"]] for q in ("p50", "p95", "p99")})], "phase"):
        text += "![latency by phase](bench_latency.png) (x: " + ", ".join(
            f"{i + 1} = {p}" for i, p in enumerate(results["phases"])) + ")\n"
    (out / "bench_latency.md").write_text(text)
    (out / "bench_latency.json").write_text(json.dumps(results, indent=1, default=str))
    return table + "\n\n" + live + "\n\n" + swap


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m bench.latency")
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--mode", choices=("phases", "streaming"), default="phases",
                   help="phases: an open-loop client, idle / 1 / N sessions adapting; streaming: --clients "
                        "streaming openai clients, idle / N sessions adapting (the issue-15 load)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL(.gz) of file edits to send")
    p.add_argument("--rate", type=float, default=0.25, help="completions per second (open loop)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--phase-s", type=float, default=45.0, help="seconds per phase")
    p.add_argument("--sessions", type=int, default=3, help="sessions adapting in the last phase")
    p.add_argument("--clients", type=int, default=8, help="streaming mode: concurrent openai clients")
    p.add_argument("--edit-quiet-s", type=float, default=0.3, help="the server's edit coalescing quiet time")
    p.add_argument("--edit-interval", type=float, default=2.0, help="seconds between a session's edits (at most)")
    p.add_argument("--trials", type=int, default=3, help="edit-to-live trials")
    p.add_argument("--out", type=Path, default=DOCS)
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
