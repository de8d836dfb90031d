"""A bounded load run that stops itself: websocket sessions replay real edits and ask for
completions against a real server for a fixed time.

    dynarank bench soak                                  # 64 sessions, 600 s, smollm2-135m
    python -m bench.soak --sessions 8 --duration 90

Starts ``python -m server serve`` on a free port with its own temporary data dir (server
defaults otherwise; DYNARANK_* variables of the environment reach it), waits for ``/health``,
then runs every session in one asyncio client. Each session opens one file of a history in
shared/data and sends that file's commits as full-text edits, one per ``--edit-interval``, and
asks for a completion at its latest edit point every ``--completion-interval``, one at a time
as an editor would. Every ``--bucket-s`` (a minute): errors, completion latency p50/p95, server
RSS and CPU, training queue depth and versions published. The server is stopped (SIGTERM, then
kill) whatever happens. Writes docs/bench_soak.md, .json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.edits import read_jsonl_edits
from bench.latency import free_port, percentile, start_server
from bench.replay import _history_path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
HISTORIES = "click,starlette,cobra,zustand"
SAMPLE_S = 5.0  # how often the server's RSS, CPU and /metrics are read
LOST = {"type": "lost"}  # what a pending completion gets when its socket drops
_BREAK = re.compile(r"\r\n|\r|\n")


# -- what the sessions send ---------------------------------------------------------------


def first_difference(a: str, b: str) -> int:
    """Length of the common prefix of ``a`` and ``b`` (binary search over slices: no Python loop per character)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def lsp_position(text: str, index: int) -> dict:
    """The LSP position of ``text[index]``: line (a "\\r\\n" is one break) and UTF-16 character."""
    if 0 < index < len(text) and text[index - 1] == "\r" and text[index] == "\n":
        index -= 1  # never between the two characters of one break
    head = text[:index]
    start = max(head.rfind("\n"), head.rfind("\r")) + 1
    return {"line": len(_BREAK.findall(head)),
            "character": len(head[start:].encode("utf-16-le", "surrogatepass")) // 2}


def plan_documents(sources: list[Path], sessions: int) -> list[dict]:
    """One document per session, round robin over the histories; in each, the files with the most edits first.

    ``texts``: the file before its first edit, then after each edit, oldest first. ``offsets[k]``: where
    text k first differs from text k-1 (text 0: from text 1), the edit point a completion asks at;
    ``cursors[k]``: the same as an LSP position.
    """
    histories = []
    for source in sources:
        files: dict[str, list[dict]] = {}
        for edit in read_jsonl_edits(source):
            files.setdefault(edit["path"], []).append(edit)
        if files:  # sorted() is stable: files with as many edits keep the order the history touched them
            histories.append((source.name.split("_edits")[0], sorted(files.values(), key=len, reverse=True)))
    if not histories:
        raise ValueError("no edits in " + ", ".join(str(s) for s in sources))
    plans = []
    for i in range(sessions):
        name, files = histories[i % len(histories)]
        edits = files[(i // len(histories)) % len(files)]
        texts = [edits[0]["before"], *(e["after"] for e in edits)]
        offsets = [first_difference(texts[0], texts[1])]
        offsets += [first_difference(texts[k - 1], texts[k]) for k in range(1, len(texts))]
        plans.append({"history": name, "path": edits[0]["path"], "language": edits[0].get("language"),
                      "texts": texts, "offsets": offsets,
                      "cursors": [lsp_position(t, i) for t, i in zip(texts, offsets)]})
    return plans


# -- the client ---------------------------------------------------------------------------


class Recorder:
    """What the client saw, stamped in seconds since the load started."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.completions: list[dict] = []  # {"t": start, "latency", "version", "hidden"}
        self.errors: list[tuple[float, str]] = []  # (t, kind)
        self.edits: list[float] = []
        self.adapted: list[tuple[float, int]] = []  # (t, version) of every `adapted` push
        self.session_queue: list[tuple[float, int]] = []  # (t, queue_depth) of every `status` push
        self.skipped: list[float] = []  # completion ticks that found the session's previous one still running
        self.samples: list[dict] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def error(self, kind: str) -> None:
        self.errors.append((self.now(), kind))

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "t0"}


class SoakSession:
    """One websocket session: its document's edits at a steady pace, and a completion at the edit point.

    A dropped socket is counted and the session resumes (resume token, document re-opened), as an IDE would.
    """

    def __init__(self, n: int, url: str, plan: dict, rec: Recorder, args, stop: asyncio.Event):
        self.url, self.plan, self.rec, self.args, self.stop = url, plan, rec, args, stop
        self.rng = random.Random(args.seed * 100_003 + n)
        self.ws = None
        self.closing = False
        self.resume_token = None
        self.step = 0  # index of the text the document is at
        self.version = 0
        self.pending: dict[str, asyncio.Future] = {}
        self.cancelled: set[str] = set()
        self.ids = itertools.count(1)
        self._connection_task = None

    async def run(self) -> None:
        """Edits and completions until ``stop``; the last completion is waited for. The socket stays open."""
        self._connection_task = asyncio.create_task(self._connection())
        await asyncio.gather(self._edits(), self._completions())

    async def close(self) -> None:
        self.closing = True
        if self.ws is not None:
            await self.ws.close()
        if self._connection_task is not None:
            await asyncio.wait([self._connection_task], timeout=30)

    async def _connection(self) -> None:
        from websockets.asyncio.client import connect

        while not self.closing:
            was_ready = False
            try:
                # The IDE client's keepalive: a server too busy to answer pings drops the socket.
                async with connect(self.url, max_size=None, ping_interval=20, ping_timeout=20,
                                   open_timeout=30) as ws:
                    await ws.send(json.dumps({"type": "hello", "protocol": 1,
                                              "client": {"name": "dynarank-soak", "version": "1"},
                                              **({"resume_token": self.resume_token} if self.resume_token else {})}))
                    ready = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    if ready.get("type") != "ready":
                        raise ValueError(f"hello answered {ready}")
                    self.resume_token = ready["resume_token"]
                    self.version += 1  # a re-open after a drop replaces whatever the server kept
                    await ws.send(json.dumps({"type": "open", "path": self.plan["path"], "version": self.version,
                                              "text": self.plan["texts"][self.step],
                                              "language": self.plan["language"]}))
                    self.ws, was_ready = ws, True
                    async for raw in ws:
                        self._dispatch(json.loads(raw))
            except Exception:  # noqa: BLE001 - any failure of the socket is one error, counted below
                pass
            finally:
                self.ws = None
                for fut in self.pending.values():
                    if not fut.done():
                        fut.set_result(LOST)
                self.pending.clear()
            if self.closing:
                return
            self.rec.error("dropped" if was_ready else "connect")
            if self.stop.is_set():
                return  # the load is over: no reconnecting
            await asyncio.sleep(1.0)

    def _dispatch(self, msg: dict) -> None:
        kind = msg.get("type")
        if kind in ("completion.done", "error") and msg.get("id", msg.get("ref")) in self.pending:
            fut = self.pending.pop(msg.get("id", msg.get("ref")))
            if not fut.done():
                fut.set_result(msg)
        elif kind == "error":
            if not (msg.get("code") == "unknown_completion" and msg.get("ref") in self.cancelled):
                self.rec.error(f"error:{msg.get('code')}")  # an edit, open or cancel refused
        elif kind == "adapted":
            self.rec.adapted.append((self.rec.now(), msg.get("version")))
        elif kind == "status":
            self.rec.session_queue.append((self.rec.now(), msg.get("queue_depth", 0)))

    async def _send(self, msg: dict) -> bool:
        ws = self.ws
        if ws is None:
            return False  # not connected: the drop was counted
        try:
            await ws.send(json.dumps(msg))
            return True
        except Exception:  # noqa: BLE001 - the connection task counts the drop
            return False

    async def _wait_until(self, t: float) -> bool:
        """Sleep until ``t`` (load time); True when the run stopped first."""
        try:
            await asyncio.wait_for(self.stop.wait(), max(0.0, t - self.rec.now()))
            return True
        except asyncio.TimeoutError:
            return self.stop.is_set()

    async def _edits(self) -> None:
        interval = self.args.edit_interval
        t_next = self.rec.now() + self.rng.uniform(0, interval)  # spread the sessions over the interval
        while not await self._wait_until(t_next):
            t_next += interval
            if self.ws is None:
                continue
            # After the last commit the history starts over: the next edit goes back to the first text.
            self.step, self.version = (self.step + 1) % len(self.plan["texts"]), self.version + 1
            if await self._send({"type": "edit", "path": self.plan["path"], "version": self.version,
                                 "text": self.plan["texts"][self.step]}):
                self.rec.edits.append(self.rec.now())

    async def _completions(self) -> None:
        interval = self.args.completion_interval
        t_next = self.rec.now() + self.rng.uniform(0, interval)
        while not await self._wait_until(t_next):
            await self._complete_once()
            t_next += interval
            while t_next < self.rec.now():  # it took longer than the interval: those ticks are skipped
                self.rec.skipped.append(t_next)
                t_next += interval

    async def _complete_once(self) -> None:
        cid = f"c{next(self.ids)}"
        fut = asyncio.get_running_loop().create_future()
        self.pending[cid] = fut
        t = self.rec.now()
        if await self._send(self._complete_message(cid)):
            await self._await_completion(cid, fut, t)
        else:
            self.pending.pop(cid, None)

    def _complete_message(self, cid: str) -> dict:
        msg = {"type": "complete", "id": cid, "max_tokens": self.args.max_tokens}
        if self.args.prefix_chars:  # a narrower window than the server's, sent as text
            text, i = self.plan["texts"][self.step], self.plan["offsets"][self.step]
            n = self.args.prefix_chars
            prefix, suffix = text[max(0, i - n):i], text[i:i + n // 4]
            if prefix or suffix:  # (an empty document: path and cursor at 1:1 below)
                return {**msg, "prefix": prefix, "suffix": suffix}
        # As the VS Code extension asks: path and cursor, the server takes its own windows of the document.
        # Messages of one socket are handled in order, so the cursor is in the text of the last edit sent.
        return {**msg, "path": self.plan["path"], "cursor": self.plan["cursors"][self.step]}

    async def _await_completion(self, cid: str, fut: asyncio.Future, t: float) -> None:
        try:
            msg = await asyncio.wait_for(fut, self.args.completion_timeout)
        except asyncio.TimeoutError:
            self.pending.pop(cid, None)
            self.cancelled.add(cid)
            await self._send({"type": "cancel", "id": cid})
            self.rec.error("timeout")
            return
        if msg is LOST:
            self.rec.error("lost")  # the socket dropped under it
        elif msg["type"] == "error":
            self.rec.error(f"error:{msg.get('code')}")
        else:
            self.rec.completions.append({"t": t, "latency": self.rec.now() - t,
                                         "version": msg.get("adapter_version"), "hidden": bool(msg.get("hidden"))})


class Sampler:
    """The server's RSS and CPU time (psutil), /metrics figures and data dir size, every few seconds."""

    def __init__(self, proc: subprocess.Popen, base_url: str, data_dir: Path, rec: Recorder):
        import psutil

        self.proc, self.base_url, self.data_dir, self.rec = proc, base_url, data_dir, rec
        self.ps = psutil.Process(proc.pid)

    async def take(self, http) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        if self.proc.poll() is not None:
            raise ServerExited(self.proc.returncode)
        cpu = self.ps.cpu_times()
        sample = {"t": self.rec.now(), "rss_mb": self.ps.memory_info().rss / 2**20,
                  "server_cpu_s": cpu.user + cpu.system, "client_cpu_s": time.process_time()}
        try:
            r = await http.get(self.base_url + "/metrics")
            r.raise_for_status()
            values = {s.name: s.value for family in text_string_to_metric_families(r.text)
                      for s in family.samples if not s.labels}
            sample.update(queue_depth=values.get("dynarank_training_queue_depth"),
                          swaps=values.get("dynarank_adapter_swaps_total"),
                          inflight=values.get("dynarank_inflight_completions"),
                          connected=values.get("dynarank_sessions_connected"))
        except Exception:  # noqa: BLE001 - an HTTP error, a timeout or an unreadable page
            self.rec.error("http")
        sample["data_mb"] = await asyncio.to_thread(dir_mb, self.data_dir)
        self.rec.samples.append(sample)

    async def every(self, http, interval: float, stop: asyncio.Event, progress_s: float) -> None:
        """Sample until ``stop``, then once more (the end of the last bucket); a progress line every ``progress_s``."""
        next_progress = progress_s
        while True:
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except asyncio.TimeoutError:
                pass
            try:
                await self.take(http)
            except ServerExited:
                self.rec.error("server_exit")
                stop.set()
                return
            if self.rec.now() >= next_progress or stop.is_set():
                next_progress += progress_s
                last = self.rec.samples[-1]
                print(f"[{last['t']:6.0f}s] completions {len(self.rec.completions)}, errors {len(self.rec.errors)}, "
                      f"versions {last.get('swaps')}, queue {last.get('queue_depth')}, RSS {last['rss_mb']:.0f} MB",
                      flush=True)
            if stop.is_set():
                return


class ServerExited(Exception):
    pass


def dir_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass  # replaced meanwhile (atomic writes)
    return total / 2**20


async def wait_healthy(base_url: str, proc: subprocess.Popen, timeout: float = 600.0) -> float:
    """Seconds until ``/health`` answers 200; fails at once if the server exits."""
    import httpx

    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=5) as http:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
            try:
                if (await http.get(base_url + "/health")).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{base_url}/health did not answer within {timeout:.0f} s")


async def soak(args, plans: list[dict], proc: subprocess.Popen, port: int, data_dir: Path) -> dict:
    import httpx

    base_url = f"http://127.0.0.1:{port}"
    start_s = await wait_healthy(base_url, proc)
    rec, stop = Recorder(), asyncio.Event()
    sessions = [SoakSession(i, f"ws://127.0.0.1:{port}/v1/ws", plan, rec, args, stop) for i, plan in enumerate(plans)]
    async with httpx.AsyncClient(timeout=30) as http:
        sampler = Sampler(proc, base_url, data_dir, rec)
        await sampler.take(http)  # the baseline, before any session
        sampling = asyncio.create_task(sampler.every(http, SAMPLE_S, stop, args.bucket_s))
        tasks = [asyncio.create_task(s.run()) for s in sessions]
        try:
            await asyncio.wait_for(stop.wait(), args.duration)  # set early only when the server exits
        except asyncio.TimeoutError:
            stop.set()
        await sampling
        print(f"[{rec.now():6.0f}s] load stopped; waiting for the last completions", flush=True)
        await asyncio.wait(tasks, timeout=args.completion_timeout + 30)
        final = {}
        if proc.poll() is None:
            try:
                final = session_totals((await http.get(base_url + "/v1/sessions")).json()["data"])
            except Exception:  # noqa: BLE001
                rec.error("http")
        await asyncio.gather(*(s.close() for s in sessions))
    for task in tasks:  # a bug of the client itself is not a server error: fail loudly
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()
    return {"start_s": start_s, "record": rec.as_dict(), "sessions_final": final}


def session_totals(sessions: list[dict]) -> dict:
    """From ``GET /v1/sessions`` at the end: the sessions' steps, versions, queues and dropped examples."""
    return {"sessions": len(sessions), "steps": sum(s.get("steps") or 0 for s in sessions),
            "versions": sum(s.get("version") or 0 for s in sessions),
            "queue_depth": sum(s.get("queue_depth") or 0 for s in sessions),
            "queue_depth_max": max((s.get("queue_depth") or 0 for s in sessions), default=0),
            "dropped": sum(s.get("dropped") or 0 for s in sessions)}


# -- the server process -------------------------------------------------------------------


def stop_server(proc: subprocess.Popen, timeout: float = 120.0) -> dict:
    """SIGTERM (the server persists its sessions on the way out); past ``timeout`` a thread dump (the server
    of ``bench.latency.start_server`` writes one on SIGUSR1), then SIGKILL.

    uvicorn re-raises the SIGTERM once it has shut down, so a clean stop exits with -SIGTERM (or 0).
    """
    t0, killed = time.monotonic(), False
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            time.sleep(2)  # let faulthandler write
            proc.kill()
            proc.wait()
            killed = True
    return {"exit_code": proc.returncode, "stop_s": time.monotonic() - t0, "killed": killed,
            "clean": not killed and proc.returncode in (0, -signal.SIGTERM)}


def log_findings(log_path: Path) -> dict:
    """Tracebacks and ERROR lines in the server's output; only exception names leave (no paths)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    exceptions, in_tb = [], False
    for line in lines:
        if line.startswith("Traceback"):
            in_tb = True
        elif in_tb and line and not line.startswith((" ", "\t")):
            exceptions.append(re.split(r"[:\s]", line, maxsplit=1)[0])
            in_tb = False
    return {"tracebacks": sum(line.startswith("Traceback") for line in lines),
            "error_lines": sum(bool(re.search(r"\bERROR\b", line)) for line in lines),
            "exceptions": sorted(set(exceptions)),
            "thread_dump": any(line.startswith(("Thread 0x", "Current thread 0x")) for line in lines)}


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)  # SIGTERM to the bench: leave through the finally that stops the server


# -- results ------------------------------------------------------------------------------


def summarize(record: dict, duration: float, bucket_s: float) -> tuple[list[dict], dict]:
    """Rows per bucket (completions and errors by the time they started or happened) and totals."""
    n = max(1, math.ceil(duration / bucket_s - 1e-9))

    def bucket(t: float) -> int | None:
        return min(int(t // bucket_s), n - 1) if 0 <= t <= duration + SAMPLE_S / 2 else None

    by = [{"lat": [], "errors": 0, "skipped": 0, "edits": 0, "adapted": 0, "squeue": [], "samples": []}
          for _ in range(n)]
    for c in record["completions"]:
        if (k := bucket(c["t"])) is not None:
            by[k]["lat"].append(c["latency"])
    for t, _ in record["errors"]:
        by[min(int(max(t, 0) // bucket_s), n - 1)]["errors"] += 1  # errors after the end count too
    for key, items in (("skipped", record["skipped"]), ("edits", record["edits"]),
                       ("adapted", [t for t, _ in record["adapted"]])):
        for t in items:
            if (k := bucket(t)) is not None:
                by[k][key] += 1
    for t, depth in record["session_queue"]:
        if (k := bucket(t)) is not None:
            by[k]["squeue"].append(depth)
    samples = record["samples"]
    for s in samples[1:]:  # the first is the baseline at t = 0
        if (k := bucket(s["t"])) is not None:
            by[k]["samples"].append(s)
    rows, prev = [], samples[0] if samples else None
    for k, b in enumerate(by):
        ss = b["samples"]
        last = ss[-1] if ss else None
        row = {"minute": k + 1, "completions": len(b["lat"]), "errors": b["errors"], "skipped": b["skipped"],
               "p50": percentile(b["lat"], 0.5), "p95": percentile(b["lat"], 0.95), "edits": b["edits"],
               "versions": _delta(prev, last, "swaps"), "adapted": b["adapted"],
               "queue_max": _max(s.get("queue_depth") for s in ss),
               "session_queue_max": max(b["squeue"], default=None),
               "rss_mb": _median([s["rss_mb"] for s in ss]), "rss_max_mb": _max(s["rss_mb"] for s in ss),
               "server_cpu": _rate(prev, last, "server_cpu_s"), "client_cpu": _rate(prev, last, "client_cpu_s"),
               "data_mb": last["data_mb"] if last else None}
        rows.append(row)
        prev = last or prev
    lat = [c["latency"] for c in record["completions"]]
    kinds: dict[str, int] = {}
    for _, kind in record["errors"]:
        kinds[kind] = kinds.get(kind, 0) + 1
    during = [s for s in samples if s["t"] <= duration + SAMPLE_S / 2]
    totals = {"completions": len(lat), "hidden": sum(c["hidden"] for c in record["completions"]),
              "errors": len(record["errors"]), "errors_by_kind": dict(sorted(kinds.items())),
              "skipped": len(record["skipped"]), "edits": len(record["edits"]), "adapted": len(record["adapted"]),
              "p50": percentile(lat, 0.5), "p95": percentile(lat, 0.95),
              "versions": _delta(samples[0] if samples else None, during[-1] if during else None, "swaps"),
              "rss_first_mb": during[0]["rss_mb"] if during else None,
              "rss_last_mb": during[-1]["rss_mb"] if during else None}
    return rows, totals


def _delta(a, b, key):
    if not a or not b or a.get(key) is None or b.get(key) is None:
        return None
    return int(b[key] - a[key])


def _rate(a, b, key):
    if not a or not b or b["t"] <= a["t"]:
        return None
    return (b[key] - a[key]) / (b["t"] - a["t"])


def _median(values):
    return statistics.median(values) if values else None


def _max(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def target_verdicts(rows: list[dict], totals: dict, samples: list[dict], duration: float) -> list[dict]:
    """The issue's targets, each met or missed, with its figures."""
    out = [{"target": "0 errors", "met": totals["errors"] == 0,
            "detail": f"{totals['errors']} error(s)" + (": " + ", ".join(
                f"{k} {v}" for k, v in totals["errors_by_kind"].items()) if totals["errors"] else "")}]
    # The last 5 minutes (the second half of a shorter run). RSS swings with each step's activations, so
    # each end is the median of the samples over a span (a minute, or a quarter of the run) there.
    window = min(300.0, duration / 2)
    span = min(60.0, window / 2)
    start = _median([s["rss_mb"] for s in samples if duration - window <= s["t"] <= duration - window + span])
    end = _median([s["rss_mb"] for s in samples if duration - span <= s["t"] <= duration + SAMPLE_S / 2])
    target = "RSS flat after warm-up: growth in the last 5 minutes under 5%"
    if start and end:
        growth = end / start - 1
        out.append({"target": target, "met": growth < 0.05,
                    "detail": f"median {start:.0f} MB over {duration - window:.0f}-{duration - window + span:.0f} s, "
                              f"{end:.0f} MB over {duration - span:.0f}-{duration:.0f} s ({growth:+.1%})"})
    else:
        out.append({"target": target, "met": False, "detail": "too few samples"})
    first, last = rows[0]["p95"], rows[-1]["p95"]
    ratio = last / first if first and not math.isnan(first) and not math.isnan(last) else float("nan")
    out.append({"target": "p95 in the last minute within 1.2x of the first", "met": ratio <= 1.2,
                "detail": f"first {first:.2f} s, last {last:.2f} s ({ratio:.2f}x)"})
    return out


COLUMNS = [
    ("minute", "minute"), ("completions", "completions"), ("errors", "errors"), ("skipped", "ticks skipped"),
    ("p50", "p50 s"), ("p95", "p95 s"), ("edits", "edits sent"), ("versions", "versions published"),
    ("adapted", "adapted pushes"), ("queue_max", "queue depth max"), ("session_queue_max", "max per session"),
    ("rss_mb", "RSS MB (median)"), ("server_cpu", "server CPU cores"), ("client_cpu", "client CPU cores"),
    ("data_mb", "data dir MB"),
]


def write_report(results: dict, out: Path) -> str:
    from bench.report import _plot, fmt, machine, markdown_table

    out.mkdir(parents=True, exist_ok=True)
    cfg, rows, totals, server = results["config"], results["rows"], results["totals"], results["server"]
    table = markdown_table(rows, COLUMNS)
    bucket = "minute" if cfg["bucket_s"] == 60 else f"{cfg['bucket_s']:g} s"
    window = (f"the {cfg['prefix_chars']:,} characters before it and {cfg['prefix_chars'] // 4:,} after, sent as text"
              if cfg["prefix_chars"] else "path and cursor: the server's own windows of the document")
    plotted = _plot(out / "bench_soak.png", [
        ("completion latency (s)", {"p50": [r["p50"] for r in rows], "p95": [r["p95"] for r in rows]}),
        # (_plot labels the first panel only: the others name their lines in the title, in colour order)
        ("server RSS MB: median (blue), max (orange)",
         {k: [r[key] if r[key] is not None else float("nan") for r in rows]
          for k, key in (("median", "rss_mb"), ("max", "rss_max_mb"))}),
        ("queue depth max (blue), versions (orange)",
         {"queue depth max (all sessions)": [r["queue_max"] or 0 for r in rows],
          "versions published": [r["versions"] or 0 for r in rows]}),
    ], bucket)
    final = results.get("sessions_final") or {}
    log = server.get("log", {})
    lines = [
        f"# Soak: {cfg['sessions']} sessions for {cfg['duration']:g} s on {cfg['model']}", "",
        f"Command: `{cfg['command']}`", "",
        (f"Server `python -m server serve --model {cfg['model']} {' '.join(cfg.get('server_options', []))}` "
        "(server defaults otherwise, its own temporary data dir: one key for all sessions, so its websocket "
        "connection cap is raised to the sessions), "
        f"ready in {fmt(server['start_s'])} s; after the run SIGTERM stopped it in {fmt(server['stop_s'])} s "
        f"({'clean' if server['clean'] else 'not clean'}: exit code {server['exit_code']}"
        f"{', killed after a thread dump to its log' if server['killed'] else ''}). Client: one asyncio "
        f"process; each of the {cfg['sessions']} websocket sessions opens one file of a history "
        f"({cfg['histories']}; the files with the most commits first) and sends the file after each of its "
        f"commits as a full-text `edit` every {cfg['edit_interval']:g} s (starting over after the last), and "
        f"every {cfg['completion_interval']:g} s asks for a completion (`max_tokens` {cfg['max_tokens']}, the "
        f"server's default mode and sampling) at the start of its latest edit ({window}), one at a time: a "
        f"tick that finds the previous completion still running is skipped and counted. Machine: {machine()}, "
        f"shared with other work."), "",
        "## Targets", "",
        *[f"- **{'met' if v['met'] else 'missed'}**: {v['target']}. {v['detail']}." for v in results["targets"]], "",
        f"## Per {bucket}", "",
        table, "",
        ("Completions and their latency (send to `completion.done`) count in the bucket they started in; errors "
        "in the bucket they happened in (protocol `error`s, dropped sockets, completions lost with a socket or "
        f"past {cfg['completion_timeout']:g} s, failed `/metrics` reads). From `/metrics`, read every "
        f"{SAMPLE_S:g} s: versions published (`dynarank_adapter_swaps_total`) and the largest training queue "
        "depth (`dynarank_training_queue_depth`, all sessions); max per session is the largest `queue_depth` "
        "the sessions' `status` pushes reported. RSS: the median of the bucket's samples; data dir size at its end; "
        "CPU in cores used over it."), "",
        *(["![latency, RSS and queue per bucket](bench_soak.png)", ""] if plotted else []),
        "## Totals", "",
        (f"- completions {fmt(totals['completions'])} (hidden by the confidence gate {fmt(totals['hidden'])}), "
        f"p50 {fmt(totals['p50'])} s, p95 {fmt(totals['p95'])} s; ticks skipped {fmt(totals['skipped'])}"),
        f"- errors {fmt(totals['errors'])}" + (": " + ", ".join(f"{k} {v}" for k, v in totals["errors_by_kind"].items())
                                                 if totals["errors"] else ""),
        (f"- edits sent {fmt(totals['edits'])}; versions published {fmt(totals['versions'])}; `adapted` pushes "
        f"received {fmt(totals['adapted'])} (pushes are coalesced per connection)"),
        (f"- at the end (`GET /v1/sessions`): {fmt(final.get('sessions'))} sessions, {fmt(final.get('steps'))} "
        f"steps, {fmt(final.get('queue_depth'))} examples queued (at most {fmt(final.get('queue_depth_max'))} "
        f"in one session), {fmt(final.get('dropped'))} dropped from full queues"),
        f"- server log: {fmt(log.get('tracebacks'))} tracebacks, {fmt(log.get('error_lines'))} ERROR lines"
        + (f" ({', '.join(log['exceptions'])})" if log.get("exceptions") else "")
        + ("; it hung on shutdown: the thread dump is in its log" if log.get("thread_dump") else ""), "",
    ]
    (out / "bench_soak.md").write_text("\n".join(lines))
    (out / "bench_soak.json").write_text(json.dumps(results, indent=1, default=str))
    return table


# -- command line -------------------------------------------------------------------------


def command_line(args) -> str:
    """The options that shape the results; paths are shortened to their names (no paths of this machine)."""
    data = ",".join(Path(item).name if "/" in item else item for item in args.data.split(","))
    model = Path(args.model).name if "/" in args.model else args.model
    return (f"dynarank bench soak --sessions {args.sessions} --duration {args.duration:g} --model {model} "
            f"--edit-interval {args.edit_interval:g} --completion-interval {args.completion_interval:g} "
            f"--max-tokens {args.max_tokens} --prefix-chars {args.prefix_chars} "
            f"--completion-timeout {args.completion_timeout:g} --data {data} --bucket-s {args.bucket_s:g} "
            f"--seed {args.seed}")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m bench.soak")
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--sessions", type=int, default=64, help="websocket sessions (default: %(default)s)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or model directory")
    # The defaults keep 64 sessions on two CPU cores below saturation: about 16 completions and 64 edits a
    # minute over all sessions, each completion on a window of 1,000 characters (a 2,000-token prefill
    # takes seconds there); a completion a minute per session overloaded them (docs/bench.md, "Soak").
    p.add_argument("--edit-interval", type=float, default=60.0, help="seconds between a session's edits")
    p.add_argument("--completion-interval", type=float, default=240.0,
                   help="seconds between a session's completion requests (one in flight per session)")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each completion")
    p.add_argument("--prefix-chars", type=int, default=1000,
                   help="send the N characters before the edit point (and N/4 after) as the completion's text; "
                        "0: path + cursor, as the VS Code extension asks (the server's windows of 8,000 and "
                        "2,000 characters, whose prefill dominates a completion's cost on a CPU)")
    p.add_argument("--completion-timeout", type=float, default=60.0,
                   help="a completion not done after this many seconds is cancelled and counted as an error")
    p.add_argument("--data", default=HISTORIES,
                   help="edit histories, comma-separated: names in the shared data folder or JSONL(.gz) files "
                        "(default: %(default)s)")
    p.add_argument("--bucket-s", type=float, default=60.0, help="seconds per table row (default: a minute)")
    p.add_argument("--seed", type=int, default=0, help="spreads the sessions' start times")
    p.add_argument("--out", type=Path, default=DOCS, help="folder for bench_soak.md/.json/.png")
    p.set_defaults(func=run)
    return p


def server_options(args) -> list[str]:
    """Server options besides the defaults: the soak's sessions are as many users, but without API keys
    the server counts every local client as one key, whose websocket connections it caps
    (``--max-ws-connections-per-key``): the cap is raised to the sessions."""
    from server.config import Settings

    default = Settings.model_fields["max_ws_connections_per_key"].default
    return ["--max-ws-connections-per-key", str(max(args.sessions, default))]


def run(args) -> int:
    for name in ("sessions", "duration", "edit_interval", "completion_interval", "max_tokens",
                 "completion_timeout", "bucket_s"):
        if not getattr(args, name) > 0:
            print(f"--{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    plans = plan_documents([_history_path(item) for item in args.data.split(",") if item.strip()], args.sessions)
    work = Path(tempfile.mkdtemp(prefix="dynarank-bench-soak-"))
    port = free_port()
    proc = start_server(args.model, port, work / "data", work / "server.log", extra=server_options(args))
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_exit) if main_thread else None
    try:
        measured = asyncio.run(soak(args, plans, proc, port, work / "data"))
    except BaseException:
        print(f"soak failed; server log: {work / 'server.log'}", file=sys.stderr)
        raise
    finally:
        stopped = stop_server(proc)
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(work / "data", ignore_errors=True)  # session adapters: large, and of no further use
    rows, totals = summarize(measured["record"], args.duration, args.bucket_s)
    config = {"command": command_line(args), "sessions": args.sessions, "duration": args.duration,
              "model": Path(args.model).name, "server_options": server_options(args),
              "edit_interval": args.edit_interval,
              "completion_interval": args.completion_interval, "max_tokens": args.max_tokens,
              "prefix_chars": args.prefix_chars,
              "completion_timeout": args.completion_timeout, "bucket_s": args.bucket_s, "seed": args.seed,
              "histories": ", ".join(dict.fromkeys(p["history"] for p in plans)),
              "documents": [f"{p['history']}:{p['path']} ({len(p['texts']) - 1} commits)" for p in plans]}
    results = {"config": config, "rows": rows, "totals": totals,
               "targets": target_verdicts(rows, totals, measured["record"]["samples"], args.duration),
               "server": {"start_s": measured["start_s"], **stopped, "log": log_findings(work / "server.log")},
               "sessions_final": measured["sessions_final"], "samples": measured["record"]["samples"]}
    print(write_report(results, args.out))
    for verdict in results["targets"]:
        print(f"{'met' if verdict['met'] else 'MISSED'}: {verdict['target']}. {verdict['detail']}")
    log = results["server"]["log"]
    if stopped["clean"] and not totals["errors"] and not log.get("tracebacks") and not log.get("error_lines"):
        shutil.rmtree(work, ignore_errors=True)
    else:  # printed, not saved: results carry no machine paths
        print(f"server log kept: {work / 'server.log'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
