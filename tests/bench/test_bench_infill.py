"""bench/infill.py without a model: the points it masks, its scores, and the gate replay."""

from __future__ import annotations

from bench.infill import block_points, gate_replay, line_points, score, summarize, wilson_interval

SOURCE = (
    "import os\n"
    "\n"
    "def area(width, height):\n"
    "    total = width * height\n"
    "    return total\n"
    "\n"
    "print(area(2, 3))\n"
)


def test_every_point_puts_its_reference_back_between_prefix_and_suffix():
    points = line_points(SOURCE) + block_points(SOURCE)
    assert points
    for p in points:
        assert p["prefix"] + p["reference"] + p["suffix"] == SOURCE
    lines = {p["reference"] for p in line_points(SOURCE)}
    assert "total = width * height" in lines and "import os" in lines
    (block,) = block_points(SOURCE)
    assert block["reference"] == "total = width * height\n    return total"
    assert block["prefix"].endswith("height):\n    ")


def test_score_ignores_surrounding_whitespace():
    point = {"reference": "return total"}
    assert score(point, {"text": "return total\n"})["exact"]
    assert not score(point, {"text": "return totals"})["exact"]
    assert score(point, {"text": "return total"})["chrf"] == 100


def row(history, exact, confidence, kind="line", language="python"):
    result = {"text": "x", "exact": exact, "chrf": 100.0 * exact, "chars": 1, "ref_chars": 1, "seconds": 0.1,
              "confidence": confidence}
    return {"history": history, "language": language, "kind": kind, "raw": {**result, "exact": False},
            "shaped": result}


def test_the_gate_replay_shows_less_and_more_precisely_when_confidence_predicts_acceptance():
    sure, unsure = {"mean_logprob": -0.1, "first_token_prob": 0.9}, {"mean_logprob": -3.0, "first_token_prob": 0.05}
    rows = [row("click", i % 2 == 0, sure if i % 2 == 0 else unsure) for i in range(80)]
    gate = gate_replay(rows)
    assert gate["shown_off"] == 80 and gate["precision_off"] == 0.5
    assert gate["shown_on"] < 80 and gate["precision_on"] > 0.5


def test_summary_has_a_row_per_language_and_kind_and_overall():
    rows = [row("click", True, None), row("cobra", False, None, kind="block", language="go")]
    table = {(r["language"], r["kind"]): r for r in summarize(rows)}
    assert table[("python", "line")]["shaped_em"] == 100 and table[("go", "block")]["shaped_em"] == 0
    assert table[("all", "line")]["em_gain"] == 100


def test_the_exact_match_interval_holds_the_rate_and_narrows_with_more_points():
    lo, hi = wilson_interval(6, 40)
    assert 0 < lo < 15 < hi < 35
    narrower = wilson_interval(60, 400)
    assert lo < narrower[0] and narrower[1] < hi
    assert wilson_interval(0, 40)[0] == 0 and wilson_interval(0, 40)[1] > 0
