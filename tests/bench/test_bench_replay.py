"""The edit replay on a tiny model: table columns, finite numbers, evaluate-before-adapt."""

from __future__ import annotations

import math

import pytest

from bench.replay import replay, summarize
from bench.report import REPLAY_COLUMNS, write_replay_report
from tests.conftest import build_tiny_model

BASE = '''import os


def read(path):
    with open(path) as f:
        return f.read()
'''
EDITS = [
    (BASE, BASE + '''

def write(path, text):
    with open(path, "w") as f:
        f.write(text)
'''),
    (BASE, BASE.replace("return f.read()", "data = f.read()\n        return data.strip()")),
    (BASE, BASE + '''

class Store:
    def __init__(self, root):
        self.root = os.path.abspath(root)
'''),
]


@pytest.fixture(scope="module")
def result(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    edits = [{"path": "m.py", "language": "python", "before": b, "after": a, "commit": f"c{i}"}
             for i, (b, a) in enumerate(EDITS)]
    return replay(model, tokenizer, edits, ["base", "fixed8"], n_edits=3, max_tokens=128, max_examples=1,
                  completions_per_edit=2, max_new_tokens=8)


def test_replay_table_has_columns_and_finite_numbers(result, tmp_path):
    summary = summarize(result)
    assert set(summary) == {"base", "fixed8"}
    for row in summary.values():
        assert row["edits"] == 3 and row["tokens"] > 0 and row["completions"] > 0
        for key in ("nll_all", "acc_all", "exact_match", "edit_sim", "params_mean", "step_s", "wall_s"):
            assert math.isfinite(row[key]), key
        assert row["bleu"] is None or math.isfinite(row["bleu"])
    assert summary["base"]["params_final"] == 0 and summary["fixed8"]["params_final"] > 0
    assert summary["fixed8"]["step_s"] > 0
    table = write_replay_report(result, summary, tmp_path)
    header = table.splitlines()[0]
    assert all(title in header for _, title in REPLAY_COLUMNS)
    assert len(table.splitlines()) == 2 + 2
    for name in ("bench_replay.md", "bench_replay.json"):
        assert (tmp_path / name).is_file()


def test_each_edit_is_scored_before_the_method_adapts_on_it(result):
    base, fixed = result["methods"]["base"]["edits"], result["methods"]["fixed8"]["edits"]
    # A fresh LoRA adapter (B = 0) is the base model: the first edit must score the same.
    assert fixed[0]["nll"] == pytest.approx(base[0]["nll"], abs=1e-5)
    assert [c["hyp"] for c in fixed[0]["completions"]] == [c["hyp"] for c in base[0]["completions"]]
    # After adapting on the first edit the adapter has moved.
    assert fixed[1]["nll"] != pytest.approx(base[1]["nll"], abs=1e-7)
    assert all(len(e["losses"]) == 1 for e in fixed)
