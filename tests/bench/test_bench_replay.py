"""The edit replay on a tiny model: table columns, finite numbers, evaluate-before-adapt."""

from __future__ import annotations

import math

import pytest

from bench.replay import paired_bootstrap, replay, summarize
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
    # One step on the edit's example (the server's default takes no idle steps).
    assert all(len(e["losses"]) == 1 for e in fixed)
    # The completion a user sees at the edit point, through the serving engine, for every method.
    assert all(e["at_edit"] for e in fixed) and all(len(b["at_edit"]) == len(f["at_edit"]) for b, f in zip(base, fixed))
    assert [c["hyp"] for c in fixed[0]["at_edit"]] == [c["hyp"] for c in base[0]["at_edit"]]


def test_paired_bootstrap_gives_the_relative_difference_and_an_interval_around_it():
    reference = [2.0, 2.2, 1.8, 2.1, 1.9, 2.0, 2.3, 1.7]
    better = [r * 0.9 for r in reference]
    stats = paired_bootstrap(better, reference)
    assert stats["rel"] == pytest.approx(-0.1) and stats["n"] == 8
    assert stats["lo"] == pytest.approx(-0.1) and stats["hi"] == pytest.approx(-0.1)  # a constant ratio
    noisy = paired_bootstrap([r + d for r, d in zip(reference, [-0.3, 0.1, -0.2, 0.05, -0.25, 0.1, -0.1, 0.0])],
                             reference)
    assert noisy["lo"] < noisy["rel"] < noisy["hi"] and noisy["lo"] < 0
    assert math.isnan(paired_bootstrap([float("nan")], [1.0])["rel"])


def test_replay_of_several_histories_writes_a_page_each_and_a_headline(tmp_path, monkeypatch, tokenizer):
    import gzip
    import json

    from bench import replay as replay_module

    model = build_tiny_model("llama", len(tokenizer))
    monkeypatch.setattr("server.models.load_model", lambda path: (model, tokenizer))
    monkeypatch.setattr("server.models.resolve_model", lambda name, progress=False: name)
    paths = []
    for name in ("one", "two"):
        path = tmp_path / f"{name}_edits.jsonl.gz"
        with gzip.open(path, "wt") as f:
            for i, (b, a) in enumerate(EDITS):
                f.write(json.dumps({"path": "m.py", "language": "python", "before": b, "after": a,
                                    "commit": f"c{i}"}) + "\n")
        paths.append(str(path))
    out = tmp_path / "docs"
    code = replay_module.main(["--data", ",".join(paths), "--edits", "2", "--methods", "base,fixed8",
                               "--max-tokens", "96", "--max-new-tokens", "6", "--out", str(out),
                               "--set", "replay_rows=1"])
    assert code == 0
    for name in ("bench_replay_one.md", "bench_replay_two.json", "bench_replay.md"):
        assert (out / name).is_file()
    headline = (out / "bench_replay.md").read_text()
    assert "| one | fixed8 | 2 |" in headline and "| two | base | 2 |" in headline
    assert json.loads((out / "bench_replay_one.json").read_text())["config"]["settings"] == "replay_rows=1"
    assert replay_module.main(["--data", ",".join(paths), "--set", "replay_rows=-1"]) == 2  # validated
