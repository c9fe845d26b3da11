// Operator page: polls /api/status (only what is new since its last answer) and redraws.
// Charts are uPlot (vendored in static/vendor/uplot, no network needed in the field).
"use strict";

const fmtMs = (s) => (s === null || s === undefined ? "–" : (s * 1000).toFixed(1) + " ms");
const fmtPct = (p) => (p === null || p === undefined ? "–" : p.toFixed(1) + " %");
let zone = { utc_offset_s: 0, name: "UTC" };

// Times in the site's zone (the gateway's), whatever the phone's own setting: "14:03:07".
const fmtTime = (t) => new Date((t + zone.utc_offset_s) * 1000).toISOString().slice(11, 19);
function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fillTable(id, rows, toCells) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows.map((r) => {
    const tr = document.createElement("tr");
    tr.append(...toCells(r));
    return tr;
  }));
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// --- what the page keeps between polls -------------------------------------------------------------------
const state = { cursor: null, frames: [], windows: [] };

function merge(data) {
  if (!data.incremental) {
    state.frames = data.latency;
    state.windows = data.windows;
  } else {
    state.frames = state.frames.concat(data.latency);
    const seen = new Set(state.windows.map((w) => w.start_ts));
    state.windows = state.windows.concat(data.windows.filter((w) => !seen.has(w.start_ts)));
  }
  const oldest = data.now - data.recent_s;
  state.frames = state.frames.filter((f) => f.t >= oldest).sort((a, b) => a.t - b.t);
  state.windows = state.windows.sort((a, b) => a.start_ts - b.start_ts).slice(-30);
  state.cursor = data.cursor;
}

// --- the status strip ------------------------------------------------------------------------------------
function card(n) {
  const c = el("article", `card status-${n.status || "unknown"}`);
  c.dataset.node = n.node_id;
  const head = el("div", "card-head");
  head.append(el("strong", "", n.node_id), el("span", `dot status-${n.status}`, n.status || "never seen"));
  const stage = n.stage === 0 ? "ingest (decodes frames)" : n.stage == null ? "no stage"
    : `stage ${n.stage} · blocks ${n.first_block}–${n.last_block}`;
  const badges = el("div", "badges");
  for (const b of n.badges || []) {
    const span = el("span", `badge badge-${b.kind}`, b.text);
    span.dataset.kind = b.kind;
    badges.append(span);
  }
  const facts = [
    n.queue_depth == null ? null : `queue ${n.queue_depth}/${n.queue_capacity}`,
    n.compute_mean_s == null ? null : `compute ${fmtMs(n.compute_mean_s)}`,
    n.prune_ratio == null ? null : `ratio ${n.prune_ratio.toFixed(1)}`,
    n.seen_s_ago == null ? "never seen" : `seen ${n.seen_s_ago.toFixed(0)} s ago`,
  ].filter(Boolean).join(" · ");
  c.append(head, el("div", "card-stage", stage), badges, el("div", "card-facts", facts));
  return c;
}

function summaryLine(data) {
  const r = data.recent;
  const span = `last ${Math.round(r.span_s / 60)} min`;
  const slo = r.slo_min_s != null && r.slo_max_s !== r.slo_min_s
    ? `SLO ${fmtMs(r.slo_min_s)}–${fmtMs(r.slo_max_s)}` : `SLO ${fmtMs(data.slo_s)}`;
  if (!r.frames) return `${slo} · ${span}: no frames in closed windows yet`;
  return `${span}: ${fmtPct(r.attainment_pct)} within SLO (${r.met}/${r.frames} frames, ${r.windows} windows) · ` +
    `p50 ${fmtMs(r.p50_s)} · p95 ${fmtMs(r.p95_s)} · ${slo}`;
}

// --- charts ----------------------------------------------------------------------------------------------
const charts = {};
const AXIS = { font: "12px system-ui, sans-serif", stroke: "#334", grid: { stroke: "#e3e6e0" }, ticks: { stroke: "#ccd" } };
const NODE_COLOURS = ["#1f5fbf", "#e08a00", "#2e7d32", "#8e24aa", "#00838f", "#6d4c41", "#c2185b", "#455a64"];

function chartWidth(id) {
  return Math.max(200, document.getElementById(id).clientWidth);
}

// uPlot reads the browser's zone; shift so its clock reads the site's.
function siteDate(ts) {
  const d = new Date(ts * 1000);
  return new Date((ts + zone.utc_offset_s) * 1000 + d.getTimezoneOffset() * 60000);
}

