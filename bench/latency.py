"""Completion latency of a real server while sessions adapt.

    python -m bench.latency --phase-s 45 --sessions 3
    dynarank bench latency

Starts ``python -m server serve`` on a free port, then an open-loop HTTP client
issues ``/v1/completions`` on the base model at a steady rate. Phases: idle, one
session adapting, several sessions adapting (websocket ``/v1/ws`` clients keep
sending file edits from the replay data). Then edit-to-live trials: on an idle
session, the time from sending an edit to its ``adapted`` push, and to the first
HTTP completion whose ``adapter_version`` includes it. Finally the in-process cost
of publishing a snapshot (the swap). Writes docs/bench_latency.md and .png.
"""

from __future__ import annotations

import argparse
import json
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


class LoadClient:
    """Open loop: one completion every 1/rate seconds, each in its own thread, whatever the others do."""

    def __init__(self, base_url: str, model: str, rate: float, max_tokens: int):
        self.base_url, self.model, self.rate, self.max_tokens = base_url, model, rate, max_tokens
        self.records: list[dict] = []  # {"t", "latency", "tokens", "ok"}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self.started = 0

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
        with self._lock:
            self.records.append(rec)

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


class EditingSession:
    """A websocket session that opens documents and edits them (one file edit = open before, edit to after)."""

    def __init__(self, ws_url: str, edits: list[dict], name: str):
        from websockets.sync.client import connect

        # websockets wants connect() used as a context manager; the session spans several phases.
        self._conn = connect(ws_url, max_size=None, ping_interval=None)
        self.ws = self._conn.__enter__()
        self.edits, self.name, self.n = edits, name, 0
        self.adapted: list[tuple[float, int]] = []  # (monotonic time, version)
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
                    self.version = msg["version"]
                    self.adapted.append((time.monotonic(), msg["version"]))
                elif msg.get("type") == "status":
                    self.queue_depth = msg.get("queue_depth", 0)
        except Exception:
            pass

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
    return {"requests": len(records), "errors": sum(not r["ok"] for r in records),
            "p50": percentile(lat, 0.5), "p95": percentile(lat, 0.95), "p99": percentile(lat, 0.99),
            "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
            "tokens_per_s_per_request": statistics.mean(per_req) if per_req else float("nan")}


def edit_to_live(base_url: str, served: str, session: EditingSession, trials: int, timeout: float = 120.0) -> list[dict]:
    """Per trial: seconds from sending an edit to its `adapted` push and to the first completion serving it."""
    import httpx

    out = []
    model = f"{served}:session-{session.session_id}"
    for _ in range(trials):
        t_wait = time.monotonic()
        while (session.queue_depth > 0 or (session.adapted and time.monotonic() - session.adapted[-1][0] < 1.0)) \
                and time.monotonic() - t_wait < timeout:
            time.sleep(0.2)  # start from an idle session, so the next version is this edit's
        v0 = session.version
        t0 = session.send_edit()
        adapted_s = live_s = None
        served_versions = []
        while time.monotonic() - t0 < timeout and live_s is None:
            r = httpx.post(base_url + "/v1/completions", timeout=120, json={
                "model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0})
            t_done = time.monotonic()
            version = r.json().get("adapter_version") if r.status_code == 200 else None
            served_versions.append(version)
            if version is not None and version > v0:
                live_s = t_done - t0
        for t, v in session.adapted:
            if v > v0 and t >= t0:
                adapted_s = t - t0
                break
        out.append({"from_version": v0, "edit_to_adapted_s": adapted_s, "edit_to_live_s": live_s,
                    "polls": len(served_versions)})
    return out


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


def run(args) -> int:
    import httpx

    edits = [e for e in read_jsonl_edits(args.data, limit=400) if e["before"] and e["after"] != e["before"]]
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="dynarank-bench-latency-"))
    proc = start_server(args.model, port, work / "data", work / "server.log", extra=("--edit-quiet-s", "0.3"))
    results = {"config": {"model": args.model, "rate": args.rate, "max_tokens": args.max_tokens,
                          "phase_s": args.phase_s, "sessions": args.sessions, "trials": args.trials}}
    sessions: list[EditingSession] = []
    try:
        t_boot = time.monotonic()
        wait_ready(base_url, proc)
        results["config"]["server_start_s"] = time.monotonic() - t_boot
        served = httpx.get(base_url + "/v1/models").json()["data"][0]["id"]
        ws_url = f"ws://127.0.0.1:{port}/v1/ws"
        client = LoadClient(base_url, served, args.rate, args.max_tokens)
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
        trial_session = EditingSession(ws_url, [e for e in edits if len(e["after"]) < 6000], "live")
        results["edit_to_live"] = edit_to_live(base_url, served, trial_session, args.trials)
        print(f"edit-to-live: {results['edit_to_live']}", flush=True)
        trial_session.close()
        sessions.append(EditingSession(ws_url, edits, "s0"))
        sessions[0].keep_editing(args.edit_interval)
        measure("1 session adapting")
        for i in range(1, args.sessions):
            sessions.append(EditingSession(ws_url, edits[i * 37:] + edits[: i * 37], f"s{i}"))
            sessions[-1].keep_editing(args.edit_interval)
        measure(f"{args.sessions} sessions adapting")
        for s in sessions:
            s.stop_editing()
        client.stop()
        client.drain(timeout=120)
        phases = {}
        for name, (t0, t1, versions) in windows.items():
            phases[name] = phase_stats(client.window(t0, t1), t1 - t0)
            phases[name]["adapted_versions"] = versions
            print(f"{name}: {phases[name]}", flush=True)
        results["phases"] = phases
    finally:
        for s in sessions:
            s.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    results["swap"] = swap_cost(args.model)
    table = write_report(results, args.out)
    print(table)
    print(f"server log: {work / 'server.log'}")  # printed, not saved: results carry no machine paths
    return 0


