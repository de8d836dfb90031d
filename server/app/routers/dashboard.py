"""``/dashboard``: one self-contained page (no CDN; the machine may be offline).

The page polls ``/v1/dashboard/data`` and draws with plain JS and inline SVG:
sessions and jobs as tables, loss over time per adapter, a heatmap of each
adapted module's rank over time for the selected adapter, and the completion
acceptance rate per adapter version (base model and repository adapters as
dashed reference lines). With API keys on,
open ``/dashboard#key=KEY``: the key stays in the fragment (never sent in a
URL) and goes out as a Bearer header.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from server.app.deps import AUTH, Owner, ServicesDep

MAX_POINTS = 300


def dashboard_data(ctx, owner) -> dict:
    sessions = []
    for s in ctx.sessions.sessions(owner):
        d = s.describe()
        with s.lock:
            history = list(s.history)[-MAX_POINTS:]
            modules = list(s.snapshot.ranks)
        fb = s.feedback.stats()
        sessions.append({"id": s.id, "name": s.adapter_name, "version": d["version"], "steps": d["steps"],
                         "acceptance_rate": fb["acceptance_rate"], "acceptance": _acceptance(fb),
                         "queue_depth": d["queue_depth"], "dropped": d["dropped"], "connections": d["connections"],
                         "mean_rank": d["mean_rank"], "last_loss": d["last_loss"], "modules": modules,
                         "history": [{"t": h["t"], "version": h["version"], "loss": h["loss"], "ranks": h["ranks"]}
                                     for h in history]})
    jobs = []
    for job in ctx.jobs.list(owner)[:20]:
        rec = job.public()
        points = [e["data"] for e in job.events if e.get("data")][-MAX_POINTS:]
        jobs.append({"id": rec["id"], "name": rec["adapter_name"], "status": rec["status"], "step": rec["step"],
                     "total_steps": rec["total_steps"], "created_at": rec["created_at"],
                     "history": [{"t": i, "version": p["step"], "loss": p["loss"], "ranks": p["ranks"]}
                                 for i, p in enumerate(points)]})
    models = [{"name": m, "acceptance_rate": st["acceptance_rate"], "decided": _decided(st)}
              for m, st in ctx.feedback.model_stats(owner).items()]
    return {"sessions": sessions, "jobs": jobs, "models": models}


def _decided(row: dict) -> int:
    return row["accepted"] + row["partially_accepted"] + row["rejected"]


def _acceptance(stats: dict) -> list[dict]:
    """Points (adapter version, rate, decided) for versions with at least one decision."""
    return [{"version": r["adapter_version"], "rate": r["acceptance_rate"], "decided": _decided(r)}
            for r in stats["by_version"] if r["acceptance_rate"] is not None and r["adapter_version"] is not None]


router = APIRouter(tags=["dashboard"])


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard():
    return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})


@router.get("/v1/dashboard/data", dependencies=AUTH)
def data(services: ServicesDep, owner: Owner):
    return dashboard_data(services, owner)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dynarank dashboard</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.05em;margin-top:1.5em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
tr.sel{background:#eef}tr[data-name]{cursor:pointer}
#err{color:#b00}.legend span{margin-right:1em}
</style></head><body>
<h1>dynarank</h1><div id="err"></div>
<h2>Sessions</h2><table id="sessions"><thead><tr><th>session</th><th>version</th><th>steps</th>
<th>queue</th><th>dropped</th><th>tabs</th><th>mean rank</th><th>loss</th><th>accepted</th></tr></thead><tbody></tbody></table>
<h2>Completion acceptance rate by adapter version</h2><svg id="accept" width="720" height="260"></svg>
<div class="legend" id="acclegend"></div>
<h2>Fine-tuning jobs</h2><table id="jobs"><thead><tr><th>job</th><th>adapter</th><th>status</th>
<th>step</th></tr></thead><tbody></tbody></table>
<h2>Loss over time</h2><svg id="loss" width="720" height="240"></svg><div class="legend" id="legend"></div>
<h2>Rank per module over time: <span id="heatname">-</span></h2><svg id="heat" width="720" height="260"></svg>
<script>
"use strict";
const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#1f77b4","#d62728","#2ca02c","#ff7f0e","#9467bd","#8c564b","#e377c2","#17becf"];
const key = new URLSearchParams(location.hash.slice(1)).get("key");
let selected = null;

function el(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}
function row(tbody, cells, name) {
  const tr = document.createElement("tr");
  for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
  if (name) { tr.dataset.name = name; tr.onclick = () => { selected = name; refresh(); }; if (name === selected) tr.className = "sel"; }
  tbody.appendChild(tr);
}
function fmt(x) { return x === null || x === undefined ? "-" : (typeof x === "number" ? +x.toFixed(4) : x); }

function drawLoss(series) {
  const svg = document.getElementById("loss"); svg.innerHTML = "";
  const legend = document.getElementById("legend"); legend.innerHTML = "";
  const W = 720, H = 240, P = 36;
  const pts = series.flatMap(s => s.history.map(h => h.loss)).filter(Number.isFinite);
  el("rect", {x: P, y: 8, width: W - P - 8, height: H - P - 8, fill: "none", stroke: "#999"}, svg);
  if (!pts.length) { el("text", {x: W / 2 - 40, y: H / 2, fill: "#888"}, svg).textContent = "no steps yet"; return; }
  const lo = Math.min(...pts), hi = Math.max(...pts), span = (hi - lo) || 1;
  el("text", {x: 2, y: 16, "font-size": 10}, svg).textContent = hi.toFixed(2);
  el("text", {x: 2, y: H - P, "font-size": 10}, svg).textContent = lo.toFixed(2);
  series.forEach((s, i) => {
    const h = s.history.filter(p => Number.isFinite(p.loss)); if (!h.length) return;
    const n = Math.max(h.length - 1, 1), color = COLORS[i % COLORS.length];
    const d = h.map((p, j) => (P + j / n * (W - P - 8)).toFixed(1) + "," + (8 + (hi - p.loss) / span * (H - P - 16)).toFixed(1)).join(" ");
    el("polyline", {points: d, fill: "none", stroke: color, "stroke-width": 1.5, "data-name": s.name}, svg);
    const sp = document.createElement("span"); sp.style.color = color; sp.textContent = "\\u25A0 " + s.name; legend.appendChild(sp);
  });
}

function drawHeat(s) {
  const svg = document.getElementById("heat"); svg.innerHTML = "";
  document.getElementById("heatname").textContent = s ? s.name : "-";
  if (!s || !s.history.length) return;
  const W = 720, H = 260, T = s.history.length, M = s.history[0].ranks.length;
  const all = s.history.flatMap(h => h.ranks), lo = Math.min(...all), hi = Math.max(...all), span = (hi - lo) || 1;
  const cw = (W - 60) / T, ch = (H - 20) / M;
  s.history.forEach((h, t) => h.ranks.forEach((r, m) => {
    const v = (r - lo) / span, light = 92 - 62 * v;
    const c = el("rect", {x: 50 + t * cw, y: m * ch, width: Math.max(cw, 1), height: Math.max(ch, 1),
      fill: "hsl(220,70%," + light.toFixed(0) + "%)", class: "cell"}, svg);
    el("title", {}, c).textContent = (s.modules && s.modules[m] || "module " + m) + " @v" + h.version + ": rank " + r;
  }));
  el("text", {x: 0, y: 12, "font-size": 10}, svg).textContent = "module";
  el("text", {x: 50, y: H - 4, "font-size": 10}, svg).textContent = "steps -> (rank " + lo + " light .. " + hi + " dark)";
}

function drawAcceptance(sessions, models) {
  const svg = document.getElementById("accept"); svg.innerHTML = "";
  const legend = document.getElementById("acclegend"); legend.innerHTML = "";
  const W = 720, H = 260, L = 44, B = 30, T = 10, R = 10;
  const withData = sessions.filter(s => s.acceptance && s.acceptance.length);
  const refs = models.filter(m => m.acceptance_rate !== null);
  el("rect", {x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#999"}, svg);
  if (!withData.length && !refs.length) { el("text", {x: W / 2 - 60, y: H / 2, fill: "#888"}, svg).textContent = "no feedback yet"; return; }
  const versions = withData.flatMap(s => s.acceptance.map(p => p.version));
  const vlo = versions.length ? Math.min(...versions) : 0, vhi = versions.length ? Math.max(...versions) : 1;
  const vspan = (vhi - vlo) || 1;
  const x = v => L + 12 + (v - vlo) / vspan * (W - L - R - 24), y = r => T + (1 - r) * (H - T - B);
  for (const r of [0, 0.25, 0.5, 0.75, 1]) {
    el("line", {x1: L, x2: W - R, y1: y(r), y2: y(r), stroke: "#eee"}, svg);
    el("text", {x: 4, y: y(r) + 4, "font-size": 10}, svg).textContent = (r * 100) + "%";
  }
  for (const v of [...new Set(versions)].sort((a, b) => a - b))
    el("text", {x: x(v) - 4, y: H - B + 14, "font-size": 10}, svg).textContent = "v" + v;
  el("text", {x: W / 2 - 40, y: H - 2, "font-size": 11}, svg).textContent = "adapter version";
  refs.forEach((m, i) => {
    const color = COLORS[(i + 4) % COLORS.length];
    el("line", {x1: L, x2: W - R, y1: y(m.acceptance_rate), y2: y(m.acceptance_rate), stroke: color,
      "stroke-dasharray": "6 4", "stroke-width": 1.5}, svg);
    const sp = document.createElement("span"); sp.style.color = color;
    sp.textContent = "- - " + m.name + " " + (m.acceptance_rate * 100).toFixed(0) + "% (" + m.decided + ")"; legend.appendChild(sp);
  });
  withData.forEach((s, i) => {
    const color = COLORS[i % COLORS.length], pts = s.acceptance;
    el("polyline", {points: pts.map(p => x(p.version).toFixed(1) + "," + y(p.rate).toFixed(1)).join(" "),
      fill: "none", stroke: color, "stroke-width": 2}, svg);
    for (const p of pts) {
      const c = el("circle", {cx: x(p.version), cy: y(p.rate), r: 3 + Math.min(p.decided, 10) / 2, fill: color, class: "acc"}, svg);
      el("title", {}, c).textContent = s.name + " v" + p.version + ": " + (p.rate * 100).toFixed(0) + "% of " + p.decided;
      el("text", {x: x(p.version) + 7, y: y(p.rate) - 6, "font-size": 10, fill: color}, svg).textContent = (p.rate * 100).toFixed(0) + "%";
    }
    const sp = document.createElement("span"); sp.style.color = color;
    sp.textContent = "\u25CF " + s.name + " " + (s.acceptance_rate === null ? "-" : (s.acceptance_rate * 100).toFixed(0) + "% overall");
    legend.appendChild(sp);
  });
}

async function refresh() {
  try {
    const r = await fetch("/v1/dashboard/data", {headers: key ? {Authorization: "Bearer " + key} : {}});
    if (!r.ok) throw new Error("HTTP " + r.status);
    const data = await r.json();
    document.getElementById("err").textContent = "";
    const sb = document.querySelector("#sessions tbody"); sb.innerHTML = "";
    for (const s of data.sessions) row(sb, [s.id, s.version, s.steps, s.queue_depth, s.dropped, s.connections, fmt(s.mean_rank), fmt(s.last_loss), s.acceptance_rate === null ? "-" : (s.acceptance_rate * 100).toFixed(0) + "%"], s.name);
    const jb = document.querySelector("#jobs tbody"); jb.innerHTML = "";
    for (const j of data.jobs) row(jb, [j.id, j.name, j.status, j.step + "/" + (j.total_steps ?? "?")], j.name);
    const series = data.sessions.concat(data.jobs);
    if (!series.some(s => s.name === selected)) selected = series.length ? series[0].name : null;
    drawLoss(series);
    drawHeat(series.find(s => s.name === selected));
    drawAcceptance(data.sessions, data.models || []);
    document.body.dataset.loaded = "1";
  } catch (e) { document.getElementById("err").textContent = "cannot load data: " + e.message; }
}
refresh(); setInterval(refresh, 3000);
</script></body></html>
"""
