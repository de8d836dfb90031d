"""``/dashboard``: one self-contained page (no CDN, no external script; the machine may be offline).

The page itself is public: it holds no data. It polls ``/v1/dashboard/data``
(behind the API key when keys are set) and draws with plain JS and inline SVG:
a summary of sessions and fine-tuning jobs (the counts ``/metrics`` exports),
sessions and jobs as tables, loss over wall-clock time per adapter, the rank of
every adapted module as a layer x projection grid for the selected adapter (with
a slider over its versions), and the completion acceptance rate per adapter
version (base model and repository adapters as dashed reference lines).

With API keys on, the page asks for a key when the data answers 401 and keeps
it in the tab's ``sessionStorage`` (never ``localStorage``), sending it as
``Authorization: Bearer KEY``. ``/dashboard#key=KEY`` logs in without typing:
the page moves the key into ``sessionStorage`` and removes it from the URL.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from server.app.deps import AUTH, Owner, ServicesDep
from server.observability.metrics import job_counts, session_counts

MAX_POINTS = 300


def dashboard_data(ctx, owner) -> dict:
    """Everything the page draws, for the caller's key only."""
    own_sessions = ctx.sessions.sessions(owner)
    sessions = []
    for s in own_sessions:
        d = s.describe()
        with s.lock:
            history = list(s.history)[-MAX_POINTS:]
            ranks = dict(s.snapshot.ranks)
        fb = s.feedback.stats()
        sessions.append({"id": s.id, "name": s.adapter_name, "version": d["version"], "steps": d["steps"],
                         "acceptance_rate": fb["acceptance_rate"], "acceptance": _acceptance(fb),
                         "queue_depth": d["queue_depth"], "dropped": d["dropped"], "connections": d["connections"],
                         "mean_rank": d["mean_rank"], "last_loss": d["last_loss"],
                         "modules": list(ranks), "ranks": list(ranks.values()),
                         "history": [{"t": h["t"], "version": h["version"], "loss": h["loss"], "ranks": h["ranks"]}
                                     for h in history]})
    own_jobs = ctx.jobs.list(owner)
    jobs = []
    for job in own_jobs[:20]:
        rec = job.public()
        # Job events carry whole-second timestamps (OpenAI's shape): steps within one second share an x.
        points = [(e["created_at"], e["data"]) for e in job.events if e.get("data")][-MAX_POINTS:]
        jobs.append({"id": rec["id"], "name": rec["adapter_name"], "status": rec["status"], "step": rec["step"],
                     "total_steps": rec["total_steps"], "created_at": rec["created_at"], "modules": _job_modules(job),
                     "history": [{"t": t, "version": p["step"], "loss": p["loss"], "ranks": p["ranks"]}
                                 for t, p in points]})
    models = [{"name": m, "acceptance_rate": st["acceptance_rate"], "decided": _decided(st)}
              for m, st in ctx.feedback.model_stats(owner).items()]
    summary = {"sessions": session_counts(own_sessions), "jobs": job_counts(own_jobs)}
    return {"summary": summary, "sessions": sessions, "jobs": jobs, "models": models}


def _job_modules(job) -> list[str]:
    """Module names in the order of the job's rank lists (the adapter while it trains, then the result)."""
    with job.lock:
        if job.adapter is not None:
            return list(job.adapter.ranks)
        return list((job.record.get("result") or {}).get("ranks") or {})


def _decided(row: dict) -> int:
    return row["accepted"] + row["partially_accepted"] + row["rejected"]


def _acceptance(stats: dict) -> list[dict]:
    """Points (adapter version, rate, decided) for versions with at least one decision."""
    return [{"version": r["adapter_version"], "rate": r["acceptance_rate"], "decided": _decided(r)}
            for r in stats["by_version"] if r["acceptance_rate"] is not None and r["adapter_version"] is not None]


router = APIRouter(tags=["dashboard"])


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard():
    # Public on purpose: the page is static; the data route below checks the key.
    return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})


