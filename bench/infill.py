"""Fill-in-the-middle on real files: raw generation vs. healing + stopping + shaping, and the confidence gate.

Points come from the files of the edit histories (Python, Go, TypeScript): a
*line* point masks one line after its indentation; a *block* point masks the
body of a block (the lines under a header ending in ``:`` or ``{``) after the
first line's indentation. Each point is completed twice through the server's
own ``/v1/completions`` (in process, the default model, greedy): raw
(``trim: false``) and as an editor gets it (``trim: true`` with ``mode`` line or
block). Scores: exact match (whitespace at the ends ignored) and chrF against the
masked text, completion length, and time.

The gate: the shaped completions of each history are replayed in order as one
session would see them. A suggestion is "accepted" when it matches exactly (the
accept proxy). With the gate off every suggestion is shown; with it on,
``server.feedback.gate.ConfidenceGate`` decides before each one, and learns only
from the ones it showed. Writes docs/bench_infill.md and .json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HISTORIES = {"click": "python", "starlette": "python", "cobra": "go", "zustand": "typescript"}
GATE_TUNED_ON = ("click", "starlette")  # the gate's prior was set on these; the others are held out
CONTEXT_BEFORE, CONTEXT_AFTER = 1500, 600  # characters of prefix and suffix sent, as an editor would
MAX_TOKENS = {"line": 24, "block": 64}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def line_points(text: str) -> list[dict]:
    lines = text.split("\n")
    out, offset = [], 0
    for line in lines:
        body = line.strip()
        if 8 <= len(body) <= 100 and not body.startswith(("#", "//", "*", "/*")):
            start = offset + _indent(line)
            out.append({"prefix": text[:start], "reference": body, "suffix": text[offset + len(line):]})
        offset += len(line) + 1
    return out


def block_points(text: str) -> list[dict]:
    lines = text.split("\n")
    starts, offset = [], 0
    for line in lines:
        starts.append(offset)
        offset += len(line) + 1
    out = []
    for i, header in enumerate(lines[:-1]):
        if not header.rstrip().endswith((":", "{")):
            continue
        base, j = _indent(header), i + 1
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
            j += 1
        while j > i + 1 and not lines[j - 1].strip():
            j -= 1
        body = lines[i + 1:j]
        if not 2 <= len(body) <= 8 or not body[0].strip():
            continue
        start = starts[i + 1] + _indent(body[0])
        end = starts[j - 1] + len(lines[j - 1])
        out.append({"prefix": text[:start], "reference": text[start:end], "suffix": text[end:]})
    return out


POINT_FINDERS = {"line": line_points, "block": block_points}


def sample_points(data: Path, per_kind: int, seed: int, kinds: tuple[str, ...] = ("line", "block"),
                  context: tuple[int, int] | None = (CONTEXT_BEFORE, CONTEXT_AFTER)) -> list[dict]:
    """``per_kind`` points of each kind per history, from file versions spread over the history, with
    ``context`` characters of prefix and suffix (None: the whole file around the point)."""
    rng = random.Random(seed)
    before, after = context or (None, None)
    points = []
    for name, language in HISTORIES.items():
        with gzip.open(data / f"{name}_edits.jsonl.gz", "rt") as f:
            texts = [json.loads(line)["after"] for line in f]
        files = texts[::10]
        for kind in kinds:
            found = [p for text in files for p in POINT_FINDERS[kind](text)]
            for point in rng.sample(found, min(per_kind, len(found))):
                points.append({**point, "history": name, "language": language, "kind": kind,
                               "prefix": point["prefix"][-before:] if before else point["prefix"],
                               "suffix": point["suffix"][:after] if after else point["suffix"]})
    return points


def complete(client, model: str, point: dict, shaped: bool) -> dict:
    body = {"model": model, "prompt": point["prefix"], "suffix": point["suffix"], "temperature": 0,
            "max_tokens": MAX_TOKENS[point["kind"]], "trim": shaped}
    if shaped:
        body["mode"] = point["kind"]
    t0 = time.perf_counter()
    response = client.post("/v1/completions", json=body)
    response.raise_for_status()
    out = response.json()
    choice = out["choices"][0]
    return {"text": choice["text"], "confidence": choice.get("confidence"),
            "tokens": out["usage"]["completion_tokens"], "seconds": time.perf_counter() - t0}


def score(point: dict, result: dict) -> dict:
    from sacrebleu.metrics import CHRF

    text, reference = result["text"], point["reference"]
    return {"exact": text.strip() == reference.strip(),
            "chrf": CHRF().sentence_score(text.strip(), [reference.strip()]).score,
            "chars": len(text.strip()), "ref_chars": len(reference.strip())}


def gate_replay(rows: list[dict]) -> dict:
    """Shown share and precision of the shaped completions, gate off vs on (one session per history)."""
    from server.feedback.gate import ConfidenceGate

    candidates, shown = {}, {}
    for history in HISTORIES:
        gate, candidates[history], shown[history] = ConfidenceGate(), [], []
        for row in (r for r in rows if r["history"] == history):
            shaped = row["shaped"]
            if not shaped["text"].strip():
                continue  # nothing to suggest
            candidates[history].append(shaped)
            if gate.decide(shaped["confidence"]):
                shown[history].append(shaped)
                gate.update(shaped["confidence"], shaped["exact"])
    everything = _gate_counts([c for h in HISTORIES for c in candidates[h]], [c for h in HISTORIES for c in shown[h]])
    return {**everything, "histories": {h: _gate_counts(candidates[h], shown[h]) for h in HISTORIES}}


def _gate_counts(candidates: list[dict], shown: list[dict]) -> dict:
    return {"candidates": len(candidates), "shown_off": len(candidates),
            "precision_off": _ratio(sum(c["exact"] for c in candidates), len(candidates)),
            "shown_on": len(shown), "precision_on": _ratio(sum(c["exact"] for c in shown), len(shown)),
            "fewer_shown": 1 - _ratio(len(shown), len(candidates)) if candidates else None}


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion, in percent: fair at a few tens of points and near 0."""
    if n == 0:
        return float("nan"), float("nan")
    p, z2 = hits / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def _percent(share):
    return None if share is None else 100 * share


