"""Engine speed per base-weight precision, with llama.cpp on the same GGUF file in the same run (issue 15).

    dynarank bench engine-speed --model qwen2.5-coder-0.5b

Speed: single-request prefill and decode tokens/s through the serving engine (``HFEngine.generate``,
greedy, a fixed prompt of real code), per precision of the base weights and per torch thread count,
without and with a session adapter bound, and (``--prompt-lookup``) with prompt-lookup drafts;
variants interleaved within each repeat, medians reported.
Quality per precision: NLL of held-out code (files of the four edit histories) relative to float32,
and greedy agreement with float32 (the same tokens at the same positions of short completions).
LoRA on the quantized base: ``LoraLinear`` adds the exact low-rank update, and one
``adapter_core.train_step`` updates the factors through the frozen base (or its error is reported).
The peer: ``llama-bench`` of a cached llama.cpp build on the GGUF file the model was converted from.
Writes docs/bench_engine_speed.md, .json and .png.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HISTORIES = ("click", "starlette", "cobra", "zustand")
NLL_TARGET = 0.01  # a precision is safe when its held-out NLL is within 1% of float32's
INT4_GROUP_SIZES = (128, 64, 32)  # torchao's CPU int4 groups; the largest allowed that divides a layer's input
INT4_OUT_MULTIPLE = 16  # the CPU int4 packing kernel needs out_features divisible by 16
CONTEXT_CHARS = 1500  # characters before the cursor in a greedy-agreement prompt
TRAIN_TOKENS = 128  # tokens of the train-step check
LOOKUP = "+lookup"  # suffix of a speed row decoded with prompt-lookup drafts (the engine's default)
INT8_COPIES = "int8-copies"  # Precision.weights of adapter_core.int8; the other formats are torchao's
DECODE_STEP = 16  # tokens per forward of the NLL: adapter_core.int8.DECODE_ROWS, the most a decode step reads int8 with


@dataclasses.dataclass(frozen=True)
class Precision:
    name: str
    dtype: str  # torch dtype of every weight not quantized, and of the activations
    weights: str | None  # torchao weight-only format of the linear layers, INT8_COPIES, or None: plain ``dtype``
    note: str
    groups: tuple[int, ...] = INT4_GROUP_SIZES  # int4: group sizes allowed, largest first


PRECISIONS = {p.name: p for p in (
    Precision("float32", "float32", None, "the converted checkpoint as it is"),
    Precision("bfloat16", "bfloat16", None, "every weight and activation in bfloat16"),
    # Ours, `dynarank serve --dtype int8`: the float32 model plus int8 copies that decode steps read.
    Precision("int8", "float32", INT8_COPIES, "`adapter_core.int8`: float32 weights plus int8 copies (per-row "
              "scales) that calls of at most 16 rows without gradients read: `torch._weight_int8pack_mm` "
              "(bfloat16 activations), the output head `torch._int_mm` (int8 activations per row); prefill "
              "chunks and train steps keep float32"),
    Precision("torchao-int8", "bfloat16", "int8", "torchao `Int8WeightOnlyConfig` (per output row); bfloat16 "
              "activations"),
    # The CPU int4 kernel (tinygemm, `_weight_int4pack_mm_for_cpu`) is fast with bfloat16 activations
    # only: with float32 ones it decoded at a tenth of float32's speed.
    Precision("int4", "bfloat16", "int4", "torchao `PrototypeInt4WeightOnlyConfig` (`Int4OpaqueTensor`, the CPU "
              "tinygemm kernel), asymmetric, groups of 128 along the input (64 or 32 where 128 does not divide); "
              "bfloat16 activations"),
    # The GGUF's Q4_K blocks are affine in 4-bit integers over groups of 32: int4 groups of 32 can come close.
    Precision("int4-g32", "bfloat16", "int4", "as int4 with groups of 32", groups=(32,)),
)}


# -- preparing a model in one precision --------------------------------------------------------------


def load_precision(model_dir: Path, precision: Precision):
    """(model, tokenizer) of ``model_dir`` with its base weights in ``precision``, and how many linears
    were quantized (quantized, total)."""
    import torch

    from server.models import load_model

    model, tokenizer = load_model(model_dir, dtype=getattr(torch, precision.dtype))
    if precision.weights == INT8_COPIES:  # as `dynarank serve --dtype int8` loads it
        from adapter_core.int8 import quantize_base

        total = len(_linears(model))
        return model, tokenizer, (quantize_base(model), total)
    counts = (quantize_linears(model, precision.weights, precision.groups) if precision.weights
              else (0, len(_linears(model))))
    return model, tokenizer, counts


def _linears(model) -> list:
    from torch import nn

    return [m for m in model.modules() if type(m) is nn.Linear]


def quantize_linears(model, weights: str, groups: tuple[int, ...] = INT4_GROUP_SIZES) -> tuple[int, int]:
    """Quantize the weights of the plain ``nn.Linear`` layers (lm_head included) in place, weight-only: every
    one for int8, for int4 those whose widths fit one of ``groups`` and the kernel. Returns (quantized, total).
    Call before ``inject_adapters``: ``LoraLinear`` shares the weight it wraps."""
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise RuntimeError(f"precision {weights} needs torchao (pip install torchao): {exc}") from exc
    from torch import nn

    total = len(_linears(model))
    # set_inductor_config=False: nothing here is compiled; leave torch's global inductor settings alone.
    if weights == "int8":
        quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False),
                  filter_fn=lambda m, _: type(m) is nn.Linear)
    elif weights == "int4":
        for group in groups:
            quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False),
                      filter_fn=lambda m, _, g=group: _int4_fits(m, g))
    else:
        raise ValueError(f"unknown weight format {weights!r}; known: int8, int4")
    return sum(is_quantized(m.weight) for m in _linears(model)), total


def _int4_fits(module, group: int) -> bool:
    from torch import nn

    return (type(module) is nn.Linear and not is_quantized(module.weight)
            and module.in_features % group == 0 and module.out_features % INT4_OUT_MULTIPLE == 0)


def is_quantized(weight) -> bool:
    """A torchao tensor subclass (it flattens into inner tensors) rather than a plain tensor."""
    return hasattr(weight, "__tensor_flatten__")


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, quantized ones counted by their inner tensors."""
    seen, total = set(), 0
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += _tensor_bytes(tensor)
    return total + sum(m.int8.nbytes() for m in model.modules() if getattr(m, "int8", None) is not None)


