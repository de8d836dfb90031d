"""bench/context.py without a model: the request a budget builds, and the table's paired comparisons."""

from __future__ import annotations

import pytest

from bench.context import summarize
from bench.infill import DATA, sample_points


def run(seconds, chrf, exact=False, prompt_tokens=100):
    return {"seconds": seconds, "chrf": chrf, "exact": exact, "prompt_tokens": prompt_tokens}


def test_each_budget_is_compared_with_the_window_point_by_point():
    rows = [{"history": "h", "language": "python",
             "runs": {"0": run(10.0, 50.0, exact=True, prompt_tokens=2000), "1024": run(5.0, 40.0)}},
            {"history": "h", "language": "python",
             "runs": {"0": run(20.0, 50.0, prompt_tokens=2000), "1024": run(10.0, 60.0, exact=True)}}]
    table = summarize(rows, (0, 1024))
    window, cut = [r for r in table if r["language"] == "python"]
    assert window["budget"] == "window" and window["seconds_vs"] is None and window["chrf_vs"] is None
    assert cut["budget"] == 1024 and cut["seconds_vs"]["rel"] == pytest.approx(-0.5)
    assert cut["chrf_vs"]["rel"] == pytest.approx(0.0) and cut["em"] == 50.0 and cut["prompt_tokens"] == 100
    assert [r["language"] for r in table] == ["python", "python", "all", "all"]


def test_the_points_keep_the_whole_file_around_the_cursor():
    if not DATA.exists():
        pytest.skip("shared/data is not beside the checkout")
    points = sample_points(DATA, 2, 0, kinds=("line",), context=None)
    assert {p["kind"] for p in points} == {"line"} and len(points) == 8
    assert max(len(p["prefix"]) for p in points) > 1500  # not cut to bench infill's 1,500 characters
