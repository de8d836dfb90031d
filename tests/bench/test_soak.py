"""bench/soak.py: edit points the server accepts, the per-bucket figures and verdicts, and a short real run."""

from __future__ import annotations

import gzip
import json
import math

import pytest

from bench import soak
from code_signals import apply_range_edits
from tests.session_server import save_tiny_model

BEFORE = 'import os\n\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n'
AFTERS = [
    BEFORE + '\n\ndef write(path, text):\n    with open(path, "w") as f:\n        f.write(text)\n',
    BEFORE.replace("return f.read()", "data = f.read()\n        return data.strip()"),
    BEFORE + '\n\nclass Store:\n    def __init__(self, root):\n        self.root = os.path.abspath(root)\n',
]


@pytest.mark.parametrize("sessions", [3, 64, 100])
def test_the_server_takes_every_session_of_the_soak(sessions):
    """All sessions come from one client without a key; a server capping that key's websocket
    connections below them refuses the rest over and over (a whole run of `connect` errors)."""
    from server.cli import build_parser, settings_from_args

    args = soak.build_parser().parse_args(["--sessions", str(sessions)])
    serve = build_parser().parse_args(["serve", *soak.server_options(args)])
    assert settings_from_args(serve).max_ws_connections_per_key >= sessions


@pytest.mark.parametrize("text", ["ab\r\ncd\r\nef", "é😀x\ny😀z\rw", "one line", "x\n\n\n"])
def test_every_edit_point_is_a_position_the_server_reads_back(text):
    for i in range(len(text) + 1):
        cursor = soak.lsp_position(text, i)
        marked = apply_range_edits(text, [{"range": {"start": cursor, "end": cursor}, "text": "\0"}])
        j = marked.index("\0")
        # The one place it may differ: inside a "\r\n", which is one break to an editor.
        assert j == i or (text[i - 1:i + 1] == "\r\n" and j == i - 1), (text, i, cursor)


def test_first_difference():
    assert soak.first_difference("abcdef", "abcxef") == 3
    assert soak.first_difference("abc", "abc") == 3
    assert soak.first_difference("abc", "abcd") == 3
    assert soak.first_difference("", "x") == 0


def write_history(path, files: dict[str, int]):
    """A JSONL.gz history: ``files`` maps a path to its number of commits (each one of AFTERS, in turn)."""
    with gzip.open(path, "wt") as f:
        for name, commits in files.items():
            text = BEFORE
            for k in range(commits):
                after = AFTERS[k % len(AFTERS)]
                f.write(json.dumps({"path": name, "language": "python", "before": text, "after": after}) + "\n")
                text = after


def test_sessions_get_the_files_with_most_commits_first_across_histories(tmp_path):
    write_history(tmp_path / "one_edits.jsonl.gz", {"a.py": 1, "b.py": 3})
    write_history(tmp_path / "two_edits.jsonl.gz", {"c.py": 2})
    plans = soak.plan_documents([tmp_path / "one_edits.jsonl.gz", tmp_path / "two_edits.jsonl.gz"], 5)
    assert [(p["history"], p["path"]) for p in plans] == [("one", "b.py"), ("two", "c.py"), ("one", "a.py"),
                                                         ("two", "c.py"), ("one", "b.py")]
    b = plans[0]
    assert b["texts"] == [BEFORE, *AFTERS] and len(b["cursors"]) == 4
    # The completion asks where the edit that led to the text starts: after BEFORE for an append.
    assert b["cursors"][1] == soak.lsp_position(AFTERS[0], len(BEFORE))


def test_a_completion_asks_at_the_edit_point_by_cursor_or_with_a_narrower_window(tmp_path):
    import argparse
    import asyncio

    write_history(tmp_path / "h_edits.jsonl.gz", {"a.py": 2})
    (plan,) = soak.plan_documents([tmp_path / "h_edits.jsonl.gz"], 1)
    args = argparse.Namespace(seed=0, max_tokens=8, prefix_chars=0)
    session = soak.SoakSession(0, "ws://unused", plan, soak.Recorder(), args, asyncio.Event())
    session.step = 1
    assert session._complete_message("c1") == {"type": "complete", "id": "c1", "max_tokens": 8, "path": "a.py",
                                               "cursor": plan["cursors"][1]}
    args.prefix_chars = 8
    msg = session._complete_message("c2")
    assert msg["prefix"] == BEFORE[-8:] and msg["suffix"] == AFTERS[0][len(BEFORE):len(BEFORE) + 2]
    assert "path" not in msg and "cursor" not in msg


