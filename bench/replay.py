"""Edit replay: for each edit in order, evaluate every method's current adapter on the
edit's changed tokens, then adapt it on the edit as the server would.

    python -m bench.replay --edits 30 --methods base,fixed8,dynamicrank
    dynarank bench replay --data path/to/edits.jsonl.gz | --repo path/to/git/checkout
    dynarank bench replay --data click,starlette,cobra,zustand --edits 100 --jobs 2

Everything a session does is the server's own code: examples from
``server.adaptation.examples``, the replay buffer of ``server.sessions.replay``, the step
and idle steps of ``server.adaptation.learner``, completions through the serving engine.
Writes docs/bench_replay.md, .json and .png (per history, bench_replay_<name>.*, and a
headline bench_replay.md).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from bench.edits import DEFAULT_DATA, DEFAULT_EXTENSIONS, load_edits
from bench.methods import DEFAULT_METHODS, METHODS

# torch, adapter_core and the scoring code are imported inside the functions: building
# the `dynarank` command line must stay fast.

DOCS = Path(__file__).resolve().parents[1] / "docs"


def build_examples(tokenizer, edits, max_tokens: int, max_examples: int, limit: int | None):
    """[(edit index, edit, examples)] for edits that give at least one example, up to ``limit``."""
    from server.adaptation.examples import edit_example_builder

    builder = edit_example_builder(tokenizer, max_tokens=max_tokens, max_examples=max_examples)
    out = []
    for i, edit in enumerate(edits):
        examples = builder.from_edit(edit["before"], edit["after"], path=edit.get("path"), language=edit.get("language"))
        if examples:
            out.append((i, edit, examples))
            if limit is not None and len(out) >= limit:
                break
    return out


def _new_record(index: int, edit: dict) -> dict:
    return {"edit": index, "path": edit.get("path"), "commit": (edit.get("commit") or "")[:12],
            "nll": [], "correct": [], "cls": [], "completions": [], "at_edit": [], "losses": [], "params": 0}


def replay(model, tokenizer, edits, methods=DEFAULT_METHODS, *, steps_per_edit: int = 1, max_tokens: int = 256,
           max_examples: int = 1, n_edits: int | None = None, completions_per_edit: int = 2,
           max_new_tokens: int = 24, seed: int = 0, time_budget_s: float | None = None,
           progress=None, settings=None, prefix_chars: int | None = None,
           suffix_chars: int | None = None) -> dict:
    """Run the replay; returns {"config", "methods": {name: {"edits": [...], "wall_s", "step_times"}}}.

    Per edit, as a session would see it: the file is opened when first touched (its chunks join the
    replay buffer), every method is scored before it adapts, then it adapts on the edit's examples
    and takes the idle steps the server takes while the user pauses. ``settings``: the server
    Settings of the sessions (learning rate, budget, replay). ``prefix_chars``/``suffix_chars``:
    narrower document windows for the completion at the edit point (default: the websocket's).
    """
    from adapter_core import inject_adapters
    from bench.methods import make_learner
    from bench.scoring import complete_at_edit, complete_lines, completion_points, edit_point, score_tokens
    from server.adaptation.examples import document_examples, edit_example_builder
    from server.engines.hf import HFEngine

    inject_adapters(model)  # once, so the base method can bind None like the others
    engine = HFEngine(model, tokenizer, "bench")  # the serving path, for completions at the edit point
    documents = edit_example_builder(tokenizer, max_tokens=max_tokens)
    work = build_examples(tokenizer, edits, max_tokens, max_examples, n_edits)
    total_steps = sum(len(ex) for _, _, ex in work) * steps_per_edit
    learners = {m: make_learner(m, model, seed=seed, total_steps=total_steps, settings=settings) for m in methods}
    results = {m: {"edits": [], "wall_s": 0.0} for m in methods}
    opened: set[str] = set()
    t_start = time.perf_counter()
    for n, (index, edit, examples) in enumerate(work):
        if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
            break
        if edit.get("path") not in opened:
            opened.add(edit.get("path"))
            chunks = document_examples(documents, edit["before"], edit.get("path"), edit.get("language"))
            for learner in learners.values():
                learner.open_document(chunks)
        points = [completion_points(ex, edit["after"], tokenizer, completions_per_edit, seed * 100_003 + index * 31 + j,
                                    max_ref_tokens=max_new_tokens)
                  for j, ex in enumerate(examples)]
        # The completion a user sees where the edit starts: one per edit (the first example's point).
        at_edit = [p for p in (edit_point(ex, edit["after"]) for ex in examples) if p is not None][:1]
        for m, learner in learners.items():
            t0 = time.perf_counter()
            rec = _new_record(index, edit)
            snap = learner.snapshot()  # evaluate first: the adapter has not seen this edit
            for ex, pts in zip(examples, points):
                scores = score_tokens(model, snap, ex)
                for key in ("nll", "correct", "cls"):
                    rec[key] += scores[key]
                rec["completions"] += complete_lines(model, tokenizer, snap, ex, pts, max_new_tokens)
            rec["at_edit"] = [complete_at_edit(engine, snap, p, max_new_tokens, prefix_chars, suffix_chars)
                              for p in at_edit]
            rec["params_eval"] = snap.num_params if snap is not None else 0
            for ex in examples:
                rec["losses"] += learner.adapt(ex, steps_per_edit)
            rec["losses"] += learner.pause()
            rec["params"] = learner.num_params
            rec["mean_rank"] = _mean(list(learner.ranks().values()))
            results[m]["edits"].append(rec)
            results[m]["wall_s"] += time.perf_counter() - t0
        if progress:
            progress(n + 1, len(work), {m: results[m]["edits"][-1] for m in methods})
    for m, learner in learners.items():
        results[m]["step_times"] = list(learner.step_times)
        learner.close()
    config = {"steps_per_edit": steps_per_edit, "max_tokens": max_tokens, "max_examples": max_examples,
              "completions_per_edit": completions_per_edit, "max_new_tokens": max_new_tokens, "seed": seed,
              "prefix_chars": prefix_chars, "suffix_chars": suffix_chars,
              "edits_available": len(work), "edits_replayed": len(results[methods[0]]["edits"]) if methods else 0}
    return {"config": config, "methods": results}


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(result: dict) -> dict[str, dict]:
    """Per method: token-weighted NLL and accuracy per group, completion scores, params, times."""
    from bench.scoring import GROUPS, bleu

    out = {}
    for m, res in result["methods"].items():
        edits = res["edits"]
        nll = [x for e in edits for x in e["nll"]]
        correct = [x for e in edits for x in e["correct"]]
        cls = [x for e in edits for x in e["cls"]]
        comps = [c for e in edits for c in e["completions"]]
        row = {"edits": len(edits), "tokens": len(nll)}
        for group, members in GROUPS.items():
            idx = [i for i, c in enumerate(cls) if members is None or c in members]
            row[f"nll_{group}"] = _mean([nll[i] for i in idx])
            row[f"acc_{group}"] = _mean([float(correct[i]) for i in idx])
            row[f"n_{group}"] = len(idx)
        at_edit = [c for e in edits for c in e.get("at_edit", [])]
        row["edit_points"] = len(at_edit)
        row["edit_em"] = _mean([float(c["exact"]) for c in at_edit])
        row["edit_chrf"] = _mean([c["chrf"] for c in at_edit])
        row["completions"] = len(comps)
        row["exact_match"] = _mean([float(c["exact"]) for c in comps])
        row["edit_sim"] = _mean([c["edit_sim"] for c in comps])
        row["bleu"] = bleu([c["hyp"] for c in comps], [c["ref"] for c in comps])
        params = [e["params"] for e in edits]
        row["params_mean"] = _mean(params) if params else 0.0
        row["params_final"] = params[-1] if params else 0
        row["step_s"] = _mean(res["step_times"]) if res["step_times"] else 0.0
        row["wall_s"] = res["wall_s"]
        out[m] = row
    for reference in ("base", "fixed8"):
        if reference not in result["methods"]:
            continue
        for m, row in out.items():
            for group in ("all", "identifier"):
                row[f"vs_{reference}_{group}"] = paired_bootstrap(
                    _per_edit_nll(result["methods"][m]["edits"], group),
                    _per_edit_nll(result["methods"][reference]["edits"], group))
    return out


def _per_edit_nll(edits: list[dict], group: str) -> list[float]:
    """Mean NLL of each edit's changed tokens of a group (nan for an edit without such tokens)."""
    from bench.scoring import GROUPS

    members = GROUPS[group]
    return [_mean([x for x, c in zip(e["nll"], e["cls"]) if members is None or c in members]) for e in edits]


def paired_bootstrap(values: list[float], reference: list[float], samples: int = 2000, seed: int = 0) -> dict:
    """Relative difference of means, sum(v - r) / sum(r) over edits, with a 95% paired-bootstrap interval
    (edits resampled with replacement; edits where either is nan are left out)."""
    import numpy as np

    pairs = np.array([(v, r) for v, r in zip(values, reference) if not (math.isnan(v) or math.isnan(r))])
    if len(pairs) < 2:
        return {"rel": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": len(pairs)}
    diff, ref = pairs[:, 0] - pairs[:, 1], pairs[:, 1]
    idx = np.random.default_rng(seed).integers(0, len(pairs), size=(samples, len(pairs)))
    rel = diff[idx].sum(axis=1) / ref[idx].sum(axis=1)
    lo, hi = np.percentile(rel, [2.5, 97.5])
    return {"rel": float(diff.sum() / ref.sum()), "lo": float(lo), "hi": float(hi), "n": len(pairs)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.split("\n\n")[0])
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="JSONL(.gz) of file edits, or a history's name in the shared data folder (click, "
                        "starlette, cobra, zustand); several, comma-separated, are one history each, written to "
                        "bench_replay_<name>.md and summed up in bench_replay.md (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1, help="histories replayed at once, one process each")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a server setting for the sessions, e.g. --set replay_rows=0 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="keep histories whose bench_replay_<name>.json already holds a run of this configuration")
    p.add_argument("--repo", type=Path, default=None, help="replay a local git repository's first-parent history instead")
    p.add_argument("--max-commits", type=int, default=None, help="with --repo: the most recent N commits")
    p.add_argument("--extensions", default=",".join(DEFAULT_EXTENSIONS), help="with --repo: file types, comma-separated")
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or model directory")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated; known: {', '.join(METHODS)}")
    p.add_argument("--edits", type=int, default=10, help="edits (that give training examples) to replay")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per example")
    p.add_argument("--max-examples", type=int, default=None, help="examples per edit (default: the server's)")
    p.add_argument("--steps-per-edit", type=int, default=1, help="train steps per example (the server runs 1)")
    p.add_argument("--completions", type=int, default=2, help="line completions sampled per example")
    p.add_argument("--max-new-tokens", type=int, default=24, help="longest line completion")
    p.add_argument("--prefix-chars", type=int, default=None,
                   help="document characters before the cursor in the completion at the edit point "
                        "(default: the websocket's limit; fewer makes the evaluation cheaper)")
    p.add_argument("--suffix-chars", type=int, default=None, help="likewise, characters after the cursor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None, help="stop starting new edits after this many seconds")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is far faster than 2 on a shared 2-core machine)")
    p.add_argument("--out", type=Path, default=DOCS, help="folder for bench_replay.md/.json/.png")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import json

    from bench.report import write_replay_headline

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"unknown methods: {', '.join(unknown)}; known: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    try:
        overrides = dict(item.split("=", 1) for item in args.set)
        _settings(overrides)
    except ValueError as exc:
        print(f"--set: {exc}", file=sys.stderr)
        return 2
    sources = [args.repo] if args.repo is not None else [_history_path(p) for p in args.data.split(",") if p.strip()]
    if len(sources) == 1:
        return _run_history(args, methods, sources[0], overrides, stem="bench_replay")
    stems = {source: f"bench_replay_{source.name.split('_edits')[0].split('.')[0]}" for source in sources}
    todo = [s for s in sources if not (args.resume and _done(args.out / f"{stems[s]}.json", args, methods))]
    if args.jobs > 1 and len(todo) > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(min(args.jobs, len(todo)),
                                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            codes = list(pool.map(_run_history, *zip(*[(args, methods, s, overrides, stems[s]) for s in todo])))
    else:
        codes = [_run_history(args, methods, s, overrides, stems[s]) for s in todo]
    if any(codes):
        return max(codes)
    histories = {stems[s].removeprefix("bench_replay_"): json.loads((args.out / f"{stems[s]}.json").read_text())
                 for s in sources}
    argv = sys.argv[sys.argv.index("replay") + 1:] if "replay" in sys.argv else sys.argv[1:]
    print(write_replay_headline(histories, args.out, "dynarank bench replay " + " ".join(argv)))
    return 0


def _history_path(item: str) -> Path:
    """A file, or the name of a history beside the default one (``click`` -> .../click_edits.jsonl.gz)."""
    item = item.strip()
    if "/" not in item and "." not in item:
        return DEFAULT_DATA.parent / f"{item}_edits.jsonl.gz"
    return Path(item)


def _settings(overrides: dict):
    """Server Settings with ``overrides`` (KEY=VALUE strings, validated like the server's flags)."""
    from pydantic import ValidationError

    from server.config import Settings

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ValueError(str(exc).splitlines()[0] + ": " + "; ".join(e["msg"] for e in exc.errors())) from None


def _config_key(args, methods) -> dict:
    return {"methods": methods, "edits": args.edits, "max_tokens": args.max_tokens, "seed": args.seed,
            "model": args.model, "settings": sorted(args.set), "steps_per_edit": args.steps_per_edit,
            "completions": args.completions, "max_new_tokens": args.max_new_tokens,
            "prefix_chars": args.prefix_chars, "suffix_chars": args.suffix_chars}


def _done(path: Path, args, methods) -> bool:
    """Whether ``path`` holds a finished run of this configuration (for --resume)."""
    import json

    try:
        return json.loads(path.read_text())["config"].get("key") == _config_key(args, methods)
    except (OSError, ValueError, KeyError):
        return False


def _run_history(args, methods, source: Path, overrides: dict, stem: str) -> int:
    """One history's replay (also in a worker process), written to ``<out>/<stem>.md/.json/.png``."""
    import torch

    from bench.report import write_replay_report
    from server.adaptation.examples import EDIT_MAX_EXAMPLES
    from server.models import load_model, resolve_model

    torch.set_num_threads(args.threads)
    exts = tuple(e if e.startswith(".") else "." + e for e in args.extensions.split(",") if e)
    # Many edits give no example (whitespace, deletions): read a generous prefix.
    edits = load_edits(source, limit=None if args.repo else max(args.edits * 4, 50), max_commits=args.max_commits,
                       extensions=exts)
    model, tokenizer = load_model(resolve_model(args.model, progress=True))
    t0, cpu0 = time.perf_counter(), time.process_time()

    def progress(done, total, last):
        line = " ".join(f"{m}={_mean(r['nll']):.3f}" for m, r in last.items())
        print(f"[{time.perf_counter() - t0:7.1f}s] {source.name} edit {done}/{total} {line}", flush=True)

    result = replay(model, tokenizer, edits, methods, steps_per_edit=args.steps_per_edit, max_tokens=args.max_tokens,
                    max_examples=args.max_examples or EDIT_MAX_EXAMPLES, n_edits=args.edits,
                    completions_per_edit=args.completions, max_new_tokens=args.max_new_tokens, seed=args.seed,
                    time_budget_s=args.time_budget, progress=progress, settings=_settings(overrides),
                    prefix_chars=args.prefix_chars, suffix_chars=args.suffix_chars)
    # CPU time as well as wall time: on a shared machine the wall time says more about the neighbours.
    result["config"].update({"model": args.model, "source": source.name, "wall_s": time.perf_counter() - t0,
                             "cpu_s": time.process_time() - cpu0,
                             "threads": args.threads, "settings": " ".join(sorted(args.set)),
                             "key": _config_key(args, methods)})
    table = write_replay_report(result, summarize(result), args.out, stem)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
