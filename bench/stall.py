"""What one client can do to everyone else (issue 17's targets), on a real server.

    dynarank bench stall --model smollm2-135m

Stalls: a probe thread asks ``GET /health`` every 20 ms on its own connection while
a websocket client sends, one at a time, the heaviest single messages the
reliability probe found (an edit with 200 end-of-line changes on a 500,000-character
line, an edit that turns ``"a\\n" * 2400`` into ``"a\\nb\\n" * 1200``, an ``open``
of 1,000,000 characters, 50,000-deep JSON) and an HTTP completion with ``echo`` and ``logprobs`` on a
3.5 MB prompt. For each: the longest ``/health`` answer among the probes sent
between the message and its reply (target: 100 ms).

Flood: another client's websocket completions (``--completions`` of them, one
after another), first alone, then while one socket keeps as many completions in
flight as it may (it sends 60 at once, of which those over its per-connection
cap are refused, and a new one whenever one finishes). Target: the other client's p95 under the flood at most 2x its p95 alone.
Writes docs/bench_stall.md, .json and .png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from bench.latency import free_port, percentile, start_server, wait_ready
from bench.soak import stop_server

DOCS = Path(__file__).resolve().parents[1] / "docs"
POLL_S = 0.02
SETTLE_S = 3.0  # an edit becomes training examples after the quiet time (0.75 s): watch past the reply
STALL_TARGET_MS = 100.0
FLOOD_TARGET = 2.0
PROMPT = "import os\n\n\ndef list_python_files(root):\n    \"\"\"Return the .py files under root.\"\"\"\n"


class HealthProbe:
    """``GET /health`` every ``POLL_S`` on one keep-alive connection: (start, seconds) per answer."""

    def __init__(self, base_url: str):
        import httpx

        self.client = httpx.Client(base_url=base_url, timeout=60)
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.client.get("/health").raise_for_status()
            self.samples.append((t0, time.monotonic() - t0))
            self._stop.wait(POLL_S)

    def worst_ms(self, t0: float, t1: float) -> float:
        """The longest answer to a probe sent while a message was handled (one sent just before counts too)."""
        during = [s for start, s in list(self.samples) if t0 - POLL_S <= start <= t1]
        return 1000 * max(during, default=float("nan"))


def heavy_messages() -> list[tuple[str, dict | str, dict | None]]:
    """(name, message, document to open first) for the websocket cases."""
    long_line = "x" * 500_000
    end = {"line": 0, "character": len(long_line)}
    changes = [{"range": {"start": end, "end": end}, "text": "y"}] * 200
    a_lines = "a\n" * 2400
    return [
        ("edit: 200 changes at the end of a 500,000-character line", {"type": "edit", "path": "long.py", "version": 2,
                                                                      "changes": changes, "id": 1},
         {"path": "long.py", "text": long_line}),
        ('edit: "a\\n" x 2400 -> "a\\nb\\n" x 1200', {"type": "edit", "path": "lines.py", "version": 2,
                                                    "text": "a\nb\n" * 1200, "id": 2},
         {"path": "lines.py", "text": a_lines}),
        ("open: a 1,000,000-character document", {"type": "open", "path": "big.py", "version": 1, "id": 3,
                                                  "text": ("z" * 99 + "\n") * 10_000}, None),
        ("50,000-deep JSON", "[" * 50_000 + "]" * 50_000, None),
    ]


def measure_stalls(base_url: str, ws_url: str) -> list[dict]:
    import httpx
    from websockets.sync.client import connect

    rows = []
    with HealthProbe(base_url) as probe, connect(ws_url, max_size=None) as ws:
        ws.send(json.dumps({"type": "hello"}))
        json.loads(ws.recv())
        for name, msg, document in heavy_messages():
            if document is not None:
                ws.send(json.dumps({"type": "open", "version": 1, "id": f"pre-{name}", **document}))
                _reply(ws, f"pre-{name}")
            time.sleep(0.2)  # a few quiet probes first
            t0 = time.monotonic()
            ws.send(msg if isinstance(msg, str) else json.dumps(msg))
            reply = _reply(ws, None if isinstance(msg, str) else msg["id"])
            t1 = time.monotonic()
            time.sleep(SETTLE_S)
            rows.append({"message": name, "reply": reply.get("code") or reply["type"], "handled_s": t1 - t0,
                         "health_worst_ms": probe.worst_ms(t0, t1 + SETTLE_S)})
        time.sleep(0.2)
        body = {"model": httpx.get(base_url + "/v1/models").json()["data"][0]["id"], "prompt": "x = 1\n" * 500_000,
                "max_tokens": 1, "echo": True, "logprobs": 1}
        t0 = time.monotonic()
        r = httpx.post(base_url + "/v1/completions", json=body, timeout=600)
        t1 = time.monotonic()
        code = r.json().get("error", {}).get("code") if r.status_code >= 400 else "ok"
        time.sleep(SETTLE_S)
        rows.append({"message": "HTTP completion, echo + logprobs, 3.5 MB body", "reply": f"{r.status_code} {code}",
                     "handled_s": t1 - t0, "health_worst_ms": probe.worst_ms(t0, t1 + SETTLE_S)})
    for row in rows:
        row["met"] = row["health_worst_ms"] <= STALL_TARGET_MS
    return rows


def _reply(ws, msg_id) -> dict:
    """The next ack/error for ``msg_id`` (any error when ``msg_id`` is None); pushes are skipped."""
    while True:
        msg = json.loads(ws.recv(timeout=600))
        if msg["type"] in ("ack", "error") and (msg_id is None or msg.get("id") == msg_id):
            return msg


def victim_latencies(ws_url: str, n: int, max_tokens: int) -> list[float]:
    from websockets.sync.client import connect

    out = []
    with connect(ws_url) as ws:
        ws.send(json.dumps({"type": "hello"}))
        json.loads(ws.recv())
        for i in range(-1, n):  # -1: a warm-up, not counted
            t0 = time.monotonic()
            ws.send(json.dumps({"type": "complete", "id": f"v{i}", "prefix": PROMPT, "max_tokens": max_tokens}))
            while (msg := json.loads(ws.recv(timeout=600)))["type"] not in ("completion.done", "error"):
                pass
            if msg["type"] == "error":
                raise RuntimeError(f"the measured client's completion failed: {msg}")
            if i >= 0:
                out.append(time.monotonic() - t0)
    return out


class Flooder:
    """One socket that keeps completions in flight: 60 at once (those over the per-connection cap are
    refused), then one more whenever one finishes."""

    def __init__(self, ws_url: str, max_tokens: int):
        self.ws_url, self.max_tokens = ws_url, max_tokens
        self.done = self.refused = 0
        self.started = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        if not self.started.wait(120):
            raise TimeoutError("the flooding client did not start")
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from websockets.sync.client import connect

        with connect(self.ws_url) as ws:
            ws.send(json.dumps({"type": "hello"}))
            json.loads(ws.recv())
            sent = 0

            def send():
                nonlocal sent
                ws.send(json.dumps({"type": "complete", "id": f"f{sent}", "prefix": PROMPT,
                                    "max_tokens": self.max_tokens, "temperature": 0.8, "seed": sent}))
                sent += 1

            for _ in range(60):
                send()
            self.started.set()
            while not self._stop.is_set():
                try:
                    msg = json.loads(ws.recv(timeout=1))
                except TimeoutError:
                    continue
                if msg["type"] == "completion.done":
                    self.done += 1
                    send()
                elif msg["type"] == "error":
                    self.refused += 1


def measure_flood(ws_url: str, n: int, max_tokens: int) -> dict:
    alone = victim_latencies(ws_url, n, max_tokens)
    with Flooder(ws_url, max_tokens) as flood:
        flooded = victim_latencies(ws_url, n, max_tokens)
    p95_alone, p95_flooded = percentile(alone, 0.95), percentile(flooded, 0.95)
    return {"completions": n, "max_tokens": max_tokens, "alone_s": alone, "flooded_s": flooded,
            "p50_alone": percentile(alone, 0.5), "p95_alone": p95_alone,
            "p50_flooded": percentile(flooded, 0.5), "p95_flooded": p95_flooded,
            "ratio_p95": p95_flooded / p95_alone, "flood_done": flood.done, "flood_refused": flood.refused,
            "met": p95_flooded <= FLOOD_TARGET * p95_alone}


def write_report(results: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.report import fmt, machine, markdown_table

    out.mkdir(parents=True, exist_ok=True)
    stalls, flood = results["stalls"], results["flood"]
    stall_table = markdown_table(stalls, [("message", "message"), ("reply", "reply"), ("handled_s", "handled in s"),
                                          ("health_worst_ms", "worst /health ms"), ("met", "<= 100 ms")])
    flood_table = markdown_table([
        {"case": "alone", "p50": flood["p50_alone"], "p95": flood["p95_alone"]},
        {"case": "one socket flooding", "p50": flood["p50_flooded"], "p95": flood["p95_flooded"]},
    ], [("case", "the measured client's completions"), ("p50", "p50 s"), ("p95", "p95 s")])
    lines = [
        "# One client against everyone else: stalls and a flood",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Server `dynarank serve --model {results['model']}` (defaults), one process, loopback. "
        f"Machine: {machine()}, shared with other work.",
        "",
        "## /health while one heavy message is handled",
        "",
        f"`GET /health` every {int(POLL_S * 1000)} ms on its own connection; the worst answer among those sent "
        f"from sending the message until {SETTLE_S:g} s after its reply (an edit's diff and examples are built "
        "after the quiet time).",
        "",
        stall_table,
        "",
        "## Another client's completions while one socket floods",
        "",
        f"{flood['completions']} completions (`max_tokens` {flood['max_tokens']}, one after another) by one "
        "websocket client alone, then while another socket keeps completions in flight (60 at once, then one "
        f"more whenever one finishes: {flood['flood_done']} finished and {flood['flood_refused']} were "
        "refused, over the per-connection cap). Measured first, on the fresh server, before any session trains.",
        "",
        flood_table,
        "",
        f"p95 under the flood / alone: {fmt(flood['ratio_p95'])}x (target at most {FLOOD_TARGET:g}x): "
        f"**{'met' if flood['met'] else 'missed'}**. With {flood['completions']} completions per case the p95 "
        "is close to the slowest one.",
        "",
        "![worst /health answer per message and the measured client's latencies](bench_stall.png)",
        "",
    ]
    text = "\n".join(lines)
    (out / "bench_stall.md").write_text(text)
    (out / "bench_stall.json").write_text(json.dumps(results, indent=1))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.barh([r["message"][:40] for r in stalls], [r["health_worst_ms"] for r in stalls])
    a.axvline(STALL_TARGET_MS, color="red", linestyle="--", label="target")
    a.set_xlabel("worst /health answer (ms)")
    a.legend()
    b.boxplot([flood["alone_s"], flood["flooded_s"]], tick_labels=["alone", "flooded"])
    b.set_ylabel("completion latency (s)")
    fig.tight_layout()
    fig.savefig(out / "bench_stall.png", dpi=100)
    plt.close(fig)
    return stall_table + "\n\n" + flood_table


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m bench.stall", description=__doc__.split("\n\n")[0])
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or model directory")
    p.add_argument("--completions", type=int, default=20, help="the measured client's completions per case")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every completion")
    p.add_argument("--out", type=Path, default=DOCS, help="folder for bench_stall.md/.json/.png")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="dynarank-bench-stall-"))
    port = free_port()
    base_url, ws_url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/ws"
    proc = start_server(args.model, port, work / "data", work / "server.log")
    try:
        wait_ready(base_url, proc)
        model = Path(args.model).name  # a model directory's name, not a path of this machine
        results = {"command": f"dynarank bench stall --model {model} --completions {args.completions} "
                              f"--max-tokens {args.max_tokens}", "model": model,
                   "flood": measure_flood(ws_url, args.completions, args.max_tokens),  # before anything trains
                   "stalls": measure_stalls(base_url, ws_url)}
    finally:
        stop_server(proc)
    print(write_report(results, args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