def _ratio(a, b):
    return a / b if b else None


def summarize(rows: list[dict]) -> list[dict]:
    table = []
    groups = sorted({(r["language"], r["kind"]) for r in rows})
    for language, kind in groups + [("all", "line"), ("all", "block")]:
        sel = [r for r in rows if r["kind"] == kind and language in ("all", r["language"])]
        if not sel:
            continue
        row = {"language": language, "kind": kind, "points": len(sel)}
        for variant in ("raw", "shaped"):
            row[f"{variant}_em"] = 100 * statistics.mean(r[variant]["exact"] for r in sel)
            row[f"{variant}_chrf"] = statistics.mean(r[variant]["chrf"] for r in sel)
            row[f"{variant}_chars"] = statistics.median(r[variant]["chars"] for r in sel)
            row[f"{variant}_s"] = statistics.median(r[variant]["seconds"] for r in sel)
        row["ref_chars"] = statistics.median(r["shaped"]["ref_chars"] for r in sel)
        row["em_gain"] = row["shaped_em"] - row["raw_em"]
        lo, hi = wilson_interval(sum(r["shaped"]["exact"] for r in sel), len(sel))
        row["shaped_em_ci"] = f"{lo:.1f}-{hi:.1f}"
        table.append(row)
    return table


COLUMNS = [("language", "language"), ("kind", "kind"), ("points", "points"),
           ("raw_em", "raw EM %"), ("shaped_em", "shaped EM %"),
           ("shaped_em_ci", "shaped EM 95% CI"), ("em_gain", "EM gain"),
           ("raw_chrf", "raw chrF"), ("shaped_chrf", "shaped chrF"),
           ("ref_chars", "ref chars (median)"), ("raw_chars", "raw chars"), ("shaped_chars", "shaped chars"),
           ("raw_s", "raw s"), ("shaped_s", "shaped s")]


def write_report(out: Path, config: dict, rows: list[dict], table: list[dict], gate: dict) -> str:
    from bench.report import fmt, machine, markdown_table

    out.mkdir(parents=True, exist_ok=True)
    text = markdown_table(table, COLUMNS)
    per_history = [(f"{name} ({HISTORIES[name]}{', tuned on' if name in GATE_TUNED_ON else ''})", counts)
                   for name, counts in gate.get("histories", {}).items()]
    gate_table = markdown_table([{**counts, "history": name, "fewer_shown": _percent(counts["fewer_shown"])}
                                 for name, counts in per_history + [("all", gate)]],
                                [("history", "history"), ("candidates", "suggestions"),
                                 ("shown_on", "shown, gate on"), ("fewer_shown", "fewer shown %"),
                                 ("precision_off", "precision, gate off"), ("precision_on", "precision, gate on")])
    lines = [
        "# Infilling benchmark",
        "",
        f"Command: `{config['command']}`",
        "",
        f"Model `{config['model']}` (`--dtype {config.get('precision', 'float32')}`), greedy, through "
        f"`/v1/completions` in process. {config['per_kind']} line and "
        f"{config['per_kind']} block points per history ({', '.join(HISTORIES)}), seed {config['seed']}; "
        f"prefix {CONTEXT_BEFORE} and suffix {CONTEXT_AFTER} characters; at most {MAX_TOKENS['line']} tokens "
        f"(line) and {MAX_TOKENS['block']} (block). Machine: {machine()}. Wall time {fmt(config['wall_s'])} s.",
        "",
        "raw: `trim: false` (the model's text as generated, what the server returned before). shaped: "
        "`trim: true` with `mode` line or block (token healing, special-token and suffix-aware stops, "
        "fences, shaping). EM: exact match with the masked text, ends' whitespace ignored; chrF: "
        "sacrebleu sentence chrF; chars: median completion length; s: median seconds per completion. "
        "CI: 95% Wilson interval of the shaped exact-match rate over the points.",
        "",
        text,
        "",
        "## The confidence gate",
        "",
        f"The shaped completions that are not empty ({gate['candidates']}), replayed per history as one "
        "session; a suggestion is accepted when it matches exactly. With the gate on, "
        "`ConfidenceGate` (logistic model of the confidence starting from its prior, learned online from the "
        "shown suggestions' outcomes; show when p(accept) > 0.25) decides before each one. Precision is the "
        f"share of shown suggestions that match exactly. The prior was set on {' and '.join(GATE_TUNED_ON)} only.",
        "",
        gate_table,
        "",
        f"Fewer suggestions shown with the gate: {fmt(_percent(gate['fewer_shown']))} %.",
        "",
        *([f"The gate was replayed on this run's completions by `{config['gate_command']}`."]
          if config.get("gate_command") else []),
    ]
    (out / "bench_infill.md").write_text("\n".join(lines))
    (out / "bench_infill.json").write_text(json.dumps({"config": config, "table": table, "gate": gate,
                                                       "points": rows}, indent=1, default=str))
    return text + "\n\n" + gate_table