@router.get("/v1/dashboard/data", dependencies=AUTH)
def data(services: ServicesDep, owner: Owner):
    return dashboard_data(services, owner)


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dynarank dashboard</title>
<meta name="referrer" content="no-referrer">
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;max-width:780px}
h1{font-size:1.3em}h2{font-size:1.05em;margin-top:1.6em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
tr.sel{background:#eef}tr[data-name]{cursor:pointer}
code{background:#f3f3f3;padding:0 3px}
svg{font-size:11px;fill:#333}  /* inherited, so a text's own fill/font-size attributes win */
#err,.bad{color:#b00}.legend span{margin-right:1em}.empty{color:#666;font-style:italic}
#login{border:1px solid #ccc;padding:1em;max-width:32em;background:#fafafa}
#login input{width:20em}#keybar{color:#555}#summary{line-height:1.6}
</style></head><body data-state="loading">
<h1>dynarank</h1>
<div id="login" hidden>
  <form id="loginform">
    <p id="loginmsg"></p>
    <label>API key <input id="keyinput" type="password" autocomplete="off" required></label>
    <button type="submit">Log in</button>
  </form>
  <p class="empty">The key stays in this browser tab only (sessionStorage) and goes out as
  <code>Authorization: Bearer</code>; closing the tab forgets it.</p>
</div>
<div id="err"></div>
<div id="main" hidden>
<p id="keybar" hidden>Using an API key kept in this tab. <button id="forget" type="button">Forget key</button></p>
<p id="summary"></p>
<h2>Sessions</h2><table id="sessions"><thead><tr><th>session</th><th>version</th><th>steps</th>
<th>queue</th><th>dropped</th><th>tabs</th><th>mean rank</th><th>loss</th><th>accepted</th></tr></thead><tbody></tbody></table>
<h2>Fine-tuning jobs</h2><table id="jobs"><thead><tr><th>job</th><th>adapter</th><th>status</th>
<th>step</th></tr></thead><tbody></tbody></table>
<h2>Loss over time</h2><p class="empty" id="loss-empty" hidden></p>
<svg id="loss" width="740" height="270"></svg><div class="legend" id="legend"></div>
<h2>Rank per module: <span id="heatname">-</span></h2><p class="empty" id="heat-empty" hidden></p>
<div id="heatbox"><label>version <input id="heatstep" type="range" min="0" max="0" value="0"></label>
<span id="heatwhen"></span><br><svg id="heat" width="740" height="260"></svg></div>
<h2>Completion acceptance rate by adapter version</h2><p class="empty" id="accept-empty" hidden></p>
<svg id="accept" width="740" height="280"></svg><div class="legend" id="acclegend"></div>
</div>
<script>
"use strict";
const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#1f77b4","#d62728","#2ca02c","#ff7f0e","#9467bd","#8c564b","#e377c2","#17becf"];
const KEY_ITEM = "dynarank.apiKey";
const PROJ_ORDER = ["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"];
const EMPTY = {  // one sentence each on how to get data (static text, so innerHTML is safe)
  sessions: "No sessions yet: open a file in VS Code with the dynarank extension, or run <code>dynarank-client watch</code> in a repository.",
  jobs: "No fine-tuning jobs yet: run <code>dynarank-client finetune</code> in a repository (or POST <code>/v1/fine_tuning/jobs</code>).",
  loss: "No loss yet: a session trains once you edit a file and pause; a fine-tuning job plots its loss while it runs.",
  heat: "No adapter yet: its ranks appear here once a session or a fine-tuning job exists.",
  accept: "No feedback yet: accept or reject completions in the editor (or <code>dynarank-client complete FILE:LINE:COL --accept</code>).",
};
let selected = null, heatFollow = true, timer = null, lastData = null, forgotten = false;
let colorOf = () => COLORS[0];  // adapter name -> colour, the same in every chart (set per render)

// /dashboard#key=KEY: keep the key in this tab and take it off the URL (history, bookmarks, screen shares).
const fragmentKey = new URLSearchParams(location.hash.slice(1)).get("key");
if (fragmentKey) {
  sessionStorage.setItem(KEY_ITEM, fragmentKey);
  history.replaceState(null, "", location.pathname + location.search);
}

function el(tag, attrs, parent, text) {
  const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  if (parent) parent.appendChild(e);
  return e;
}
function $(id) { return document.getElementById(id); }
function pad(n) { return String(n).padStart(2, "0"); }
function clock(t) { const d = new Date(t * 1000); return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds()); }
function fmt(x) { return x === null || x === undefined ? "-" : (typeof x === "number" ? +x.toFixed(4) : x); }
function pct(r) { return r === null || r === undefined ? "-" : (r * 100).toFixed(0) + "%"; }
// Ticks at whole multiples of a readable step (1 s .. 1 day), at most about 6.
const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];
function timeTicks(t0, t1) {
  const step = TIME_STEPS.find(s => (t1 - t0) / s <= 6) || 86400 * Math.ceil((t1 - t0) / 86400 / 6);
  const out = []; for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) out.push(t);
  return out;
}
function ticks(lo, hi, n) { const out = []; for (let i = 0; i <= n; i++) out.push(lo + (hi - lo) * i / n); return out; }
// Enough decimals that n+1 evenly spaced ticks over [lo, hi] read differently.
function tickDigits(lo, hi, n) { return Math.min(6, Math.max(0, Math.ceil(-Math.log10((hi - lo) / n)))); }

function row(tbody, cells, name) {
  const tr = document.createElement("tr");
  for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
  if (name) { tr.dataset.name = name; tr.onclick = () => { selected = name; heatFollow = true; render(); }; if (name === selected) tr.className = "sel"; }
  tbody.appendChild(tr);
}
function emptyRow(tbody, cols, html) {
  const tr = document.createElement("tr"), td = document.createElement("td");
  td.colSpan = cols; td.className = "empty"; td.innerHTML = html; tr.appendChild(td); tbody.appendChild(tr);
}
// Show the chart, or hide it and show its one-sentence empty state.
function showEmpty(name, isEmpty) {
  const p = $(name + "-empty"); p.hidden = !isEmpty; p.innerHTML = isEmpty ? EMPTY[name] : "";
  $(name === "heat" ? "heatbox" : name).style.display = isEmpty ? "none" : "";
  return isEmpty;
}

// Frame, grid, tick labels and axis titles of a plot area {L, T, W, H} (W, H: the area's size).
function axes(svg, box, xt, yt, xTitle, yTitle) {
  const {L, T, W, H} = box;
  for (const t of yt) {
    el("line", {x1: L, x2: L + W, y1: t.y, y2: t.y, stroke: "#eee"}, svg);
    el("text", {x: L - 6, y: t.y + 4, "text-anchor": "end"}, svg, t.label);
  }
  for (const t of xt) {
    el("line", {x1: t.x, x2: t.x, y1: T + H, y2: T + H + 4, stroke: "#999"}, svg);
    el("text", {x: t.x, y: T + H + 16, "text-anchor": "middle"}, svg, t.label);
  }
  el("rect", {x: L, y: T, width: W, height: H, fill: "none", stroke: "#999"}, svg);
  el("text", {x: L + W / 2, y: T + H + 34, "text-anchor": "middle", class: "axis"}, svg, xTitle);
  el("text", {x: 0, y: 0, "text-anchor": "middle", class: "axis",
    transform: "translate(12," + (T + H / 2) + ") rotate(-90)"}, svg, yTitle);
}

function drawLoss(series) {
  const svg = $("loss"); svg.innerHTML = "";
  const legend = $("legend"); legend.innerHTML = "";
  const pts = series.flatMap(s => s.history.filter(h => Number.isFinite(h.loss)));
  if (showEmpty("loss", !pts.length)) return;
  const box = {L: 64, T: 12, W: 740 - 64 - 24, H: 270 - 12 - 44};
  let t0 = Math.min(...pts.map(p => p.t)), t1 = Math.max(...pts.map(p => p.t));
  if (t1 - t0 < 1) { t0 -= 1; t1 += 1; }  // one instant: widen so the point sits mid-axis
  let lo = Math.min(...pts.map(p => p.loss)), hi = Math.max(...pts.map(p => p.loss));
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const margin = (hi - lo) * 0.05; lo -= margin; hi += margin;  // keep lines off the frame
  const x = t => box.L + (t - t0) / (t1 - t0) * box.W, y = v => box.T + (hi - v) / (hi - lo) * box.H;
  // Wall-clock ticks; past a day they name the date too.
  const days = t1 - t0 > 86400;
  const tlabel = t => days ? new Date(t * 1000).toLocaleDateString() + " " + clock(t).slice(0, 5) : clock(t);
  axes(svg, box, timeTicks(t0, t1).map(t => ({x: x(t), label: tlabel(t)})),
       ticks(lo, hi, 4).map(v => ({y: y(v), label: v.toFixed(tickDigits(lo, hi, 4))})),
       "time (" + (days ? "date HH:MM" : "HH:MM:SS") + ", this browser's clock)", "loss");
  series.forEach(s => {
    const h = s.history.filter(p => Number.isFinite(p.loss)); if (!h.length) return;
    const color = colorOf(s.name);
    el("polyline", {points: h.map(p => x(p.t).toFixed(1) + "," + y(p.loss).toFixed(1)).join(" "),
      fill: "none", stroke: color, "stroke-width": 1.5, "data-name": s.name}, svg);
    const last = h[h.length - 1], dot = el("circle", {cx: x(last.t), cy: y(last.loss), r: 3, fill: color}, svg);
    el("title", {}, dot, s.name + " v" + last.version + " at " + clock(last.t) + ": loss " + last.loss.toFixed(4));
    const sp = document.createElement("span"); sp.style.color = color; sp.textContent = "\u25A0 " + s.name; legend.appendChild(sp);
  });
}

// "model.layers.3.self_attn.q_proj" -> {layer: "3", proj: "q_proj"}; names without a layer go to column "-".
function splitModule(name) {
  const m = /\.layers\.(\d+)\./.exec(name);
  return {layer: m ? m[1] : "-", proj: name.split(".").pop()};
}

function drawHeat(s, all) {
  const svg = $("heat"); svg.innerHTML = "";
  $("heatname").textContent = s ? s.name : "-";
  const frames = !s ? [] : s.history.length ? s.history : (s.ranks && s.ranks.length ? [{version: s.version, ranks: s.ranks, t: null}] : []);
  if (showEmpty("heat", !frames.length)) return;
  const slider = $("heatstep");
  slider.max = frames.length - 1; slider.disabled = frames.length < 2;
  if (heatFollow) slider.value = frames.length - 1;
  const frame = frames[Math.min(+slider.value, frames.length - 1)];
  $("heatwhen").textContent = "v" + frame.version + (frame.t ? " at " + clock(frame.t) : "") + (heatFollow ? " (latest)" : "");
  // A job's rank lists may come without names: borrow them from any adapter of the same shape (same base model).
  const names = (s.modules && s.modules.length === frame.ranks.length) ? s.modules
    : ((all.find(o => o.modules && o.modules.length === frame.ranks.length) || {}).modules || frame.ranks.map((_, i) => "module " + i));
  const parts = names.map(splitModule);
  const layers = [...new Set(parts.map(p => p.layer))].sort((a, b) => (a === "-") - (b === "-") || a - b);
  const projs = [...new Set(parts.map(p => p.proj))].sort((a, b) => {
    const ia = PROJ_ORDER.indexOf(a), ib = PROJ_ORDER.indexOf(b);
    return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || a.localeCompare(b);
  });
  const allRanks = frames.flatMap(f => f.ranks), lo = Math.min(...allRanks), hi = Math.max(...allRanks);
  const L = 84, T = 10, cw = Math.min(40, (740 - L - 16) / layers.length), ch = 22;
  const H = projs.length * ch, W = layers.length * cw;
  svg.setAttribute("height", T + H + 80);
  const xt = layers.map((l, i) => ({x: L + (i + 0.5) * cw, label: l})).filter((_, i) => layers.length <= 32 || i % 2 === 0);
  const yt = projs.map((p, j) => ({y: T + (j + 0.5) * ch, label: p}));
  axes(svg, {L, T, W, H}, xt, yt, "layer", "projection");
  const shade = r => 92 - 62 * ((r - lo) / ((hi - lo) || 1));
  names.forEach((name, m) => {
    const p = parts[m], r = frame.ranks[m], cx = L + layers.indexOf(p.layer) * cw, cy = T + projs.indexOf(p.proj) * ch;
    const c = el("rect", {x: cx, y: cy, width: cw, height: ch, fill: "hsl(220,70%," + shade(r).toFixed(0) + "%)",
      stroke: "#fff", class: "cell"}, svg);
    el("title", {}, c, name + ": rank " + r + " (v" + frame.version + ")");
    if (cw >= 16) el("text", {x: cx + cw / 2, y: cy + ch / 2 + 4, "text-anchor": "middle", "font-size": 10,
      fill: shade(r) < 55 ? "#fff" : "#222", "pointer-events": "none"}, svg, r);
  });
  // Colour scale: light = lowest rank, dark = highest, over all versions shown.
  const gy = T + H + 48;
  el("text", {x: L, y: gy + 11}, svg, "rank " + lo);
  for (let i = 0; i < 10; i++) el("rect", {x: L + 50 + i * 14, y: gy, width: 14, height: 12,
    fill: "hsl(220,70%," + (92 - 62 * i / 9).toFixed(0) + "%)"}, svg);
  el("text", {x: L + 50 + 146, y: gy + 11}, svg, "rank " + hi);
}

function drawAcceptance(sessions, models) {
  const svg = $("accept"); svg.innerHTML = "";
  const legend = $("acclegend"); legend.innerHTML = "";
  const withData = sessions.filter(s => s.acceptance && s.acceptance.length);
  const refs = models.filter(m => m.acceptance_rate !== null);
  if (showEmpty("accept", !withData.length && !refs.length)) return;
  // Top margin leaves room for the "100%" label of a point at the top.
  const box = {L: 64, T: 24, W: 740 - 64 - 40, H: 280 - 24 - 44};
  const versions = withData.flatMap(s => s.acceptance.map(p => p.version));
  const vlo = versions.length ? Math.min(...versions) : 0, vhi = versions.length ? Math.max(...versions) : 1;
  const x = v => box.L + 14 + (v - vlo) / ((vhi - vlo) || 1) * (box.W - 28), y = r => box.T + (1 - r) * box.H;
  const vs = [...new Set(versions)].sort((a, b) => a - b);
  axes(svg, box, vs.filter((_, i) => vs.length <= 20 || i % Math.ceil(vs.length / 20) === 0).map(v => ({x: x(v), label: "v" + v})),
       [0, 0.25, 0.5, 0.75, 1].map(r => ({y: y(r), label: (r * 100) + "%"})), "adapter version", "acceptance rate");
  refs.forEach(m => {
    const color = colorOf(m.name);
    el("line", {x1: box.L, x2: box.L + box.W, y1: y(m.acceptance_rate), y2: y(m.acceptance_rate), stroke: color,
      "stroke-dasharray": "6 4", "stroke-width": 1.5}, svg);
    const sp = document.createElement("span"); sp.style.color = color;
    sp.textContent = "- - " + m.name + " " + pct(m.acceptance_rate) + " (" + m.decided + ")"; legend.appendChild(sp);
  });
  withData.forEach(s => {
    const color = colorOf(s.name), pts = s.acceptance;
    el("polyline", {points: pts.map(p => x(p.version).toFixed(1) + "," + y(p.rate).toFixed(1)).join(" "),
      fill: "none", stroke: color, "stroke-width": 2}, svg);
    for (const p of pts) {
      const c = el("circle", {cx: x(p.version), cy: y(p.rate), r: 3 + Math.min(p.decided, 10) / 2, fill: color, class: "acc"}, svg);
      el("title", {}, c, s.name + " v" + p.version + ": " + pct(p.rate) + " of " + p.decided);
      el("text", {x: x(p.version) + 7, y: y(p.rate) - 6, "font-size": 10, fill: color}, svg, pct(p.rate));
    }
    const sp = document.createElement("span"); sp.style.color = color;
    sp.textContent = "\u25CF " + s.name + " " + (s.acceptance_rate === null ? "-" : pct(s.acceptance_rate) + " overall");
    legend.appendChild(sp);
  });
}

function drawSummary(summary) {
  const s = summary.sessions, j = summary.jobs;
  const states = Object.keys(j).filter(k => k !== "validating_files" || j[k]);
  $("summary").textContent = "Sessions: " + s.resident + " resident, " + s.connected + " connected. " +
    "Fine-tuning jobs: " + states.map(k => j[k] + " " + k.replace("_", " ")).join(", ") + ".";
}

function render() {
  const data = lastData; if (!data) return;
  drawSummary(data.summary);
  const sb = document.querySelector("#sessions tbody"); sb.innerHTML = "";
  for (const s of data.sessions) row(sb, [s.id, s.version, s.steps, s.queue_depth, s.dropped, s.connections, fmt(s.mean_rank), fmt(s.last_loss), pct(s.acceptance_rate)], s.name);
  if (!data.sessions.length) emptyRow(sb, 9, EMPTY.sessions);
  const jb = document.querySelector("#jobs tbody"); jb.innerHTML = "";
  for (const j of data.jobs) row(jb, [j.id, j.name, j.status, j.step + "/" + (j.total_steps ?? "?")], j.name);
  if (!data.jobs.length) emptyRow(jb, 4, EMPTY.jobs);
  const series = data.sessions.concat(data.jobs);
  const names = series.map(s => s.name).concat((data.models || []).map(m => m.name));
  colorOf = name => COLORS[names.indexOf(name) % COLORS.length];
  // Default to the first adapter that has trained: its heatmap has versions to show.
  if (!series.some(s => s.name === selected)) selected = (series.find(s => s.history.length) || series[0] || {}).name ?? null;
  drawLoss(series);
  drawHeat(series.find(s => s.name === selected), series);
  drawAcceptance(data.sessions, data.models || []);
}

function showLogin(message, bad) {
  $("main").hidden = true; $("login").hidden = false;
  $("loginmsg").textContent = message; $("loginmsg").className = bad ? "bad" : "";
  $("err").textContent = ""; document.body.dataset.state = bad ? "badkey" : "login";
  $("keyinput").focus();
}

async function refresh() {
  clearTimeout(timer);
  const key = sessionStorage.getItem(KEY_ITEM);
  let r;
  try {
    r = await fetch("/v1/dashboard/data", {headers: key ? {Authorization: "Bearer " + key} : {}, cache: "no-store"});
  } catch (e) { $("err").textContent = "cannot reach the server: " + e.message; timer = setTimeout(refresh, 3000); return; }
  if (r.status === 401) {
    let why = ""; try { why = (await r.json()).error.message.replace(/\.$/, ""); } catch (e) { /* not our JSON */ }
    if (key) {
      sessionStorage.removeItem(KEY_ITEM);
      showLogin("Wrong API key: the server refused it" + (why ? " (" + why + ")" : "") + ". Check the key and try again.", true);
    } else {
      showLogin(forgotten ? "Key forgotten. Enter an API key to see the dashboard again."
        : "This server needs an API key (it was started with --api-key or --api-key-file). Enter one of its keys:");
    }
    return;  // no polling until a key is entered
  }
  if (!r.ok) { $("err").textContent = "cannot load data: HTTP " + r.status; timer = setTimeout(refresh, 3000); return; }
  lastData = await r.json();
  $("err").textContent = ""; $("login").hidden = true; $("main").hidden = false;
  $("keybar").hidden = !key;
  render();
  document.body.dataset.state = "ok"; document.body.dataset.loaded = "1";
  timer = setTimeout(refresh, 3000);
}

$("loginform").onsubmit = ev => {
  ev.preventDefault();
  const k = $("keyinput").value.trim(); if (!k) return;
  sessionStorage.setItem(KEY_ITEM, k); $("keyinput").value = ""; forgotten = false;
  refresh();
};
$("forget").onclick = () => {
  sessionStorage.removeItem(KEY_ITEM); forgotten = true; lastData = null;
  refresh();
};
$("heatstep").oninput = () => { heatFollow = +$("heatstep").value === +$("heatstep").max; render(); };
refresh();
</script></body></html>
"""