function timeAxis() {  // 24-hour site-local clock, as everywhere on the page
  return { ...AXIS, space: 70, values: (u, ticks) => ticks.map((t) => fmtTime(t).slice(0, 5 + 3 * (u.scales.x.max - u.scales.x.min < 600))) };
}

function valueAxis(fmt, size) {
  return { ...AXIS, size: size || 56, values: (u, ticks) => ticks.map(fmt) };
}

// Event labels on rows so none prints over another: each label takes the first row where it fits; a label that
// would run off the right edge is drawn to the left of its mark; one that fits no row is left out (mark only).
function placeLabels(items, width, rows, measure) {
  const ends = new Array(rows).fill(-Infinity);
  const placed = [];
  for (const it of [...items].sort((a, b) => a.x - b.x)) {
    const w = measure(it.text);
    const left = it.x + 3 + w <= width ? it.x + 3 : it.x - 3 - w;
    if (left < 0) continue;
    const row = ends.findIndex((end) => left > end + 4);
    if (row < 0) continue;
    ends[row] = left + w;
    placed.push({ ...it, left, right: left + w, row });
  }
  return placed;
}
window.placeLabels = placeLabels;

function eventLabel(e) {
  if (e.kind === "set") {
    const changed = Object.entries(e.changed || {});
    const verb = { manual: "hold", release: "release", restore: "restore" }[e.policy]
      || (changed.every(([, r]) => r === 0) ? "restore" : "prune");
    return `${verb} ${changed.map(([n, r]) => `${n}→${r}`).join(" ")}`.trim();
  }
  return { held: "no change", replace: "move", infeasible: "infeasible", rate_replan: "re-plan" }[e.kind] || e.kind;
}

let events = [];

function drawMarks(u) {
  const ctx = u.ctx, dpr = devicePixelRatio || 1;
  const [xmin, xmax] = [u.scales.x.min, u.scales.x.max];
  const items = events.filter((e) => e.ts >= xmin && e.ts <= xmax)
    .map((e) => ({ x: u.valToPos(e.ts, "x"), text: eventLabel(e), kind: e.kind }));
  ctx.save();
  ctx.font = `${12 * dpr}px system-ui, sans-serif`;
  const placed = placeLabels(items, u.bbox.width / dpr, 3, (t) => ctx.measureText(t).width / dpr);
  for (const it of items) {
    ctx.strokeStyle = it.kind === "set" ? "#1f5fbf" : "#e08a00";
    ctx.lineWidth = dpr;
    ctx.beginPath();
    ctx.moveTo(u.bbox.left + it.x * dpr, u.bbox.top);
    ctx.lineTo(u.bbox.left + it.x * dpr, u.bbox.top + u.bbox.height);
    ctx.stroke();
  }
  ctx.fillStyle = "#123";
  ctx.textBaseline = "top";
  for (const p of placed) {  // on a light box, so dots behind a label do not garble it
    const x = u.bbox.left + p.left * dpr, y = u.bbox.top + (2 + p.row * 15) * dpr;
    ctx.fillStyle = "rgba(255, 255, 255, 0.85)";
    ctx.fillRect(x - dpr, y - dpr, (p.right - p.left + 2) * dpr, 14 * dpr);
    ctx.fillStyle = "#123";
    ctx.fillText(p.text, x, y);
  }
  ctx.restore();
  u.root.dataset.labels = JSON.stringify(placed.map((p) => [p.left, p.right, p.row]));
}

// Each window as a bar from its start to its end; a bar is never lower than 3 px, so a 0 % window shows as a red
// stub, not as nothing.
function drawBars(u) {
  const ctx = u.ctx, dpr = devicePixelRatio || 1;
  const base = u.valToPos(0, "y", true);
  ctx.save();
  state.windows.forEach((w) => {
    const x0 = u.valToPos(w.start_ts, "x", true), x1 = u.valToPos(w.end_ts, "x", true);
    const top = Math.min(u.valToPos(w.attainment_pct, "y", true), base - 3 * dpr);
    ctx.fillStyle = w.attainment_pct < 95 ? "#c62828" : "#4a7c59";
    ctx.fillRect(x0 + dpr, top, Math.max(x1 - x0 - 2 * dpr, 2 * dpr), base - top);
  });
  ctx.restore();
}

function makeChart(id, opts, data) {
  const host = document.getElementById(id);
  if (charts[id]) {
    charts[id].setData(data);
    if (charts[id].width !== chartWidth(id)) charts[id].setSize({ width: chartWidth(id), height: opts.height });
    return;
  }
  charts[id] = new uPlot({ width: chartWidth(id), tzDate: siteDate, legend: { show: true }, ...opts }, data, host);
}