def add_point_options(p: argparse.ArgumentParser, outputs: str) -> None:
    """The options of the benchmarks that complete points of the histories on the served model (infill,
    context, keystrokes); ``outputs`` names the files they write."""
    p.add_argument("--data", type=Path, default=DATA, help="folder of the edit histories (default: shared/data)")
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="embedded model name or model directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--dtype", default="auto", help="precision of the model, as `dynarank serve --dtype` (default: "
                                                   "auto, what the server serves on this machine)")
    p.add_argument("--out", type=Path, default=DOCS, help=f"folder for {outputs}")
    p.add_argument("--progress", type=Path, default=None, help="append one line per point to this file")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m bench.infill", description=__doc__.split("\n\n")[0])
    p.description = __doc__.split("\n\n")[0]
    add_point_options(p, "bench_infill.md/.json")
    p.add_argument("--per-kind", type=int, default=25, help="line points and block points per history")
    p.add_argument("--gate-only", type=Path, default=None, metavar="JSON",
                   help="replay only the confidence gate on the completions of an earlier run's bench_infill.json "
                        "(the gate reads their confidences and exact matches; nothing is generated)")
    p.set_defaults(func=run)
    return p


def command_line(args) -> str:
    """The options that shape the results (not where progress or output went, paths of this machine)."""
    return (f"dynarank bench infill --model {args.model} --dtype {args.dtype} --per-kind {args.per_kind} "
            f"--seed {args.seed} --threads {args.threads}")


def replay_gate_only(args) -> int:
    earlier = json.loads(args.gate_only.read_text())
    config = {**earlier["config"], "gate_command": f"dynarank bench infill --gate-only {args.gate_only.name}"}
    print(write_report(args.out, config, earlier["points"], earlier["table"], gate_replay(earlier["points"])))
    return 0


def run(args) -> int:
    if args.gate_only:
        return replay_gate_only(args)
    import tempfile

    from fastapi.testclient import TestClient

    from bench.served import load_served_model
    from server.app import create_app
    from server.config import Settings

    t0 = time.time()
    points = sample_points(args.data, args.per_kind, args.seed)
    model, tokenizer, precision = load_served_model(args.model, args.dtype, args.threads)
    settings = Settings(model=args.model, data_dir=Path(tempfile.mkdtemp(prefix="dynarank-infill-")),
                        max_tokens_limit=max(MAX_TOKENS.values()))
    rows = []
    with TestClient(create_app(settings, model=model, tokenizer=tokenizer), base_url="http://127.0.0.1") as client:
        for i, point in enumerate(points):
            row = {k: point[k] for k in ("history", "language", "kind")}
            for variant, shaped in (("raw", False), ("shaped", True)):
                result = complete(client, settings.served_name, point, shaped)
                row[variant] = {**result, **score(point, result)}
            rows.append(row)
            if args.progress:
                with open(args.progress, "a") as f:
                    f.write(f"{i + 1}/{len(points)} {row['history']} {row['kind']} raw={row['raw']['exact']} "
                            f"shaped={row['shaped']['exact']} {time.time() - t0:.0f}s\n")
    table, gate = summarize(rows), gate_replay(rows)
    config = {"command": command_line(args), "model": args.model, "precision": precision,
              "per_kind": args.per_kind, "seed": args.seed, "wall_s": time.time() - t0}
    print(write_report(args.out, config, rows, table, gate))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
