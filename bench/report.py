"""Markdown tables, JSON and matplotlib plots for the benchmarks (matplotlib optional)."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch

REPLAY_COLUMNS = [
    ("method", "method"), ("nll_all", "NLL all"), ("nll_keyword", "NLL kw"), ("nll_identifier", "NLL id"),
    ("acc_all", "acc all"), ("acc_keyword", "acc kw"), ("acc_identifier", "acc id"),
    ("exact_match", "line EM"), ("bleu", "BLEU"), ("edit_sim", "edit sim"),
    ("edit_em", "EM at edit"), ("edit_chrf", "chrF at edit"), ("vs_base_all", "NLL vs base"),
    ("params_mean", "params mean"), ("params_final", "params final"), ("step_s", "s/step"), ("wall_s", "wall s"),
]


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, dict) and "rel" in value:  # a relative difference with its interval
        if math.isnan(value["rel"]):
            return "–"
        if math.isnan(value["lo"]):  # a mean without an interval
            return f"{value['rel']:+.1%}"
        return f"{value['rel']:+.1%} [{value['lo']:+.1%}, {value['hi']:+.1%}]"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" if key in ("method", "history") else "---:" for key, _ in columns) + "|"
    body = ["| " + " | ".join(fmt(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def running_mean(values: list[float]) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values, 1):
        total += v
        out.append(total / i)
    return out


def pyplot():
    """``matplotlib.pyplot`` drawing to files, or None without matplotlib (the tables are written anyway)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot(path: Path, panels: list[tuple[str, dict[str, list[float]]]], xlabel: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    axes = axes if len(panels) > 1 else [axes]
    for ax, (title, series) in zip(axes, panels):
        for name, ys in series.items():
            ax.plot(range(1, len(ys) + 1), ys, label=name, linewidth=1.4)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return save_figure(plt, fig, path)


def replay_curves(result: dict) -> list[tuple[str, dict[str, list[float]]]]:
    nll, em, params = {}, {}, {}
    for m, res in result["methods"].items():
        per_edit = [(sum(e["nll"]), len(e["nll"])) for e in res["edits"]]
        tot, n, curve = 0.0, 0, []
        for s, k in per_edit:  # running token-weighted mean
            tot, n = tot + s, n + k
            curve.append(tot / n if n else float("nan"))
        nll[m] = curve
        hits, seen, curve = 0, 0, []
        for e in res["edits"]:
            hits += sum(c["exact"] for c in e["completions"])
            seen += len(e["completions"])
            curve.append(hits / seen if seen else float("nan"))
        em[m] = curve
        params[m] = [e["params"] / 1e6 for e in res["edits"]]
    return [("running mean NLL of changed tokens", nll), ("running line exact match", em),
            ("adapter parameters (M)", params)]


def write_replay_report(result: dict, summary: dict[str, dict], out: Path, stem: str = "bench_replay") -> str:
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"method": m, **row} for m, row in summary.items()]
    table = markdown_table(rows, REPLAY_COLUMNS)
    cfg = result["config"]
    plotted = _plot(out / f"{stem}.png", replay_curves(result), "edit")
    lines = [
        "# Edit replay benchmark",
        "",
        f"Model `{cfg.get('model')}`, source `{Path(str(cfg.get('source', ''))).name}`, "
        f"{cfg['edits_replayed']} edits replayed (of {cfg['edits_available']} prepared), "
        f"{cfg['max_examples']} example(s) per edit of at most {cfg['max_tokens']} tokens, "
        f"{cfg['steps_per_edit']} step(s) per example, {cfg['completions_per_edit']} line completion(s) per example "
        f"(at most {cfg['max_new_tokens']} tokens), seed {cfg['seed']}. Machine: {machine()}. "
        f"Total wall time {fmt(cfg.get('wall_s'))} s.",
        "",
        "Each edit is scored before the method adapts on it. NLL and top-1 accuracy are means over "
        "changed tokens (kw: keyword tokens; id: identifier definitions and uses). Line EM: greedy "
        "completion of the rest of the line equals the document's; BLEU: sacrebleu corpus BLEU of "
        "those completions; edit sim: difflib ratio. EM / chrF at edit: the server's completion "
        "(its engine, FIM when the model has FIM tokens, healed, line mode) where the edit starts, "
        "against the first changed line. NLL vs base: relative difference of the mean NLL over "
        "edits, with a 95% paired-bootstrap interval. params: adapter parameters after each step "
        "(mean over edits, and final). s/step: mean time of one adaptation step (idle steps "
        "included); wall s: the method's share of the run (evaluation + adaptation).",
        "",
        table,
        "",
    ]
    if plotted:
        lines += [f"![replay curves]({stem}.png)", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    (out / f"{stem}.json").write_text(json.dumps({"config": cfg, "summary": summary, "per_edit": {
        m: [{k: v for k, v in e.items() if k not in ("nll", "correct", "cls")} |
            {"nll_mean": (sum(e["nll"]) / len(e["nll"])) if e["nll"] else None, "tokens": len(e["nll"])}
            for e in res["edits"]]
        for m, res in result["methods"].items()}}, indent=1, default=str))
    return table


HEADLINE_COLUMNS = [
    ("history", "history"), ("method", "method"), ("edits", "edits"), ("nll_all", "NLL"),
    ("vs_base_all", "vs base"), ("vs_fixed8_all", "vs fixed8"), ("vs_base_identifier", "identifiers vs base"),
    ("edit_em", "EM at edit"), ("edit_chrf", "chrF at edit"), ("params_mean", "params mean"),
]


def write_replay_headline(histories: dict[str, dict], out: Path, command: str) -> str:
    """docs/bench_replay.md over several histories: ``histories`` maps a name to its per-history JSON
    (config and summary), whose own page is bench_replay_<name>.md."""
    rows = [{"history": name, "method": m, **row} for name, data in histories.items()
            for m, row in data["summary"].items()]
    rows += _average_rows(histories)
    table = markdown_table(rows, HEADLINE_COLUMNS)
    cfg = next(iter(histories.values()))["config"] if histories else {}
    plotted = _plot_headline(out / "bench_replay.png", histories)
    walls = {name: (data["config"].get("wall_s"), data["config"].get("cpu_s")) for name, data in histories.items()}
    lines = [
        "# Edit replay benchmark: four histories", "",
        f"Command: `{command}`", "",
        f"Model `{cfg.get('model')}`, {cfg.get('max_examples')} example(s) per edit of at most "
        f"{cfg.get('max_tokens')} tokens; sessions as the server runs them (settings: "
        f"{cfg.get('settings') or 'defaults'}). Completion at the edit point: the last "
        f"{cfg.get('prefix_chars') or 'websocket-limit'} characters before the cursor and "
        f"{cfg.get('suffix_chars') or 'websocket-limit'} after it, at most {cfg.get('max_new_tokens')} tokens. "
        f"Machine: {machine().split(',')[0]}, {cfg.get('threads')} torch thread(s) per history, one process each. "
        "Wall (CPU) time per history: "
        + ", ".join(f"{name} {fmt(w)} s ({fmt(c)} s)" for name, (w, c) in walls.items()) + ".", "",
        "Every edit is scored before the method adapts on it. vs base / vs fixed8: relative difference "
        "of the mean NLL of the changed tokens over edits (negative is better), with a 95% paired-bootstrap "
        "interval over edits; identifiers vs base: the same on identifier tokens only. EM / chrF at edit: "
        "the server's completion where the edit starts (engine, FIM prompt when the model has FIM tokens, "
        "healing, line mode) against the first changed line. `average` rows: the unweighted mean over "
        "histories (of the relative differences; no interval).", "",
        table, "",
        *(["![NLL vs base per history](bench_replay.png)", ""] if plotted else []),
        "## Targets", "",
        *[f"- {line}" for line in target_verdicts(histories)], "",
        *[f"- {name}: [bench_replay_{name}.md](bench_replay_{name}.md), plot `bench_replay_{name}.png`"
          for name in histories], "",
    ]
    (out / "bench_replay.md").write_text("\n".join(lines))
    return table


def _plot_headline(path: Path, histories: dict[str, dict]) -> bool:
    """Bars: each method's NLL vs base per history, with its 95% interval."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    methods = [m for m in _methods(histories) if m != "base"]
    names = list(histories)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(1.6 + 1.8 * len(names), 4.0))
    for i, m in enumerate(methods):
        cells = [histories[n]["summary"][m]["vs_base_all"] for n in names]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(names))]
        rel = [100 * c["rel"] for c in cells]
        err = [[100 * (c["rel"] - c["lo"]) for c in cells], [100 * (c["hi"] - c["rel"]) for c in cells]]
        ax.bar(xs, rel, width, yerr=err, capsize=2, label=m)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("next-edit NLL vs base (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _methods(histories: dict[str, dict]) -> list[str]:
    first = next(iter(histories.values()))["summary"] if histories else {}
    return [m for m in first if all(m in data["summary"] for data in histories.values())]


def _average_rows(histories: dict[str, dict]) -> list[dict]:
    """Per method, the unweighted mean over histories of each headline figure."""
    if len(histories) < 2:
        return []
    rows = []
    for m in _methods(histories):
        cells = [data["summary"][m] for data in histories.values()]
        row = {"history": "average", "method": m, "edits": sum(c["edits"] for c in cells)}
        for key in ("nll_all", "edit_em", "edit_chrf", "params_mean"):
            row[key] = _mean_of([c.get(key) for c in cells])
        for key in ("vs_base_all", "vs_fixed8_all", "vs_base_identifier"):
            rels = [c[key]["rel"] for c in cells if isinstance(c.get(key), dict)]
            row[key] = {"rel": _mean_of(rels), "lo": float("nan"), "hi": float("nan")} if rels else None
        rows.append(row)
    return rows


def _mean_of(values) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def target_verdicts(histories: dict[str, dict], method: str = "dynamicrank") -> list[str]:
    """Issue 13's targets, each read off the per-history summaries as met or missed, with the figures."""
    if not histories or method not in _methods(histories):
        return [f"`{method}` was not replayed on every history: no verdicts."]
    rows = {name: data["summary"] for name, data in histories.items()}
    ours = {name: s[method] for name, s in rows.items()}
    out = []
    rel = {name: r["vs_base_all"] for name, r in ours.items()}
    avg = _mean_of([r["rel"] for r in rel.values()])
    excludes = [name for name, r in rel.items() if r["hi"] < 0]
    out.append(f"{_verdict(avg <= -0.08 and len(excludes) == len(rel))}: {method} NLL at least 8% below base on "
               f"average with an interval below 0 on every history. Average {avg:+.1%}; interval below 0 on "
               f"{len(excludes)} of {len(rel)} ({', '.join(excludes) or 'none'}).")
    worse = [name for name, s in rows.items()
             if s[method]["edit_em"] < s["base"]["edit_em"] or s[method]["edit_chrf"] < s["base"]["edit_chrf"]]
    out.append(f"{_verdict(not worse)}: completion EM and chrF at the edit point at least base's on every "
               f"history. Below base on: {', '.join(worse) or 'none'}.")
    fixed = [m for m in _methods(histories) if m.startswith("fixed")]
    if fixed:
        mean_nll = {m: _mean_of([s[m]["vs_base_all"]["rel"] for s in rows.values()]) for m in [*fixed, method]}
        mean_params = {m: _mean_of([s[m]["params_mean"] for s in rows.values()]) for m in [*fixed, method]}
        best = min(fixed, key=lambda m: mean_nll[m])
        met = mean_nll[method] <= mean_nll[best] and mean_params[method] <= mean_params[best]
        out.append(f"{_verdict(met)}: {method} at or below the best fixed rank's NLL at no more parameters. "
                   f"Best fixed: {best} ({mean_nll[best]:+.1%} vs base, {mean_params[best] / 1e6:.2f}M params); "
                   f"{method} {mean_nll[method]:+.1%}, {mean_params[method] / 1e6:.2f}M.")
    ident = _mean_of([r["vs_base_identifier"]["rel"] for r in ours.values()])
    out.append(f"{_verdict(ident < avg)}: identifier tokens gain more than the average token for {method}: "
               f"identifiers {ident:+.1%} vs base, all tokens {avg:+.1%} (averages over histories).")
    return out


def _verdict(met: bool) -> str:
    return "**met**" if met else "**missed**"
