"""What the prefix cache saves while a user types: line completions at each keystroke, with and without it.

Points are ``bench infill``'s line points (a masked line in a file of each edit history), with the whole file
around them. At each point the user types the masked line's first characters one keystroke at a time, and
the editor asks for a completion after each (the request a websocket ``complete`` in ``line`` mode builds,
``server.app.ws.protocol.completion_request``, with ``--budget`` prompt tokens). Two engines on the same
model answer every request, in turn: one with the prefix cache (``server/engines/prefix_cache.py``), one
that prefills every prompt whole. The first request at a point shares little with the one before (another
document); the next ones share the text before the cursor. Their outputs must be the same token for token.
Writes docs/bench_keystrokes.md, .json and .png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench.context import complete_line
from bench.infill import HISTORIES, MAX_TOKENS, add_point_options, sample_points

KEYSTROKES = 4  # requests per point: at the line's start, then after each of the next three characters


def complete(engine, prefix: str, suffix: str, budget: int) -> dict:
    """``bench context``'s line completion, with the prompt tokens the engine's prefix cache reused for it."""
    cache = engine.prefix_cache
    reused = cache.reused_tokens if cache else 0
    result = complete_line(engine, prefix, suffix, budget)
    return {**result, "reused_tokens": (cache.reused_tokens - reused) if cache else 0}


def summarize(rows: list[dict]) -> list[dict]:
    """Per language (and all), for the first request at a point and for the keystrokes after it: median
    seconds of each engine, the cached engine's time against the other's (paired relative difference with
    a 95% bootstrap interval), the share of prompt tokens it reused, and how many outputs were the same."""
    from bench.replay import paired_bootstrap

    table = []
    for language in sorted({r["language"] for r in rows}) + ["all"]:
        for label, keep in (("first", lambda k: k == 0), ("typing", lambda k: k > 0)):
            sel = [r for r in rows if language in ("all", r["language"]) and keep(r["keystroke"])]
            fresh = [r["fresh"]["seconds"] for r in sel]
            cached = [r["cached"]["seconds"] for r in sel]
            table.append({
                "language": language, "requests": label, "n": len(sel),
                "prompt_tokens": statistics.median(r["cached"]["prompt_tokens"] for r in sel),
                "fresh_s": statistics.median(fresh), "cached_s": statistics.median(cached),
                "time_vs": paired_bootstrap(cached, fresh),
                "reused": 100 * sum(r["cached"]["reused_tokens"] for r in sel)
                / sum(r["cached"]["prompt_tokens"] for r in sel),
                "same": f"{sum(r['cached']['tokens'] == r['fresh']['tokens'] for r in sel)}/{len(sel)}",
            })
    return table


COLUMNS = [("language", "language"), ("requests", "requests"), ("n", "n"),
           ("prompt_tokens", "prompt tokens (median)"), ("fresh_s", "s, prefilled whole (median)"),
           ("cached_s", "s, prefix cache (median)"), ("time_vs", "time vs whole"),
           ("reused", "prompt tokens reused %"), ("same", "same output")]


def plot(path: Path, table: list[dict]) -> bool:
    from bench.report import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return False
    rows = [r for r in table if r["language"] != "all"]
    labels = [f"{r['language']}\n{r['requests']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar([i - 0.2 for i in x], [r["fresh_s"] for r in rows], width=0.4, label="prefilled whole")
    ax.bar([i + 0.2 for i in x], [r["cached_s"] for r in rows], width=0.4, label="prefix cache")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("median seconds per line completion")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return save_figure(plt, fig, path)


def write_report(out: Path, config: dict, rows: list[dict], table: list[dict]) -> str:
    import json

    from bench.report import fmt, machine, markdown_table

    text = markdown_table(table, COLUMNS)
    lines = [
        "# Prefix cache while typing",
        "",
        f"Command: `{config['command']}`",
        "",
        f"Model `{config['model']}` (`--dtype {config['precision']}`), greedy, the server's engine with the "
        f"request of a websocket `complete` in `line` mode at a prompt budget of {config['budget']} tokens, at "
        f"most {MAX_TOKENS['line']} tokens. {config['per_history']} line points per history "
        f"({', '.join(HISTORIES)}), seed {config['seed']}, {config['keystrokes']} requests per point: at the "
        f"masked line's start (first), then after each of its next characters (typing). Every request is "
        f"answered by both engines, in turn. Machine: {machine()}. Wall time {fmt(config['wall_s'])} s.",
        "",
        "time vs whole: paired relative difference of the mean seconds, with a 95% bootstrap interval. "
        "Reused: the share of prompt tokens the prefix cache did not prefill again. Same output: requests "
        "whose completion tokens were identical with and without the cache.",
        "",
        text,
        "",
        "![median seconds per request, with and without the prefix cache](bench_keystrokes.png)"
        if config.get("plot") else "",
    ]
    (out / "bench_keystrokes.md").write_text("\n".join(lines) + "\n")
    (out / "bench_keystrokes.json").write_text(json.dumps({"config": config, "table": table, "points": rows},
                                                          indent=1, default=str))
    return text


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m bench.keystrokes", description=__doc__.split("\n\n")[0])
    p.description = __doc__.split("\n\n")[0]
    add_point_options(p, "bench_keystrokes.md/.json/.png")
    p.add_argument("--budget", type=int, default=1024, help="prompt budget in tokens (the CPU default)")
    p.add_argument("--per-history", type=int, default=8, help="line points per history")
    p.add_argument("--keystrokes", type=int, default=KEYSTROKES, help="requests per point")
    p.set_defaults(func=run)
    return p


def command_line(args) -> str:
    return (f"dynarank bench keystrokes --model {args.model} --dtype {args.dtype} --budget {args.budget} "
            f"--per-history {args.per_history} --keystrokes {args.keystrokes} --seed {args.seed} "
            f"--threads {args.threads}")


def run(args) -> int:
    from bench.served import load_served_model
    from server.engines.hf import HFEngine

    t0 = time.time()
    points = sample_points(args.data, args.per_history, args.seed, kinds=("line",), context=None)
    model, tokenizer, precision = load_served_model(args.model, args.dtype, args.threads)
    engines = {"cached": HFEngine(model, tokenizer, args.model),
               "fresh": HFEngine(model, tokenizer, args.model, prefix_cache=False)}
    for engine in engines.values():  # warm-up: first calls build caches
        complete(engine, "def f(x):\n    ", "\n", args.budget)
    rows = []
    for i, point in enumerate(points):
        for k in range(args.keystrokes):
            prefix = point["prefix"] + point["reference"][:k]
            order = ("cached", "fresh") if (i + k) % 2 == 0 else ("fresh", "cached")  # load falls on both alike
            runs = {name: complete(engines[name], prefix, point["suffix"], args.budget) for name in order}
            rows.append({"history": point["history"], "language": point["language"], "point": i, "keystroke": k,
                         **runs})
        if args.progress:
            mine = rows[-args.keystrokes:]
            with open(args.progress, "a") as f:
                f.write(f"{i + 1}/{len(points)} {point['history']} "
                        + " ".join(f"{r['fresh']['seconds']:.1f}/{r['cached']['seconds']:.1f}s" for r in mine)
                        + f" {time.time() - t0:.0f}s\n")
    for engine in engines.values():
        engine.close()
    table = summarize(rows)
    config = {"command": command_line(args), "model": args.model, "precision": precision, "budget": args.budget,
              "per_history": args.per_history, "keystrokes": args.keystrokes, "seed": args.seed,
              "wall_s": time.time() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    config["plot"] = plot(args.out / "bench_keystrokes.png", table)
    print(write_report(args.out, config, rows, table))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