def sample(t, rss, swaps, queue=0):
    return {"t": t, "rss_mb": rss, "swaps": swaps, "queue_depth": queue, "server_cpu_s": t, "client_cpu_s": t / 10,
            "data_mb": 1.0, "inflight": 0, "connected": 2}


def test_buckets_and_verdicts():
    record = {
        "completions": [{"t": 1, "latency": 0.1, "version": 0, "hidden": False},
                        {"t": 2, "latency": 0.3, "version": 1, "hidden": True},
                        {"t": 12, "latency": 0.5, "version": 2, "hidden": False}],
        "errors": [(11.0, "timeout"), (25.0, "dropped")],  # the second after the end: last bucket
        "edits": [0.5, 5, 15], "adapted": [(3, 1), (13, 2)], "session_queue": [(3, 4), (13, 1)], "skipped": [14.0],
        "samples": [sample(0, 100, 0), sample(4, 110, 1, 3), sample(9, 120, 2), sample(14, 130, 3), sample(20, 140, 5)],
    }
    rows, totals = soak.summarize(record, duration=20, bucket_s=10)
    assert [r["completions"] for r in rows] == [2, 1]
    assert [r["errors"] for r in rows] == [0, 2]
    assert [r["versions"] for r in rows] == [2, 3] and totals["versions"] == 5
    assert [r["edits"] for r in rows] == [2, 1] and [r["skipped"] for r in rows] == [0, 1]
    assert [r["queue_max"] for r in rows] == [3, 0] and [r["session_queue_max"] for r in rows] == [4, 1]
    assert [r["rss_mb"] for r in rows] == [115, 135]  # the median of each bucket's samples
    assert rows[0]["server_cpu"] == pytest.approx(1.0) and rows[1]["client_cpu"] == pytest.approx(0.1)
    assert rows[1]["p95"] == pytest.approx(0.5) and totals["hidden"] == 1
    assert totals["errors_by_kind"] == {"dropped": 1, "timeout": 1}
    verdicts = soak.target_verdicts(rows, totals, record["samples"], 20)
    assert [v["met"] for v in verdicts] == [False, False, False]
    # The second half of the run: the median over its first quarter (130 MB) against its last (140 MB).
    assert "+7.7%" in verdicts[1]["detail"]
    record.update(errors=[], samples=[sample(t, 100 + t / 20, t) for t in range(0, 25, 5)],
                  completions=[{"t": 1, "latency": 0.5, "version": 0, "hidden": False},
                               {"t": 12, "latency": 0.55, "version": 0, "hidden": False}])
    rows, totals = soak.summarize(record, duration=20, bucket_s=10)
    assert [v["met"] for v in soak.target_verdicts(rows, totals, record["samples"], 20)] == [True, True, True]


def test_a_short_soak_on_a_tiny_model_counts_completions_and_versions(tmp_path, tokenizer):
    model = save_tiny_model(tmp_path / "tiny", tokenizer)
    write_history(tmp_path / "h_edits.jsonl.gz", {"a.py": 3, "b.py": 2})
    out = tmp_path / "docs"
    code = soak.main(["--model", str(model), "--data", str(tmp_path / "h_edits.jsonl.gz"), "--sessions", "3",
                      "--duration", "24", "--bucket-s", "12", "--edit-interval", "2", "--completion-interval", "1.5",
                      "--prefix-chars", "0",
                      "--out", str(out)])
    assert code == 0
    results = json.loads((out / "bench_soak.json").read_text())
    rows, totals = results["rows"], results["totals"]
    assert [r["minute"] for r in rows] == [1, 2]
    assert totals["errors"] == 0, totals["errors_by_kind"]
    assert totals["completions"] >= 6 and all(r["completions"] > 0 for r in rows)
    assert all(math.isfinite(r["p50"]) and r["p95"] >= r["p50"] > 0 for r in rows)
    assert totals["edits"] >= 6 and totals["versions"] > 0 and totals["adapted"] > 0
    assert results["sessions_final"]["sessions"] == 3 and results["sessions_final"]["steps"] > 0
    assert all(r["rss_mb"] > 0 for r in rows)
    assert results["server"]["clean"] and results["server"]["log"]["tracebacks"] == 0
    page = (out / "bench_soak.md").read_text()
    assert "dynarank bench soak --sessions 3 --duration 24 --model tiny" in page
    assert str(tmp_path) not in page  # no paths of this machine
    assert page.count("**met**") + page.count("**missed**") == 3
    header = next(line for line in page.splitlines() if line.startswith("| minute"))
    assert all(title in header for _, title in soak.COLUMNS)
    pytest.importorskip("matplotlib")
    assert (out / "bench_soak.png").is_file()