def _tensor_bytes(tensor) -> int:
    if is_quantized(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


# -- LoRA on the quantized base ------------------------------------------------------------------------


class _FixedFactors:
    """A binding source (``adapter_core.layer``): given LoRA factors for one module, none for the others."""

    def __init__(self, name: str, a, b, scale: float):
        self.name, self.factors = name, (a, b, scale)

    def lora_factors(self, name: str):
        return self.factors if name == self.name else None


def lora_forward_error(model, seed: int = 0) -> float:
    """Relative error of ``LoraLinear``'s update on the first adapted layer against ``x A^T B^T scale``
    computed apart (random factors, float32 as adapters keep them); the model must be injected."""
    import torch

    from adapter_core.layer import LoraLinear, use_adapter

    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear))
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, layer.in_features, generator=g).to(dtype)
    a = torch.randn(4, layer.in_features, generator=g) / layer.in_features ** 0.5
    b = torch.randn(layer.out_features, 4, generator=g)
    with torch.inference_mode():
        base = layer(x).float()
        with use_adapter(model, _FixedFactors(name, a, b, 0.5)):
            adapted = layer(x).float()
        expected = (x.float() @ a.T @ b.T) * 0.5
    return float((adapted - base - expected).norm() / expected.norm())


def train_step_check(model, batch: dict) -> tuple[dict, object]:
    """One server-configured ``train_step`` on ``batch`` through the frozen base: did the factors move?
    Returns (row, a snapshot of the session adapter: trained when the step worked, fresh otherwise)."""
    import torch

    from adapter_core import new_session_adapter, train_step
    from server.config import Settings
    from server.sessions.adapter_config import session_adapter_config

    adapter, policy = new_session_adapter(model, session_adapter_config(Settings()))
    before = {name: b.detach().clone() for name, b in adapter.B.items()}
    try:
        stats = train_step(model, adapter, batch, policy)
    except Exception as exc:  # noqa: BLE001 - the finding is the error itself
        return {"train_step": f"fails: {type(exc).__name__}: {str(exc)[:200]}"}, adapter.snapshot()
    moved = sum(not torch.equal(before[name], adapter.B[name]) for name in before)
    ok = moved == len(before) and not stats.skipped and math.isfinite(stats.loss)
    return {"train_step": "ok" if ok else f"no update ({moved}/{len(before)} factors moved)",
            "train_loss": stats.loss, "train_step_s": sum(stats.timings.values())}, adapter.snapshot()


