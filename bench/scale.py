"""Many concurrent sessions, in process: memory per session, throughput of concurrent
completions through the serving engine, and the time to restore an evicted session.

    python -m bench.scale --sessions 1,4,16,64
    python -m bench.scale --model qwen2.5-coder-0.5b --threads 2   # the issue's targets
    dynarank bench scale

Sessions are made by the server's ``SessionManager`` (its adapter construction,
rank policy and store). Throughput goes through ``HFEngine.generate``, one thread
per request as the server runs them, so the engine's continuous batching is what
is measured: aggregate completion tokens/s of 1, 2, 4, 8 concurrent greedy
requests on one session adapter against one request alone; and, per session
level, as many concurrent requests (capped at ``--max-batch``) each on its own
session's snapshot against the same requests on one shared adapter and on the
base model. Restore: the session is persisted, then attached from a fresh
``SessionManager`` over the same data dir (what happens after eviction or a
restart). Writes docs/bench_scale.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
PROMPT = "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n    parser.add_argument("


def rss() -> int:
    import ctypes

    import psutil

    gc.collect()
    try:  # give freed heap back so the RSS delta is what is really held
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def make_manager(model, tokenizer, data_dir: Path, policy: str, max_sessions: int):
    from server.config import Settings
    from server.sessions import SessionManager
    from server.store import AdapterStore

    settings = Settings(data_dir=data_dir, rank_policy=policy, max_sessions=max_sessions, model="bench")
    store = AdapterStore(data_dir / "adapters", settings.served_name, keep_versions=settings.keep_versions)
    return SessionManager(settings, model, tokenizer, store)


def engine_tokens_per_s(engine, adapters: list, new_tokens: int) -> float:
    """Completion tokens/s of ``len(adapters)`` greedy requests sent together, request i on ``adapters[i]``,
    from their start to the end of the last one (prefill included)."""
    from server.engines.base import GenerationRequest

    request = GenerationRequest(prompt=PROMPT, max_tokens=new_tokens)
    counts = [0] * len(adapters)
    errors: list[BaseException] = []
    go = threading.Barrier(len(adapters) + 1)

    def complete(i: int) -> None:
        go.wait()
        try:
            for chunk in engine.generate(request, adapters[i]):
                counts[i] += len(chunk.token_ids)
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=complete, args=(i,)) for i in range(len(adapters))]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def best_tokens_per_s(engine, modes: dict[str, list], new_tokens: int, repeats: int) -> dict[str, float]:
    """Tokens/s per mode (its per-request adapters); modes interleaved within each repeat and the best repeat
    kept (shared CPU)."""
    best = {name: 0.0 for name in modes}
    for _ in range(repeats):
        for name, adapters in modes.items():
            best[name] = max(best[name], engine_tokens_per_s(engine, adapters, new_tokens))
    return best


def run(args) -> int:
    import torch

    from adapter_core import inject_adapters
    from bench.served import load_served_model
    from server.engines.hf import HFEngine

    levels = sorted(int(x) for x in args.sessions.split(","))
    model, tokenizer, precision = load_served_model(args.model, args.dtype, args.threads, progress=False)
    inject_adapters(model)
    engine = HFEngine(model, tokenizer, args.model, prompt_lookup=args.prompt_lookup)
    work = Path(tempfile.mkdtemp(prefix="dynarank-bench-scale-"))
    manager = make_manager(model, tokenizer, work / "data", args.policy, max(levels) + 1)
    rows_out, sessions, held = [], [], {}
    rss0 = rss()
    for n in levels:  # memory first: generation's caches would blur the RSS deltas
        while len(sessions) < n:
            session, _ = manager.attach(None, f"s{len(sessions)}")
            sessions.append(session)
        held[n] = rss() - rss0
    for n in levels:
        snaps = [s.current() for s in sessions[:n]]
        snap_bytes = statistics.mean(sn.num_params * sn.A[next(iter(sn.A))].element_size() for sn in snaps)
        rows = min(n, args.max_batch)
        tps = best_tokens_per_s(engine, {"mixed": snaps[:rows], "one": [snaps[0]] * rows, "base": [None] * rows},
                                args.new_tokens, args.repeats)
        mixed, one, base = tps["mixed"], tps["one"], tps["base"]
        row = {"sessions": n, "batch_rows": rows, "snapshot_mb": snap_bytes / 2**20,
               "live_adapter_mb": 3 * snap_bytes / 2**20,  # factors + AdamW's two moments once it has stepped
               "rss_per_session_mb": held[n] / n / 2**20, "rss_total_mb": held[n] / 2**20,
               "tok_s_mixed": mixed, "tok_s_one": one, "tok_s_base": base, "mixed_vs_one": mixed / one}
        print(row, flush=True)
        rows_out.append(row)
    # Concurrency: n requests on one session adapter against one request alone.
    levels_c = sorted(int(x) for x in args.concurrency.split(","))
    one = sessions[0].current()
    tps = best_tokens_per_s(engine, {n: [one] * n for n in levels_c}, args.new_tokens, args.repeats)
    alone = tps[levels_c[0]] if levels_c[0] == 1 else engine_tokens_per_s(engine, [one], args.new_tokens)
    concurrency = [{"requests": n, "tok_s": tps[n], "vs_one_request": tps[n] / alone} for n in levels_c]
    for row in concurrency:
        print(row, flush=True)
    # Restore: persist one session, then attach it from a fresh manager (nothing in memory).
    restore = []
    for i in range(args.restores):
        victim = sessions[i % len(sessions)]
        t0 = time.perf_counter()
        manager.persist(victim, force=True)
        persist_s = time.perf_counter() - t0
        fresh = make_manager(model, tokenizer, work / "data", args.policy, max(levels) + 1)
        t0 = time.perf_counter()
        restored, _ = fresh.attach(None, victim.id)
        restore_s = time.perf_counter() - t0
        same = all(torch.equal(restored.current().B[k], victim.current().B[k]) for k in victim.current().B)
        restore.append({"persist_s": persist_s, "restore_s": restore_s, "identical": same})
    result = {"config": {"model": args.model, "precision": precision, "policy": args.policy,
                         "new_tokens": args.new_tokens, "repeats": args.repeats,
                         "max_batch": args.max_batch, "threads": args.threads,
                         "prompt_lookup": args.prompt_lookup, "prompt_tokens":
                         int(tokenizer(PROMPT, return_tensors="pt").input_ids.shape[1])},
              "levels": rows_out, "concurrency": concurrency, "restore": restore}
    print(write_report(result, args.out))
    return 0


def write_report(result: dict, out: Path) -> str:
    from bench.report import fmt, machine, markdown_table

    out.mkdir(parents=True, exist_ok=True)
    cols = [("sessions", "sessions"), ("batch_rows", "batch rows"), ("snapshot_mb", "snapshot MB"),
            ("live_adapter_mb", "live adapter MB"), ("rss_per_session_mb", "RSS / session MB"),
            ("tok_s_mixed", "tok/s mixed adapters"), ("tok_s_one", "tok/s one adapter"),
            ("tok_s_base", "tok/s base"), ("mixed_vs_one", "mixed / one")]
    table = markdown_table(result["levels"], cols).replace("|---:|", "|---|", 1)
    concurrency = markdown_table(result["concurrency"], [("requests", "concurrent requests"), ("tok_s", "tok/s"),
                                                        ("vs_one_request", "vs one request")]).replace("|---:|", "|---|", 1)
    r = result["restore"]
    cfg = result["config"]
    restore_line = (f"Restore an evicted session (persist, then attach from a fresh SessionManager): persist "
                    f"{fmt(statistics.median(x['persist_s'] for x in r))} s, restore "
                    f"{fmt(statistics.median(x['restore_s'] for x in r))} s (median of {len(r)}); factors identical: "
                    f"{all(x['identical'] for x in r)}.") if r else ""
    text = "\n".join([
        "# Scale: many sessions", "",
        (f"In process, model `{cfg['model']}` (`--dtype {cfg.get('precision', 'float32')}`), session adapters "
         f"from `SessionManager` (policy `{cfg['policy']}`, fresh, initial ranks). Throughput: concurrent greedy requests through `HFEngine.generate` (one thread "
         f"each, continuous batching), {cfg['prompt_tokens']}-token prompt, up to {cfg['new_tokens']} new tokens "
         f"per request, aggregate completion tokens/s from their start to the last one's end (prefill included), "
         f"best of {cfg.get('repeats', '?')} (modes interleaved); prompt-lookup drafts "
         f"{'on' if cfg.get('prompt_lookup') else 'off'} (a request alone would draft, rows in a batch do not)."), "",
        concurrency, "",
        (f"Per session level: requests = sessions capped at {cfg['max_batch']}; 'mixed' sends each on its own "
         f"session's snapshot, 'one' all on the first session's snapshot, 'base' without an adapter. Snapshot MB: "
         f"factors of one published version; live adapter MB: factors plus AdamW moments (3x, once it has "
         f"trained); RSS / session: process RSS growth divided by sessions (fresh sessions hold their live "
         f"factors and one snapshot). Machine: {machine()}, shared with other work."), "",
        table, "", restore_line, "",
    ])
    (out / "bench_scale.md").write_text(text)
    (out / "bench_scale.json").write_text(json.dumps(result, indent=1))
    return concurrency + "\n\n" + table + "\n\n" + restore_line


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m bench.scale")
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sessions", default="1,4,16,64", help="session counts, comma-separated")
    p.add_argument("--policy", default="fixed", help="rank policy of the sessions (server default)")
    p.add_argument("--max-batch", type=int, default=16, help="most concurrent requests per session level")
    p.add_argument("--concurrency", default="1,2,4,8", help="concurrent requests on one adapter, comma-separated")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="best of N per mode")
    p.add_argument("--restores", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="auto", help="precision of the model, as `dynarank serve --dtype` (default: "
                                                   "auto, the server's CPU choice)")
    p.add_argument("--prompt-lookup", action="store_true",
                   help="let a request alone draft (off: the ratios measure batching, not drafts; engine-speed "
                        "measures those)")
    p.add_argument("--out", type=Path, default=DOCS)
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
