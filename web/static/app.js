// Operator page: polls /api/status and redraws. No external libraries (works offline in the field).
"use strict";

const NS = "http://www.w3.org/2000/svg";
const fmtMs = (s) => (s === null || s === undefined ? "–" : (s * 1000).toFixed(1) + " ms");
const fmtPct = (p) => (p === null || p === undefined ? "–" : p.toFixed(1) + " %");
const fmtTime = (t) => new Date(t * 1000).toLocaleTimeString();

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

function svgEl(tag, attrs, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function drawLatency(points, slo, now, span) {
  const svg = document.getElementById("latency");
  const W = 800, H = 220, L = 50, B = 20;
  const top = Math.max(slo || 0, ...points.map((p) => p.e2e_s)) * 1.15 || 1;
  const x = (t) => L + ((t - (now - span)) / span) * (W - L - 5);
  const y = (v) => H - B - (v / top) * (H - B - 10);
  const kids = [];
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    kids.push(svgEl("text", { x: 2, y: y(v) + 4, class: "axis" }, fmtMs(v)));
  }
  kids.push(svgEl("text", { x: L, y: H - 4, class: "axis" }, `last ${Math.round(span / 60)} min`));
  if (slo) kids.push(svgEl("line", { x1: L, x2: W, y1: y(slo), y2: y(slo), class: "slo-line" }));
  for (const p of points) {
    kids.push(svgEl("circle", { cx: x(p.t), cy: y(p.e2e_s), r: 2.5,
      class: slo && p.e2e_s > slo ? "dot-late" : "dot-ok" }));
  }
  svg.replaceChildren(...kids);
}

function drawWindows(windows) {
  const svg = document.getElementById("windows");
  const W = 800, H = 140, L = 50, B = 18;
  const n = Math.max(windows.length, 30);  // fixed slots: one window never fills the chart
  const bw = (W - L) / n;
  const kids = [svgEl("text", { x: 2, y: 14, class: "axis" }, "100 %"),
                svgEl("text", { x: 2, y: H - B, class: "axis" }, "0 %")];
  windows.forEach((w, i) => {
    const h = (w.attainment_pct / 100) * (H - B - 8);
    kids.push(svgEl("rect", { x: L + i * bw + 1, y: H - B - h, width: Math.max(bw - 2, 1), height: h,
      class: w.attainment_pct < 95 ? "bar-bad bar" : "bar" }));
  });
  svg.replaceChildren(...kids);
}

function accountingLine(a) {
  if (!a) return "–";
  const reasons = Object.entries(a.failures_by_reason || {}).map(([k, v]) => `${k} ${v}`).join(", ");
  return `accepted ${a.accepted} = stored ${a.rows} + failed ${a.failures}${reasons ? ` (${reasons})` : ""} + ` +
    `in flight ${a.in_flight}` +
    (a.implausible_capture_ts ? ` · ${a.implausible_capture_ts} with an implausible capture time (timed from arrival)` : "");
}

function render(data) {
  document.getElementById("accounting").textContent = accountingLine(data.accounting);
  const t = data.totals;
  document.getElementById("summary").textContent = t && t.results
    ? `SLO ${fmtMs(data.slo_s)} · ${t.results} frames · attainment ${fmtPct(t.attainment_pct)} · ` +
      `p50 ${fmtMs(t.p50_s)} · p95 ${fmtMs(t.p95_s)}`
    : `SLO ${fmtMs(data.slo_s)} · no frames yet`;
  const ctl = data.controller;
  const slowdowns = (ctl && ctl.slowdowns) || {};
  document.getElementById("controller").textContent = !ctl ? "no status yet"
    : ctl.enabled
      ? `running · policy ${ctl.policy} · stage budget ${fmtMs(ctl.budget_s)} · ` +
        `accuracy floor ${fmtPct(ctl.accuracy_floor * 100)}`
      : `off: ${ctl.reason}`;
  fillTable("events", data.prune_events, (e) => [
    cell(fmtTime(e.ts)), cell(e.kind), cell(e.policy),
    cell(Object.entries(e.changed || {}).map(([k, v]) => `${k} → ${v.toFixed(1)}`).join(", ") || "–"),
    cell(fmtMs(e.predicted_bottleneck_s), "num"), cell(fmtPct(e.predicted_accuracy * 100), "num"),
    cell(fmtMs(e.observed_p50_s), "num"), cell(e.reason),
  ]);
  fillTable("nodes", data.nodes, (n) => [
    cell(n.node_id), cell(n.status || "?", `status-${n.status}`), cell(n.stage ?? "–"),
    cell(n.stage ? `${n.first_block}–${n.last_block}` : "–"),
    cell(n.seen_s_ago === null ? "never" : `${n.seen_s_ago.toFixed(0)} s ago`),
    cell(n.queue_depth === null ? "–" : `${n.queue_depth}/${n.queue_capacity}`, "num"),
    cell(`${fmtMs(n.compute_mean_s)} / ${fmtMs(n.compute_p95_s)}`, "num"),
    cell(n.cpu_percent === null ? "–" : `${n.cpu_percent.toFixed(0)} %`, "num"),
    cell(n.prune_ratio === null ? "–" : n.prune_ratio.toFixed(2), "num"),
    cell(slowdowns[n.node_id] ? `${slowdowns[n.node_id].toFixed(1)}×` : "–", "num"),
    cell(n.processed ?? "–", "num"), cell(n.dropped ?? "–", "num"),
    cell(Object.entries(n.errors || {}).map(([k, v]) => `${k}: ${v}`).join(", ") || "none"),
  ]);
  drawLatency(data.latency, data.slo_s, data.now, data.recent_s);
  drawWindows(data.windows);
  fillTable("window-table", data.windows.slice(-8).reverse(), (w) => [
    cell(fmtTime(w.start_ts)), cell(w.count, "num"), cell(fmtPct(w.attainment_pct), "num"),
    cell(fmtMs(w.p50_s), "num"), cell(fmtMs(w.p95_s), "num"), cell(fmtMs(w.p99_s), "num"),
  ]);
  fillTable("errors", data.errors, (e) => [
    cell(fmtTime(e.ts)), cell(e.component), cell(e.kind), cell(e.topic), cell(e.message),
  ]);
}

async function refresh() {
  try {
    const res = await fetch("/api/status");
    const data = await res.json();
    if (!res.ok) throw new Error(data.error || res.statusText);
    render(data);
  } catch (err) {
    document.getElementById("summary").textContent = `waiting for data: ${err.message}`;
  }
}

refresh();
setInterval(refresh, Number(document.body.dataset.refreshMs) || 2000);