# -- the code the measurements read -------------------------------------------------------------------


def latest_files(data: Path, histories=HISTORIES) -> dict[str, list[tuple[str, str]]]:
    """Per history, (path, latest text) of each file it edits, most recently edited first."""
    from bench.edits import read_jsonl_edits

    out = {}
    for name in histories:
        path = data / f"{name}_edits.jsonl.gz"
        if not path.is_file():
            raise FileNotFoundError(f"no edit history {path.name} in {data} (see shared/data/README.md)")
        latest: dict[str, str] = {}
        for edit in reversed(read_jsonl_edits(path)):
            if edit["after"] and edit["path"] not in latest:
                latest[edit["path"]] = edit["after"]
        out[name] = list(latest.items())
    return out


@dataclasses.dataclass
class CodeSet:
    prompt: str  # the speed prompt: the first prompt_tokens tokens of one file
    prompt_source: str  # history: path of that file
    windows: list[list[int]]  # held-out token windows for the NLL
    completion_prompts: list[str]  # text before a line start, for greedy agreement
    train_ids: list[int]  # tokens of the train-step check


def code_set(files: dict[str, list[tuple[str, str]]], tokenizer, *, prompt_tokens: int, nll_files: int, window: int,
             completions: int, seed: int) -> CodeSet:
    """The speed prompt from the first history's most recent long enough file; the held-out windows and
    completion prompts from the next ``nll_files`` files of every history (never the prompt's file)."""
    rng = random.Random(seed)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    first = next(iter(files))
    prompt_path, prompt_ids = next(((path, ids) for path, text in files[first]
                                    if len(ids := encode(text)) >= prompt_tokens), (None, None))
    if prompt_path is None:
        raise ValueError(f"no file of {first} has {prompt_tokens} tokens for the speed prompt")
    windows = []
    for name, pairs in files.items():
        held_out = [ids for path, text in pairs if (name, path) != (first, prompt_path)
                    and len(ids := encode(text)) >= 64][:nll_files]
        windows += [ids[:window] for ids in held_out]
    if not windows:
        raise ValueError("no held-out file of at least 64 tokens")
    points = []
    for ids in windows:  # line starts past the first quarter: some context before every point
        body = tokenizer.decode(ids)
        points += [(body, i + 1) for i, ch in enumerate(body[:-1]) if ch == "\n" and i > len(body) // 4]
    chosen = rng.sample(points, min(completions, len(points)))
    return CodeSet(prompt=tokenizer.decode(prompt_ids[:prompt_tokens]), prompt_source=f"{first}: {prompt_path}",
                   windows=windows,
                   completion_prompts=[body[max(0, cut - CONTEXT_CHARS):cut] for body, cut in chosen],
                   train_ids=windows[0][:TRAIN_TOKENS])


# -- measurements ------------------------------------------------------------------------------------


def time_generation(engine, prompt: str, max_tokens: int, adapter=None) -> dict:
    """Prefill and decode tokens/s of one greedy request through ``engine.generate``.

    Prefill: prompt tokens / time to the first token. Decode: tokens after the first / their time.
    """
    from server.engines.base import GenerationRequest

    t0 = time.perf_counter()
    first = last = None
    decoded = prompt_tokens = 0
    for chunk in engine.generate(GenerationRequest(prompt=prompt, max_tokens=max_tokens), adapter):
        now = time.perf_counter()
        if chunk.token_ids:
            if first is None:
                first = now
            else:
                decoded, last = decoded + len(chunk.token_ids), now
        if chunk.finish_reason:
            prompt_tokens = chunk.prompt_tokens
            first = first or now
    return {"prompt_tokens": prompt_tokens, "prefill_tps": prompt_tokens / (first - t0), "decode_tokens": decoded,
            "decode_tps": decoded / (last - first) if decoded else float("nan")}


def measure_speed(engines: dict, prompt: str, *, threads: list[int], repeats: int, decode_tokens: int,
                  peer=None, progress=None) -> list[dict]:
    """Samples of every (precision, threads, adapter) and of the peer, interleaved: each repeat runs
    every variant once, so load from other work spreads over all of them alike.

    ``engines``: {precision: (engine, adapter snapshot)}; ``peer``: ``callable(threads) -> dict`` or None.
    """
    import torch

    samples = []
    for repeat, n in itertools.product(range(repeats), threads):
        torch.set_num_threads(n)
        for name, (engine, snapshot) in engines.items():
            for bound, adapter in (("base", None), ("adapter", snapshot)):
                row = time_generation(engine, prompt, decode_tokens + 1, adapter)
                samples.append({"engine": name, "threads": n, "adapter": bound, "repeat": repeat, **row})
                if progress:
                    progress(samples[-1])
        if peer is not None:
            samples.append({"engine": "llama.cpp", "threads": n, "adapter": "base", "repeat": repeat, **peer(n)})
            if progress:
                progress(samples[-1])
    return samples


def token_nll(model, windows: list[list[int]]) -> list[float]:
    """Per-token NLL of every window (teacher-forced), in float32 from the model's logits.

    The window goes through the KV cache in steps of ``DECODE_STEP`` tokens, as decoding (and a
    prompt-lookup draft) feeds it: int8 copies are read by such steps only, so this is the NLL that
    decoding sees."""
    import torch
    import torch.nn.functional as F
    from transformers import DynamicCache

    from server.models import cache_argument

    out, cache_arg = [], cache_argument(model)
    with torch.inference_mode():
        for ids in windows:
            x, cache, logits = torch.tensor([ids]), DynamicCache(), []
            for start in range(0, x.shape[1] - 1, DECODE_STEP):
                step = x[:, start:min(start + DECODE_STEP, x.shape[1] - 1)]
                logits.append(model(input_ids=step, use_cache=True, **{cache_arg: cache}).logits[0].float())
            out += F.cross_entropy(torch.cat(logits), x[0, 1:], reduction="none").tolist()
    return out


def greedy_completions(engine, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """The greedy token ids of each prompt's completion through ``engine.generate`` (base model)."""
    from server.engines.base import GenerationRequest

    return [[t for chunk in engine.generate(GenerationRequest(prompt=p, max_tokens=max_tokens)) for t in chunk.token_ids]
            for p in prompts]


def greedy_agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """Fraction of reference positions where ``other`` has the same token, and of identical completions."""
    if len(reference) != len(other) or not reference:
        raise ValueError("greedy agreement needs the same, non-empty list of prompts on both sides")
    positions = sum(max(len(r), len(o)) for r, o in zip(reference, other))
    same = sum(a == b for r, o in zip(reference, other) for a, b in zip(r, o))
    return {"token_agreement": same / positions if positions else 1.0,
            "identical": sum(r == o for r, o in zip(reference, other)) / len(reference)}


# -- summary -----------------------------------------------------------------------------------------


def request_seconds(sample: dict) -> float:
    """The measured request's time: its prompt at the prefill rate, its decoded tokens at the decode rate."""
    return sample["prompt_tokens"] / sample["prefill_tps"] + sample["decode_tokens"] / sample["decode_tps"]


def summarize_speed(samples: list[dict]) -> list[dict]:
    """Median prefill and decode tokens/s and request time per (engine, threads), with the adapter's decode
    beside, and ratios to float32 and to llama.cpp at the same thread count."""
    groups: dict[tuple, list[dict]] = {}
    for s in samples:
        groups.setdefault((s["engine"], s["threads"], s["adapter"]), []).append({**s, "request_s": request_seconds(s)})
    median = lambda key, rows: statistics.median(r[key] for r in rows) if rows else None
    rows = []
    for (name, n, bound), group in groups.items():
        if bound != "base":
            continue
        adapted = groups.get((name, n, "adapter"), [])
        rows.append({"engine": name, "threads": n, "repeats": len(group), "prefill_tps": median("prefill_tps", group),
                     "decode_tps": median("decode_tps", group), "decode_adapter_tps": median("decode_tps", adapted),
                     "prefill_adapter_tps": median("prefill_tps", adapted), "request_s": median("request_s", group)})
    by_key = {(r["engine"], r["threads"]): r for r in rows}
    for r in rows:
        fp32, peer = by_key.get(("float32", r["threads"])), by_key.get(("llama.cpp", r["threads"]))
        r["decode_vs_float32"] = r["decode_tps"] / fp32["decode_tps"] if fp32 else None
        r["request_vs_float32"] = fp32["request_s"] / r["request_s"] if fp32 else None  # > 1: faster
        r["decode_vs_llama_cpp"] = r["decode_tps"] / peer["decode_tps"] if peer else None
        r["prefill_vs_llama_cpp"] = r["prefill_tps"] / peer["prefill_tps"] if peer else None
    return sorted(rows, key=lambda r: (r["threads"], r["engine"] == "llama.cpp"))


def quality_row(name: str, nll: list[float], reference_nll: list[float], agreement: dict) -> dict:
    mean, ref = statistics.fmean(nll), statistics.fmean(reference_nll)
    rel = (mean - ref) / ref
    return {"precision": name, "nll": mean, "nll_tokens": len(nll), "nll_vs_float32": rel,
            "nll_within_target": abs(rel) <= NLL_TARGET, **agreement}


def fastest_safe(speed: list[dict], quality: list[dict], ratio: str = "decode_vs_float32") -> dict | None:
    """The safe precision (NLL within the target of float32, the train step works) with the highest
    ``ratio`` (a speed relative to float32's), as a geometric mean over thread counts."""
    scores = {}
    for q in quality:
        ratios = [r[ratio] for r in speed if r["engine"] == q["precision"] and r[ratio]]
        if q["nll_within_target"] and q.get("train_step") == "ok" and ratios:
            scores[q["precision"]] = math.exp(statistics.fmean(math.log(x) for x in ratios))
    if not scores:
        return None
    best = max(scores, key=scores.get)
    return {"precision": best, ratio: scores[best]}


def verdicts(speed: list[dict], quality: list[dict]) -> dict:
    """The fastest safe precision by decode speed, and by the whole measured request (prefill included)."""
    return {"decode": fastest_safe(speed, quality, "decode_vs_float32"),
            "request": fastest_safe(speed, quality, "request_vs_float32")}


# -- the peer ----------------------------------------------------------------------------------------


def resolve_peer(model: str, *, build: bool, prompt_tokens: int, decode_tokens: int) -> tuple[object | None, str]:
    """(``callable(threads) -> sample``, a line saying what runs) or (None, why the peer is skipped)."""
    from bench import peer
    from server.models import EMBEDDED_MODELS, fetch_gguf

    binary = peer.find_binary("llama-bench")
    if binary is None and build:
        peer.build_llama_cpp()
        binary = peer.find_binary("llama-bench")
    if binary is None:
        where = peer.llama_cpp_dir().relative_to(peer.dynarank_home())  # no paths of this machine in the page
        return None, (f"llama.cpp is not built in $DYNARANK_HOME/{where}: the llama.cpp columns are skipped "
                      "(`--build-peer` builds it: several minutes, cmake and ninja)")
    if model not in EMBEDDED_MODELS:
        return None, f"{Path(model).name} is not an embedded model: no GGUF file for llama.cpp"
    gguf = fetch_gguf(model, peer.peers_dir() / "gguf", progress=True)
    return (lambda n: peer.llama_bench(binary, gguf, threads=n, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens),
            f"llama.cpp {peer.VERSION} (`{binary.name}`) on `{gguf.name}` as published")


# -- report ------------------------------------------------------------------------------------------

SPEED_COLUMNS = [
    ("engine", "engine"), ("threads", "threads"), ("prefill_tps", "prefill tok/s"), ("decode_tps", "decode tok/s"),
    ("decode_adapter_tps", "decode tok/s, adapter"), ("decode_vs_float32", "decode vs float32"),
    ("request_s", "request s"), ("request_vs_float32", "request speed vs float32"),
    ("decode_vs_llama_cpp", "decode vs llama.cpp"), ("prefill_vs_llama_cpp", "prefill vs llama.cpp"),
]
QUALITY_COLUMNS = [
    ("precision", "precision"), ("weights_mb", "weights MB"), ("quantized", "quantized linears"),
    ("nll", "NLL"), ("nll_vs_float32", "NLL vs float32"), ("nll_within_target", "within 1%"),
    ("token_agreement", "greedy token agreement"), ("identical", "identical completions"),
    ("lora_forward_error", "LoRA update error"), ("train_step", "train step"),
]


def write_report(results: dict, out: Path) -> str:
    from bench.report import fmt, markdown_table

    out.mkdir(parents=True, exist_ok=True)
    cfg = results["config"]
    speed_rows = [{**r, "engine": f"llama.cpp ({cfg['peer_model']})"} if r["engine"] == "llama.cpp" else r
                  for r in results["speed"]]
    speed = markdown_table(speed_rows, [(k, t) for k, t in SPEED_COLUMNS
                                        if not k.endswith("llama_cpp") or results["peer"]])
    quality = markdown_table([{**q, "nll_vs_float32": {"rel": q["nll_vs_float32"], "lo": math.nan, "hi": math.nan},
                               "weights_mb": round(q["weights_mb"]), "lora_forward_error": f"{q['lora_forward_error']:.1e}"}
                              for q in results["quality"]], QUALITY_COLUMNS)
    best = results["fastest_safe"]
    verdict = ("Safe: NLL within 1% of float32's and the train step works; speeds relative to float32, geometric "
               "mean over thread counts. " + "; ".join(
                   f"**fastest safe by {what}: {best[key]['precision']}** ({fmt(best[key][ratio])}x)"
                   if best[key] else f"by {what}: no precision is safe"
                   for key, ratio, what in (("decode", "decode_vs_float32", "decode tokens/s"),
                                            ("request", "request_vs_float32", "the whole request"))) + ".")
    setup = (f"Model `{cfg['model']}`; machine {cfg['machine']}, shared with other work (noisy: compare ratios "
             f"within the run). Wall time {fmt(cfg['wall_s'])} s.")
    speed_how = (f"One greedy request at a time through `HFEngine.generate` on a fixed prompt of {cfg['prompt_tokens']} "
                 f"tokens of real code (`{cfg['prompt_source']}`), {cfg['decode_tokens']} decoded tokens. Prefill: "
                 "prompt tokens / time to the first token; decode: the tokens after the first / their time; request: "
                 "both together (prompt / prefill rate + decoded tokens / decode rate). adapter: "
                 "the same with a session adapter bound (built and stepped as the server does; its LoRA factors stay "
                 f"float32). Medians of {cfg['repeats']} repeats; within a repeat every variant runs once, in turn, "
                 "on one model each (all loaded, adapter layers injected as the server does).")
    peer_how = f"Peer: {results['peer_note']}" + (
        f"; `llama-bench` prefill of {cfg['prompt_tokens']} tokens and {cfg['decode_tokens']} decoded tokens after a "
        f"context of {cfg['prompt_tokens']} (`-d`), one repetition per repeat, in turn with the others."
        if results["peer"] else ".")
    quality_how = (f"NLL: mean per-token NLL of {results['quality'][0]['nll_tokens']:,} held-out tokens "
                   f"({cfg['nll_files']} recently edited files per history of {', '.join(cfg['histories'])}, the "
                   f"first {cfg['window']} tokens of each, fed through the KV cache {DECODE_STEP} tokens at a time as "
                   "decoding feeds them), relative to float32 (target: within 1%). Greedy agreement: "
                   f"{cfg['completions']} completions of {cfg['completion_tokens']} tokens at line starts of those "
                   f"files ({CONTEXT_CHARS} characters before); the fraction of token positions where the precision "
                   "has float32's token, and of identical completions. LoRA update error: `LoraLinear`'s update on "
                   "the quantized base against x·Aᵀ·Bᵀ·scale computed apart (relative). Train step: one "
                   f"`adapter_core.train_step` with the server's session adapter settings on {TRAIN_TOKENS} tokens; "
                   "ok when every factor moved.")
    plotted = _plot(out / "bench_engine_speed.png", results["speed"])
    lines = [
        "# Engine speed per base-weight precision, and llama.cpp", "",
        f"Command: `{cfg['command']}`", "", setup, "", verdict, "",
        "## Speed", "", speed_how, "", peer_how, "", speed, "",
        *(["![decode and prefill tokens/s](bench_engine_speed.png)", ""] if plotted else []),
        "## Quality and LoRA", "", quality_how, "", quality, "",
        "Precisions:", "", *[f"- {p['name']}: {p['note']}." for p in results["precisions"]], "",
    ]
    (out / "bench_engine_speed.md").write_text("\n".join(lines))
    (out / "bench_engine_speed.json").write_text(json.dumps(results, indent=1, default=str))
    return speed + "\n\n" + quality + "\n\n" + verdict


def _plot(path: Path, speed: list[dict]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    engines = list(dict.fromkeys(r["engine"] for r in speed))
    threads = sorted({r["threads"] for r in speed})
    by_key = {(r["engine"], r["threads"]): r for r in speed}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(threads)
    for ax, key, title in ((axes[0], "decode_tps", "decode tokens/s"), (axes[1], "prefill_tps", "prefill tokens/s")):
        for i, n in enumerate(threads):
            values = [(by_key.get((e, n)) or {}).get(key) or 0 for e in engines]
            ax.bar([j + (i - (len(threads) - 1) / 2) * width for j in range(len(engines))], values, width,
                   label=f"{n} thread{'s' if n > 1 else ''}")
        ax.set_xticks(range(len(engines)), engines)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -- command line ------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _precisions(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in PRECISIONS]
    if unknown or "float32" not in names:
        raise argparse.ArgumentTypeError(f"precisions must include float32 (the reference) and come from "
                                         f"{', '.join(PRECISIONS)}; got {text!r}")
    return ["float32", *[n for n in dict.fromkeys(names) if n != "float32"]]


def _positive(text: str) -> int:
    value = _int_list(text)
    if len(value) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return value[0]


def command_line(args) -> str:
    """The options that shape the results (a model directory by its name: no paths of this machine)."""
    return (f"dynarank bench engine-speed --model {Path(args.model).name} --precisions {','.join(args.precisions)} "
            f"--threads {','.join(map(str, args.threads))} --repeats {args.repeats} --prompt-tokens "
            f"{args.prompt_tokens} --decode-tokens {args.decode_tokens} --completions {args.completions} "
            f"--completion-tokens {args.completion_tokens} --nll-files {args.nll_files} --window {args.window} "
            f"--seed {args.seed}" + (" --prompt-lookup" if args.prompt_lookup else "")
            + (" --no-peer" if args.no_peer else ""))


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m bench.engine_speed")
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="embedded model name or model directory")
    p.add_argument("--precisions", type=_precisions, default=list(PRECISIONS),
                   help=f"comma-separated, float32 included (default: {','.join(PRECISIONS)})")
    p.add_argument("--threads", type=_int_list, default=[1, 2], help="torch thread counts (default: 1,2)")
    p.add_argument("--repeats", type=_positive, default=3, help="repeats of every speed variant (median)")
    p.add_argument("--prompt-tokens", type=_positive, default=512, help="tokens of the speed prompt")
    p.add_argument("--decode-tokens", type=_positive, default=64, help="tokens decoded after the first")
    p.add_argument("--completions", type=_positive, default=16, help="greedy completions for agreement")
    p.add_argument("--completion-tokens", type=_positive, default=32, help="tokens per greedy completion")
    p.add_argument("--nll-files", type=_positive, default=2, help="held-out files per history for the NLL")
    p.add_argument("--window", type=_positive, default=512, help="tokens of each held-out file")
    p.add_argument("--seed", type=int, default=0, help="picks the completion points")
    p.add_argument("--data", type=Path, default=DATA, help="folder of the edit histories (default: shared/data)")
    p.add_argument("--prompt-lookup", action="store_true",
                   help=f"also time every precision with prompt-lookup drafts (rows named PRECISION{LOOKUP})")
    p.add_argument("--build-peer", action="store_true", help="build llama.cpp into the cache when it is absent")
    p.add_argument("--no-peer", action="store_true", help="leave llama.cpp out")
    p.add_argument("--out", type=Path, default=DOCS, help="folder for bench_engine_speed.md/.json/.png")
    p.add_argument("--report-only", type=Path, default=None, metavar="JSON",
                   help="write the page again from an earlier run's bench_engine_speed.json (its samples and "
                        "quality rows; nothing is measured)")
    p.set_defaults(func=run)
    return p


def report_only(path: Path, out: Path) -> int:
    """Summaries and verdicts recomputed from the samples and quality rows of an earlier run."""
    results = json.loads(path.read_text())
    results["speed"] = summarize_speed(results["samples"])
    results["fastest_safe"] = verdicts(results["speed"], results["quality"])
    print(write_report(results, out))
    return 0


def run(args) -> int:
    if args.report_only:
        return report_only(args.report_only, args.out)
    import torch

    from server.engines.hf import HFEngine
    from server.models import resolve_model

    t_start = time.time()
    model_dir = resolve_model(args.model, progress=True)
    precisions = [PRECISIONS[name] for name in args.precisions]
    if any(p.weights not in (None, INT8_COPIES) for p in precisions):  # fail before the long part, not after float32
        try:
            import torchao  # noqa: F401
        except ImportError:
            print("error: torchao-int8 and int4 need torchao (pip install torchao)", file=sys.stderr)
            return 2
    peer, peer_note = (None, "left out (`--no-peer`)") if args.no_peer else resolve_peer(
        args.model, build=args.build_peer, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens)
    print(f"peer: {peer_note}", file=sys.stderr)
    torch.set_num_threads(max(args.threads))
    engines, quality, counts = {}, [], {}
    for precision in precisions:
        model, tokenizer, counts[precision.name] = load_precision(model_dir, precision)
        engines[precision.name] = HFEngine(model, tokenizer, Path(args.model).name, prompt_lookup=False)
    codes = code_set(latest_files(args.data), engines["float32"].tokenizer, prompt_tokens=args.prompt_tokens,
                     nll_files=args.nll_files, window=args.window, completions=args.completions, seed=args.seed)
    reference = {}
    for precision in precisions:  # quality on the base models, before any adapter layer exists
        engine = engines[precision.name]
        nll = token_nll(engine.model, codes.windows)
        completions = greedy_completions(engine, codes.completion_prompts, args.completion_tokens)
        reference = reference or {"nll": nll, "completions": completions}
        quality.append(quality_row(precision.name, nll, reference["nll"],
                                   greedy_agreement(reference["completions"], completions)))
        print(f"quality {precision.name}: NLL {quality[-1]['nll']:.4f} ({quality[-1]['nll_vs_float32']:+.2%}), "
              f"agreement {quality[-1]['token_agreement']:.3f}", file=sys.stderr)
    batch = {"input_ids": torch.tensor([codes.train_ids])}
    batch |= {"attention_mask": torch.ones_like(batch["input_ids"]),
              "loss_weights": torch.ones_like(batch["input_ids"], dtype=torch.float32)}
    for precision, row in zip(precisions, quality):
        model = engines[precision.name].model
        quantized, total = counts[precision.name]
        lora, snapshot = train_step_check(model, batch)  # injects the adapter layers, as the server does
        row |= {"weights_mb": weight_bytes(model) / 2**20, "quantized": f"{quantized}/{total}",
                "lora_forward_error": lora_forward_error(model), **lora}
        engines[precision.name] = (engines[precision.name], snapshot)
        if args.prompt_lookup:  # the same model, decoding with prompt-lookup drafts
            engines[precision.name + LOOKUP] = (HFEngine(model, engines[precision.name][0].tokenizer,
                                                         Path(args.model).name, prompt_lookup=True), snapshot)
    samples = measure_speed(engines, codes.prompt, threads=args.threads, repeats=args.repeats,
                            decode_tokens=args.decode_tokens, peer=peer,
                            progress=lambda s: print(f"{s['engine']} t={s['threads']} {s['adapter']} r={s['repeat']}: "
                                                     f"prefill {s['prefill_tps']:.1f} decode {s['decode_tps']:.2f} tok/s",
                                                     file=sys.stderr))
    speed = summarize_speed(samples)
    results = {
        "config": {"command": command_line(args), "model": Path(args.model).name,
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                   "threads": args.threads, "repeats": args.repeats, "prompt_lookup": args.prompt_lookup,
                   "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
                   "completions": args.completions, "completion_tokens": args.completion_tokens,
                   "nll_files": args.nll_files, "window": args.window, "seed": args.seed,
                   "histories": list(HISTORIES), "prompt_source": codes.prompt_source,
                   "peer_model": next((s["model_type"] for s in samples if s["engine"] == "llama.cpp"), None),
                   "wall_s": time.time() - t_start},
        "precisions": [dataclasses.asdict(p) for p in precisions],
        "peer": peer is not None, "peer_note": peer_note,
        "speed": speed, "quality": quality, "fastest_safe": verdicts(speed, quality), "samples": samples,
    }
    print(write_report(results, args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
