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


def _plot(path: Path, panels: list[tuple[str, dict[str, list[float]]]], xlabel: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
    table = markdown_table(rows, HEADLINE_COLUMNS)
    cfg = next(iter(histories.values()))["config"] if histories else {}
    lines = [
        "# Edit replay benchmark: four histories", "",
        f"Command: `{command}`", "",
        f"Model `{cfg.get('model')}`, {cfg.get('max_examples')} example(s) per edit of at most "
        f"{cfg.get('max_tokens')} tokens; sessions as the server runs them (settings: "
        f"{cfg.get('settings') or 'defaults'}). Machine: {machine()}.", "",
        "Every edit is scored before the method adapts on it. vs base / vs fixed8: relative difference "
        "of the mean NLL of the changed tokens over edits (negative is better), with a 95% paired-bootstrap "
        "interval over edits; identifiers vs base: the same on identifier tokens only. EM / chrF at edit: "
        "the server's completion where the edit starts (engine, FIM prompt when the model has FIM tokens, "
        "healing, line mode) against the first changed line.", "",
        table, "",
        *[f"- {name}: [bench_replay_{name}.md](bench_replay_{name}.md), plot `bench_replay_{name}.png`"
          for name in histories], "",
    ]
    (out / "bench_replay.md").write_text("\n".join(lines))
    return table