function sloAt(t, fallback) {
  let slo = fallback;
  for (const w of state.windows) if (w.start_ts <= t) slo = w.slo_s;
  return slo;
}

function drawLatency(data) {
  const xs = state.frames.map((f) => f.t);
  const slo = xs.map((t) => sloAt(t, data.slo_s));
  const ok = state.frames.map((f, i) => (f.e2e_s <= slo[i] ? f.e2e_s : null));
  const late = state.frames.map((f, i) => (f.e2e_s > slo[i] ? f.e2e_s : null));
  events = data.prune_events || [];
  const from = Math.max(data.now - data.recent_s, (data.run && data.run.started_ts) || 0);  // this run's frames
  const dots = (colour) => ({ stroke: colour, fill: colour, paths: () => null, points: { show: true, size: 5, stroke: colour, fill: colour } });
  makeChart("latency-chart", {
    height: 200,
    scales: { x: { time: true, min: from, max: data.now }, y: { range: (u, lo, hi) => [0, Math.max(hi, (data.slo_s || 0) * 1.2) * 1.05] } },
    axes: [timeAxis(), valueAxis((v) => `${Math.round(v * 1000)} ms`, 64)],
    series: [{}, { label: "within SLO", ...dots("#2e7d32") }, { label: "late", ...dots("#c62828") },
      { label: "SLO", stroke: "#c62828", dash: [6, 4], width: 1.5, points: { show: false } }],
    hooks: { draw: [drawMarks] },
  }, [xs, ok, late, slo]);
  charts["latency-chart"].setScale("x", { min: from, max: data.now });
}

function drawWindows() {
  const ws = state.windows;
  makeChart("windows-chart", {
    height: 150,
    scales: { x: { time: true, range: () => (state.windows.length ? [state.windows[0].start_ts, state.windows.at(-1).end_ts] : [0, 1]) }, y: { range: [0, 100] } },
    axes: [timeAxis(), valueAxis((v) => `${v} %`, 60)],
    series: [{}, { label: "attainment", stroke: "#4a7c59", points: { show: false }, paths: () => null,
      value: (u, v) => (v == null ? "–" : `${v.toFixed(1)} %`) }],
    hooks: { draw: [drawBars] },
  }, [ws.map((w) => w.start_ts), ws.map((w) => w.attainment_pct)]);
}

function perNode(field, fmt, id, size) {
  const nodes = [...new Set(state.frames.flatMap((f) => f.hops.map((h) => h[0])))].sort();
  const xs = state.frames.map((f) => f.t);
  const series = nodes.map((n) => state.frames.map((f) => {
    const hop = f.hops.find((h) => h[0] === n);
    return hop ? hop[field] : null;
  }));
  const key = nodes.join(",");
  if (charts[id] && charts[id].nodesKey !== key) {  // another set of nodes: new series
    charts[id].destroy();
    delete charts[id];
  }
  makeChart(id, {
    height: 140,
    scales: { x: { time: true } },
    axes: [timeAxis(), valueAxis(fmt, size)],
    series: [{}, ...nodes.map((n, i) => ({ label: n, stroke: NODE_COLOURS[i % NODE_COLOURS.length], width: 1.5,
      spanGaps: true, points: { show: false }, value: (u, v) => (v == null ? "–" : fmt(v)) }))],
  }, [xs, ...series]);
  charts[id].nodesKey = key;
}

function drawCharts(data) {
  if (typeof uPlot === "undefined") return;
  drawLatency(data);
  drawWindows();
  perNode(1, (v) => `${Math.round(v * 1000)} ms`, "compute-chart", 64);
  perNode(2, (v) => `${Math.round(v * 1000)} ms`, "wait-chart", 64);
  perNode(3, (v) => v.toFixed(1), "ratio-chart", 40);
}

// --- details tables ----------------------------------------------------------------------------------------
function stageCell(n) {
  const stage = n.stage === 0 ? "ingest" : n.stage ?? "–";
  const others = (n.stage_nodes || []).filter((id) => id !== n.node_id);
  return others.length ? `${stage} (replica, with ${others.join(", ")})` : String(stage);
}

function accountingLine(a) {
  if (!a) return "–";
  const reasons = Object.entries(a.failures_by_reason || {}).map(([k, v]) => `${k} ${v}`).join(", ");
  return `accepted ${a.accepted} = stored ${a.rows} + failed ${a.failures}${reasons ? ` (${reasons})` : ""} + ` +
    `in flight ${a.in_flight}` +
    (a.late ? ` · ${a.late} stored late (served after the timely frames)` : "") +
    (a.duplicates ? ` · ${a.duplicates} served twice (the first result kept)` : "") +
    (a.implausible_capture_ts ? ` · ${a.implausible_capture_ts} with an implausible capture time (timed from arrival)` : "");
}

