"""What the editor's prompt budget costs and buys: line completions at real cursor positions, the websocket's
request with the document's text around the cursor cut to a number of tokens.

Points are ``bench infill``'s line points (a masked line in a file of each edit history), with the whole
file around them. Each point is completed once per budget, budgets in turn at each point so that the
machine's load falls on all of them alike, through the server's engine with the request a websocket
``complete`` in ``line`` mode builds (``server.app.ws.protocol.completion_request``: at most 8,000 characters
before the cursor and 2,000 after, then ``--editor-prompt-tokens``). Budget 0 is that window alone.
Scores as ``bench infill``: exact match and chrF against the masked line, and seconds per completion.
Writes docs/bench_context.md, .json and .png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench.infill import HISTORIES, MAX_TOKENS, add_point_options, sample_points, score, wilson_interval

BUDGETS = (0, 2048, 1024, 512)


def complete_line(engine, prefix: str, suffix: str, budget: int | None) -> dict:
    """The completion a websocket ``complete`` in ``line`` mode gets at a cursor, on the base model, with
    ``budget`` prompt tokens (None: the character window alone), timed."""
    from server.app.ws.protocol import CompleteParams, completion_request

    request = completion_request(prefix, suffix, CompleteParams(max_tokens=MAX_TOKENS["line"]), "line", budget)
    t0 = time.perf_counter()
    chunks = list(engine.generate(request, None))
    return {"seconds": time.perf_counter() - t0, "text": "".join(c.text for c in chunks),
            "tokens": [t for c in chunks for t in c.token_ids], "prompt_tokens": chunks[-1].prompt_tokens}


def complete(engine, point: dict, budget: int) -> dict:
    return complete_line(engine, point["prefix"], point["suffix"], budget or None)


def summarize(rows: list[dict], budgets: tuple[int, ...]) -> list[dict]:
    """Per language (and all), per budget: prompt tokens, seconds, EM with its interval, chrF; the
    seconds and chrF against the window alone (budget 0, or the largest budget) as paired relative
    differences with 95% bootstrap intervals."""
    from bench.replay import paired_bootstrap

    reference = 0 if 0 in budgets else max(budgets)
    table = []
    for language in sorted({r["language"] for r in rows}) + ["all"]:
        sel = [r for r in rows if language in ("all", r["language"])]
        for budget in budgets:
            runs = [r["runs"][str(budget)] for r in sel]
            base = [r["runs"][str(reference)] for r in sel]
            hits = sum(x["exact"] for x in runs)
            lo, hi = wilson_interval(hits, len(runs))
            versus = budget != reference  # the reference row against itself says nothing
            table.append({
                "language": language, "budget": budget or "window", "points": len(runs),
                "prompt_tokens": statistics.median(x["prompt_tokens"] for x in runs),
                "seconds": statistics.median(x["seconds"] for x in runs),
                "seconds_vs": paired_bootstrap([x["seconds"] for x in runs], [x["seconds"] for x in base])
                if versus else None,
                "em": 100 * hits / len(runs), "em_ci": f"{lo:.1f}-{hi:.1f}",
                "chrf": statistics.mean(x["chrf"] for x in runs),
                "chrf_vs": paired_bootstrap([x["chrf"] for x in runs], [x["chrf"] for x in base]) if versus else None,
            })
    return table


COLUMNS = [("language", "language"), ("budget", "prompt budget (tokens)"), ("points", "points"),
           ("prompt_tokens", "prompt tokens (median)"), ("seconds", "s per completion (median)"),
           ("seconds_vs", "time vs window"), ("em", "EM %"), ("em_ci", "EM 95% CI"), ("chrf", "chrF"),
           ("chrf_vs", "chrF vs window")]


def plot(path: Path, table: list[dict]) -> bool:
    from bench.report import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return False
    rows = [r for r in table if r["language"] == "all"]
    labels = [str(r["budget"]) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(labels, [r["seconds"] for r in rows])
    left.set_title("median seconds per line completion")
    right.bar(labels, [r["chrf"] for r in rows])
    right.set_title("chrF against the masked line (mean)")
    for ax in (left, right):
        ax.set_xlabel("prompt budget (tokens)")
        ax.grid(alpha=0.3, axis="y")
    return save_figure(plt, fig, path)


def write_report(out: Path, config: dict, rows: list[dict], table: list[dict]) -> str:
    import json

    from bench.report import fmt, machine, markdown_table

    text = markdown_table(table, COLUMNS)
    lines = [
        "# Editor prompt budget",
        "",
        f"Command: `{config['command']}`",
        "",
        f"Model `{config['model']}` (`--dtype {config['precision']}`), greedy, the server's engine with the "
        f"request of a websocket `complete` in `line` mode, at most {MAX_TOKENS['line']} tokens. "
        f"{config['per_history']} line points per history ({', '.join(HISTORIES)}), seed {config['seed']}, "
        f"each completed once per budget. Machine: {machine()}. Wall time {fmt(config['wall_s'])} s.",
        "",
        "window: the 8,000 characters before the cursor and 2,000 after, uncut. A budget cuts that to its "
        "tokens, about 3/4 before the cursor and 1/4 after, each side at a line break. vs window: paired "
        "relative difference of the means over the points, with a 95% bootstrap interval. EM: exact match "
        "with the masked line, ends' whitespace ignored (95% Wilson interval); chrF: sacrebleu sentence chrF.",
        "",
        text,
        "",
        "![seconds and chrF per budget](bench_context.png)" if config.get("plot") else "",
    ]
    (out / "bench_context.md").write_text("\n".join(lines) + "\n")
    (out / "bench_context.json").write_text(json.dumps({"config": config, "table": table, "points": rows},
                                                       indent=1, default=str))
    return text


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m bench.context", description=__doc__.split("\n\n")[0])
    p.description = __doc__.split("\n\n")[0]
    add_point_options(p, "bench_context.md/.json/.png")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)),
                   help="prompt budgets in tokens, comma-separated (0: the websocket's character window alone)")
    p.add_argument("--per-history", type=int, default=12, help="line points per history")
    p.set_defaults(func=run)
    return p


def command_line(args) -> str:
    return (f"dynarank bench context --model {args.model} --dtype {args.dtype} --budgets {args.budgets} "
            f"--per-history {args.per_history} --seed {args.seed} --threads {args.threads}")


def run(args) -> int:
    from bench.served import load_served_model
    from server.config import Settings
    from server.engines import build_engine

    budgets = tuple(int(b) for b in args.budgets.split(","))
    t0 = time.time()
    points = sample_points(args.data, args.per_history, args.seed, kinds=("line",), context=None)
    model, tokenizer, precision = load_served_model(args.model, args.dtype, args.threads)
    engine = build_engine(Settings(model=args.model), model, tokenizer)
    engine.prefix_cache = None  # each budget's prompt prefilled whole: a point's budgets share their start
    complete(engine, points[0], min(budgets) or 512)  # warm-up: first calls build caches
    rows = []
    for i, point in enumerate(points):
        runs = {}
        for budget in budgets:
            result = complete(engine, point, budget)
            runs[str(budget)] = {**result, **score(point, result)}
        rows.append({"history": point["history"], "language": point["language"], "runs": runs})
        if args.progress:
            with open(args.progress, "a") as f:
                f.write(f"{i + 1}/{len(points)} {point['history']} "
                        + " ".join(f"{b}:{runs[str(b)]['seconds']:.1f}s/{runs[str(b)]['exact']}" for b in budgets)
                        + f" {time.time() - t0:.0f}s\n")
    table = summarize(rows, budgets)
    config = {"command": command_line(args), "model": args.model, "precision": precision,
              "per_history": args.per_history, "seed": args.seed, "budgets": budgets, "wall_s": time.time() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    config["plot"] = plot(args.out / "bench_context.png", table)
    print(write_report(args.out, config, rows, table))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
