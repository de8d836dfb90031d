"""Median train-step time per rank policy on a real model (256-token batch).

    python -m bench.bench_step --policies fixed,dynamicrank,lalora,gard

Prints a table (median step seconds, ratio vs ``fixed``) and writes it to
docs/bench_step.md. Policies not registered yet are skipped with a note.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

SAMPLE_CODE = '''def merge_sorted(a, b):
    """Merge two sorted lists into one sorted list."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]

class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key, n=1):
        self.counts[key] = self.counts.get(key, 0) + n
'''


def make_batch(tokenizer, tokens: int) -> dict:
    ids = tokenizer(SAMPLE_CODE * 20, return_tensors="pt").input_ids[:, :tokens]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "loss_weights": torch.ones(ids.shape, dtype=torch.float32),
        "token_classes": torch.zeros_like(ids),
        "task": "modification",
    }


def time_policy(model, batch, policy_name: str, rank: int, steps: int, warmup: int) -> dict:
    from adapter_core import AdapterConfig, new_session_adapter, train_step

    adapter, policy = new_session_adapter(model, AdapterConfig(policy=policy_name, r_init=rank))
    times, phases = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        stats = train_step(model, adapter, batch, policy, lr=1e-4)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
            phases.append(stats.timings)
    med = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    return {
        "median": statistics.median(times),
        "phases": med,
        "rank_sum": sum(stats.ranks.values()),
        "params": stats.num_params,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="fixed,dynamicrank,lalora,gard")
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name or model directory")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8, help="initial rank (the fixed policy's rank)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/bench_step.md")
    args = parser.parse_args(argv)

    from adapter_core.policies import POLICIES
    from server.models import load_model, resolve_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model(resolve_model(args.model, progress=False))
    batch = make_batch(tokenizer, args.tokens)

    rows, notes = [], []
    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    if "fixed" not in names:
        names.insert(0, "fixed")
    for name in names:
        if name not in POLICIES:
            notes.append(f"`{name}`: not registered (skipped)")
            continue
        try:
            rows.append((name, time_policy(model, batch, name, args.rank, args.steps, args.warmup)))
        except Exception as exc:  # one broken policy should not hide the others
            notes.append(f"`{name}`: failed: {type(exc).__name__}: {exc}")
        print(f"{name}: done", flush=True)

    base = dict(rows).get("fixed", {}).get("median")
    lines = [
        "# Train-step time per rank policy",
        "",
        f"Model `{args.model}`, one batch of {batch['input_ids'].shape[1]} tokens, initial rank {args.rank}, "
        f"all attention+MLP projections, fp32, {args.threads} threads, {platform.processor() or platform.machine()}; "
        f"median of {args.steps} steps after {args.warmup} warm-up. "
        "Phases are medians in seconds (forward, backward incl. optimizer, policy, resize).",
        "",
        "| policy | median step (s) | vs fixed | forward | backward | policy | resize | rank sum | params |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        ph = r["phases"]
        ratio = f"{r['median'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {name} | {r['median']:.3f} | {ratio} | {ph['forward']:.3f} | {ph['backward']:.3f} | "
            f"{ph['policy']:.3f} | {ph['resize']:.3f} | {r['rank_sum']} | {r['params']:,} |"
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    notes.append(
        f"1-minute load average at the end: {load:.1f} on {os.cpu_count()} cores; on a shared machine "
        "absolute times vary several-fold between runs, compare ratios from one run only."
    )
    lines += ["", *[f"- {n}" for n in notes]]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
