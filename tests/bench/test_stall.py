"""bench/stall.py on a tiny model: every heavy message gets its documented reply, /health is probed
throughout, and the flooding socket is held to its per-connection cap while the other client completes."""

from __future__ import annotations

import json
import math

from bench import stall
from tests.session_server import save_tiny_model


def test_a_short_stall_run_on_a_tiny_model(tmp_path, tokenizer):
    model = save_tiny_model(tmp_path / "tiny", tokenizer)
    out = tmp_path / "docs"
    assert stall.main(["--model", str(model), "--completions", "3", "--max-tokens", "4", "--out", str(out)]) == 0
    results = json.loads((out / "bench_stall.json").read_text())
    replies = {row["message"]: row["reply"] for row in results["stalls"]}
    assert list(replies.values())[:3] == ["ack", "ack", "ack"]  # the edits and the open are accepted
    assert replies["50,000-deep JSON"] == "invalid_json"
    assert all(math.isfinite(row["health_worst_ms"]) and row["health_worst_ms"] > 0 for row in results["stalls"])
    flood = results["flood"]
    assert len(flood["alone_s"]) == len(flood["flooded_s"]) == 3 and math.isfinite(flood["ratio_p95"])
    assert flood["flood_refused"] >= 60 - 4 and flood["flood_done"] > 0  # max_ws_inflight_per_connection: 4
    page = (out / "bench_stall.md").read_text()
    assert "dynarank bench stall --model tiny --completions 3" in page and str(tmp_path) not in page
