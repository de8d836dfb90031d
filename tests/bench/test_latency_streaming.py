"""bench/latency.py: the streaming mode (concurrent openai clients while sessions adapt), the step times read
from the server's log, and the edit-to-live verdict; one short run on a tiny model through a real server."""

from __future__ import annotations

import json
import math

import pytest

from bench import latency
from tests.bench.test_soak import write_history
from tests.session_server import save_tiny_model


def test_step_times_read_the_servers_step_lines():
    log = (
        "2025 INFO dynarank.access: event=completion endpoint=completions\n"
        "2025 INFO dynarank.access: event=training_step total_s=3.0 waited_s=1.0 paused_s=1.0 pauses=4 session=a version=1\n"
        "2025 INFO dynarank.access: event=training_step total_s=2.0 waited_s=0.0 paused_s=0.0 pauses=0\n"  # a job's
        "2025 INFO dynarank.access: event=training_step total_s=5.0 waited_s=0.5 paused_s=2.5 pauses=9 session=b version=7\n"
    )
    steps = latency.step_times(log)
    assert steps["steps"] == 3
    assert steps["step_s"] == 2.0  # started steps took 2.0, 2.0 and 4.5 s
    assert steps["compute_s"] == 2.0  # of which 1.0, 2.0 and 2.0 s computing
    assert steps["waited_s"] == 0.5
    assert steps["paused_share"] == pytest.approx(3.5 / 8.5)
    assert steps["by_version"] == {"a:1": {"step_s": 2.0, "compute_s": 1.0, "waited_s": 1.0, "paused_s": 1.0},
                                   "b:7": {"step_s": 4.5, "compute_s": 2.0, "waited_s": 0.5, "paused_s": 2.5}}
    assert latency.step_times("no steps here") == {"steps": 0, "by_version": {}}


def test_each_trial_is_held_against_the_quiet_time_and_its_own_step():
    steps = {"by_version": {"a:1": {"step_s": 2.0, "compute_s": 1.0}, "a:2": {"step_s": 4.0, "compute_s": 3.0}}}
    trials = [{"session": "a", "version": 1, "edit_to_adapted_s": 2.5, "edit_to_live_s": 3.0},
              {"session": "a", "version": 2, "edit_to_adapted_s": 4.0, "edit_to_live_s": 4.4},
              {"session": "a", "version": None, "edit_to_adapted_s": None, "edit_to_live_s": None}]  # never adapted
    verdict = latency.live_verdicts(trials, 0.3, steps)
    assert [t["target_step_s"] for t in trials] == [pytest.approx(2.8), pytest.approx(4.8), None]
    assert [t["target_compute_s"] for t in trials] == [pytest.approx(1.8), pytest.approx(3.8), None]
    assert verdict["trials"] == 3 and verdict["met_step_s"] == 2 and verdict["met_compute_s"] == 0
    assert verdict["median_edit_to_adapted_s"] == pytest.approx(3.25)
    assert verdict["median_edit_to_live_s"] == pytest.approx(3.7)


def test_a_short_streaming_run_on_a_tiny_model(tmp_path, tokenizer):
    model = save_tiny_model(tmp_path / "tiny", tokenizer)
    write_history(tmp_path / "h_edits.jsonl.gz", {"a.py": 3, "b.py": 3})
    out = tmp_path / "docs"
    code = latency.main(["--mode", "streaming", "--model", str(model), "--data", str(tmp_path / "h_edits.jsonl.gz"),
                         "--clients", "2", "--sessions", "2", "--phase-s", "4", "--max-tokens", "4",
                         "--edit-quiet-s", "0.1", "--edit-interval", "0.5", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "bench_latency_streaming.json").read_text())
    phases = results["phases"]
    assert list(phases) == ["idle", "2 sessions adapting"]
    for st in phases.values():
        assert st["requests"] > 0 and st["errors"] == 0
        assert st["p95"] >= st["p50"] > 0 and math.isfinite(st["p95_vs_idle"])
    assert phases["idle"]["p50_vs_idle"] == 1.0
    assert phases["2 sessions adapting"]["adapted_versions"] > 0
    trials = results["edit_to_live"]
    assert trials and all(t["edit_to_live_s"] >= t["edit_to_adapted_s"] > 0.1 for t in trials)  # after the quiet time
    assert all(t["served_version"] > t["from_version"] for t in trials)
    assert results["steps"]["steps"] > 0 and results["steps"]["step_s"] > 0
    # Every trial found the step that published its version, and the step came after the quiet time.
    assert all(t["target_step_s"] >= t["target_compute_s"] > 0.1 + latency.LIVE_MARGIN_S for t in trials)
    assert results["live"]["trials"] == len(trials)
    page = (out / "bench_latency_streaming.md").read_text()
    assert str(tmp_path) not in page  # no paths of this machine
    assert "Target met" in page and "p95 / idle" in page


def test_the_phases_report_holds_each_trial_against_its_target(tmp_path):
    steps = latency.step_times(
        "event=training_step total_s=1.5 waited_s=0.0 paused_s=0.0 pauses=0 session=s version=1\n")
    trials = [{"session": "s", "from_version": 0, "version": 1, "edit_to_adapted_s": 1.9, "edit_to_live_s": 2.2,
               "served_version": 1}]
    phase = {"requests": 3, "errors": 0, "p50": 1.0, "p95": 1.2, "p99": 1.3, "tokens_per_s": 4.0,
             "tokens_per_s_per_request": 8.0, "adapted_versions": 0}
    results = {"config": {"model": "tiny", "rate": 0.25, "max_tokens": 16, "phase_s": 10, "sessions": 1, "trials": 1,
                          "edit_quiet_s": 0.3, "server_start_s": 5.0},
               "phases": {"idle": phase}, "edit_to_live": trials, "steps_edit_to_live": steps,
               "live": latency.live_verdicts(trials, 0.3, steps),
               "swap": {"r8": {"params": 10, "publish_ms": 1.0, "swap_us": 2.0}}}
    latency.write_report(results, tmp_path)
    page = (tmp_path / "bench_latency.md").read_text()
    assert "| 1 | 0 | 1.900 | 2.300 | 2.300 | 2.200 |" in page  # target 0.3 + 1.5 + 0.5
    assert "1 of 1 trials with the step as run, 1 of 1 with its compute alone" in page