function show(v) {
  return v === null || v === undefined ? "–" : typeof v === "object" ? JSON.stringify(v) : String(v);
}

function renderDetails(data) {
  const slowdowns = (data.controller && data.controller.slowdowns) || {};
  fillTable("nodes", data.nodes, (n) => [
    cell(n.clock_suspect ? `${n.node_id} ⏱ clock ${fmtMs(n.clock_offset_s)} off` : n.node_id,
      n.clock_suspect ? "clock-suspect" : ""),
    cell(n.status || "?", `status-${n.status}`), cell(stageCell(n)),
    cell(n.stage ? `${n.first_block}–${n.last_block}` : "–"),
    cell(n.seen_s_ago === null ? "never" : `${n.seen_s_ago.toFixed(0)} s ago`),
    cell(n.queue_depth === null ? "–" : `${n.queue_depth}/${n.queue_capacity}`, "num"),
    cell(`${fmtMs(n.compute_mean_s)} / ${fmtMs(n.compute_p95_s)}`, "num"),
    cell(fmtMs(n.decode_mean_s), "num"),
    cell(n.cpu_percent === null ? "–" : `${n.cpu_percent.toFixed(0)} %`, "num"),
    cell(`${n.desired_ratio == null ? "–" : n.desired_ratio.toFixed(1)} / ` +
         `${n.prune_ratio == null ? "–" : n.prune_ratio.toFixed(1)}`, "num ratio"),
    cell(slowdowns[n.node_id] ? `${slowdowns[n.node_id].toFixed(1)}×` : "–", "num"),
    cell(n.processed ?? "–", "num"), cell(n.dropped ?? "–", "num"),
    cell(Object.entries(n.errors || {}).map(([k, v]) => `${k}: ${v}`).join(", ") || "none"),
  ]);
  fillTable("events", data.prune_events, (e) => [
    cell(fmtTime(e.ts)), cell(e.kind), cell(e.policy),
    cell(Object.entries(e.changed || {}).map(([k, v]) => `${k} → ${v.toFixed(1)}`).join(", ") || "–"),
    cell(fmtMs(e.predicted_bottleneck_s), "num"), cell(fmtPct(e.predicted_accuracy * 100), "num"),
    cell(fmtMs(e.observed_p50_s), "num"), cell(e.reason),
  ]);
  fillTable("window-table", state.windows.slice(-8).reverse(), (w) => [
    cell(fmtTime(w.start_ts)), cell(w.count, "num"), cell(fmtPct(w.attainment_pct), "num"),
    cell(fmtMs(w.p50_s), "num"), cell(fmtMs(w.p95_s), "num"), cell(fmtMs(w.p99_s), "num"),
  ]);
  fillTable("actions", data.operator_actions || [], (a) => [
    cell(fmtTime(a.ts)), cell(a.by), cell(a.action), cell(a.target), cell(`${show(a.old)} → ${show(a.new)}`),
  ]);
  const iso = (t) => (t == null ? "–" : new Date(t * 1000).toISOString().slice(0, 16).replace("T", " "));
  fillTable("cameras", data.cameras || [], (c) => [
    cell(c.camera_id), cell(c.location_name), cell(c.latitude, "num"), cell(c.longitude, "num"),
    cell(iso(c.start_ts)), cell(iso(c.end_ts)),
  ]);
  document.getElementById("accounting").textContent = accountingLine(data.accounting);
  fillTable("errors", data.errors, (e) => [
    cell(fmtTime(e.ts)), cell(e.component), cell(e.kind), cell(e.topic), cell(e.message),
  ]);
}

function render(data) {
  zone = data.zone || zone;
  merge(data);
  document.getElementById("zone").textContent = `times: site local, ${zone.offset}` +
    " (exports and the camera form: UTC)";
  document.getElementById("summary").textContent = summaryLine(data);
  const clock = data.clock || { suspect_nodes: [] };
  const clockWarning = document.getElementById("clock-warning");
  clockWarning.hidden = clock.suspect_nodes.length === 0;
  clockWarning.textContent = clock.suspect_nodes.length === 0 ? "" :
    `latencies unreliable: the clock of ${clock.suspect_nodes.join(", ")} is more than ` +
    `${fmtMs(clock.max_offset_s)} off the gateway's (run edgeprune doctor on it)`;
  if (clock.suspect_nodes.length) document.getElementById("summary").textContent += " · ⏱ latencies marked unreliable";
  document.getElementById("controller-words").textContent = data.controller_words;
  document.getElementById("pipeline").textContent = data.placement_words;
  document.getElementById("cards").replaceChildren(...data.nodes.map(card));
  if (document.body.dataset.operator) renderControls(data);
  renderDetails(data);
  drawCharts(data);
}