def write_report(results: dict, out: Path) -> str:
    from bench.report import _plot, fmt, machine, markdown_table

    out.mkdir(parents=True, exist_ok=True)
    rows = [{"phase": name, **st} for name, st in results["phases"].items()]
    cols = [("phase", "phase"), ("requests", "requests"), ("errors", "errors"), ("p50", "p50 s"), ("p95", "p95 s"),
            ("p99", "p99 s"), ("tokens_per_s", "tokens/s (all)"), ("tokens_per_s_per_request", "tokens/s per request"),
            ("adapted_versions", "versions published")]
    table = markdown_table(rows, cols).replace("|---:|", "|---|", 1)
    trials = results.get("edit_to_live", [])
    live_rows = [{"phase": str(i + 1), **t} for i, t in enumerate(trials)]
    live = markdown_table(live_rows, [("phase", "trial"), ("from_version", "version before"),
                                      ("edit_to_adapted_s", "edit -> adapted push (s)"),
                                      ("edit_to_live_s", "edit -> first completion on it (s)"), ("polls", "polls")])
    swap_rows = [{"phase": k, **v} for k, v in results["swap"].items()]
    swap = markdown_table(swap_rows, [("phase", "adapter"), ("params", "params"), ("publish_ms", "publish (snapshot clone) ms"),
                                      ("swap_us", "reference swap µs")])
    cfg = results["config"]
    text = "\n".join([
        "# Latency under adaptation", "",
        f"Server `python -m server serve --model {cfg['model']}` (hf engine, defaults: 1 adaptation worker, "
        f"1 training thread), started in {fmt(cfg.get('server_start_s'))} s. Client: open loop, one "
        f"`/v1/completions` on the base model every {fmt(1 / cfg['rate'])} s, {cfg['max_tokens']} tokens, greedy; "
        f"{cfg['phase_s']} s per phase. Adapting sessions send file edits (click history) over `/v1/ws` whenever "
        f"their queue is short. Machine: {machine()}, shared with other work. 'tokens/s (all)' is the tokens "
        f"served per second of the phase (equal to the offered load while the server keeps up); 'tokens/s per "
        f"request' is completion tokens over each request's latency. Percentiles of few requests are rough "
        f"(p99 is about the maximum).", "",
        table, "",
        "Edit-to-live (after the idle phase, load still running, no other session adapting): time from sending `edit` to the `adapted` "
        "push of the first version trained on it, and to the first HTTP completion (`max_tokens` 1, polled back "
        "to back) whose `adapter_version` includes it. Includes the server's edit coalescing quiet time (0.3 s here).", "",
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
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL(.gz) of file edits to send")
    p.add_argument("--rate", type=float, default=0.25, help="completions per second (open loop)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--phase-s", type=float, default=45.0, help="seconds per phase")
    p.add_argument("--sessions", type=int, default=3, help="sessions adapting in the last phase")
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