// --- controls --------------------------------------------------------------------------------------------
const csrf = () => document.querySelector('meta[name="csrf-token"]').content;
let controlsKey = "";

function commandForm(id, fields, inner) {
  const form = document.createElement("form");
  form.className = "command row";
  form.id = id;
  for (const [k, v] of Object.entries(fields)) {
    const input = document.createElement("input");
    Object.assign(input, { type: "hidden", name: k, value: v });
    form.append(input);
  }
  form.insertAdjacentHTML("beforeend", inner);
  return form;
}

function renderControls(data) {
  const ctl = data.controller || {};
  const settings = ctl.settings || {};
  for (const e of document.querySelectorAll("[data-setting-now]")) {
    e.textContent = show(settings[e.dataset.settingNow]);
  }
  const ladder = ctl.ladder || [];
  const ids = data.nodes.map((n) => n.node_id);
  const key = JSON.stringify([ids, ladder]);
  if (key === controlsKey) return;  // rebuilding would drop what the operator is choosing
  controlsKey = key;
  const demo = Boolean(document.body.dataset.demo);
  const options = ladder.map((r) => `<option value="${r}">${r.toFixed(1)}</option>`).join("");
  fillTable("node-controls", ids, (node) => {
    const hold = commandForm(`hold-${node}`, { cmd: "prune", node_id: node },
      `<select name="ratio" aria-label="ratio for ${node}">${options}</select><button type="submit">Hold</button>`);
    const release = commandForm(`release-${node}`, { cmd: "prune", node_id: node, ratio: "release" },
      `<button type="submit">Release</button>`);
    const retire = commandForm(`retire-${node}`, { cmd: "retire", node_id: node },
      `<button type="submit" class="danger">Retire</button>`);
    const tds = [cell(node), cell("")];
    tds[1].append(hold, release);
    if (demo) {  // the demo's emulated slowdown: no use on a real site
      const slow = commandForm(`slowdown-${node}`, { cmd: "node_slowdown", node_id: node },
        `<input name="factor" value="1" size="4" inputmode="decimal" aria-label="slowdown factor"><button>×</button>`);
      tds.push(cell(""));
      tds[2].append(slow);
    }
    tds.push(cell(""));
    tds[tds.length - 1].append(retire);
    return tds;
  });
}

document.addEventListener("submit", async (event) => {
  const form = event.target;
  if (!form.classList.contains("command")) return;
  event.preventDefault();
  if (form.id.startsWith("retire-") && !confirm(`Retire ${form.node_id.value} for good?`)) return;
  const body = Object.fromEntries(new FormData(form).entries());
  delete body.csrf_token;
  const result = document.getElementById("command-result");
  result.className = "result pending";
  result.textContent = "sent; waiting for the gateway…";
  try {
    const res = await fetch("/api/command", {
      method: "POST", headers: { "Content-Type": "application/json", "X-CSRFToken": csrf() },
      body: JSON.stringify(body), credentials: "same-origin",
    });
    const answer = await res.json();
    result.className = answer.ok ? "result ok" : "result error";
    result.textContent = answer.ok ? `accepted: ${answer.message}` : `refused: ${answer.message || answer.error}`;
  } catch (err) {
    result.className = "result error";
    result.textContent = `could not send: ${err.message}`;
  }
  refresh();
});

let polling = null;

// One poll at a time: two answers to one cursor would add the same frames twice.
function refresh() {
  polling = (polling || Promise.resolve()).then(poll);
  return polling;
}

async function poll() {
  try {
    const res = await fetch(state.cursor ? `/api/status?since=${state.cursor}` : "/api/status");
    const data = await res.json();
    if (!res.ok) throw new Error(data.error || res.statusText);
    render(data);
  } catch (err) {
    document.getElementById("summary").textContent = `waiting for data: ${err.message}`;
  }
}

window.addEventListener("resize", () => {
  for (const [id, chart] of Object.entries(charts)) chart.setSize({ width: chartWidth(id), height: chart.height });
});
refresh();
setInterval(refresh, Number(document.body.dataset.refreshMs) || 2000);
