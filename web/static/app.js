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

function drawLatency(points, slo, now, span, events) {
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
  for (const e of events || []) {
    if (e.ts < now - span) continue;
    kids.push(svgEl("line", { x1: x(e.ts), x2: x(e.ts), y1: 10, y2: H - B, class: `prune-mark mark-${e.kind}` }));
    kids.push(svgEl("text", { x: x(e.ts) + 3, y: 20, class: "axis" }, e.kind));
  }
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

// The placement, hop by hop, with every node of a stage: "ingest pi-e → stage 1 · blocks 0–9 · pi-a + pi-b → …"
function pipelineLine(placement, pipeline) {
  if (!placement) return "no placement yet";
  return `placement v${placement.version}: ` + pipeline.map((h) => (h.stage === 0
    ? `ingest ${h.nodes[0]}`
    : `stage ${h.stage} · blocks ${h.first_block}–${h.last_block} · ${h.nodes.join(" + ")}`)).join(" → ");
}

// A node's stage as it reports it, and the nodes it shares the stage with (replicas) as the placement says.
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
    (a.implausible_capture_ts ? ` · ${a.implausible_capture_ts} with an implausible capture time (timed from arrival)` : "");
}

function render(data) {
  document.getElementById("accounting").textContent = accountingLine(data.accounting);
  const t = data.totals;
  document.getElementById("summary").textContent = t && t.results
    ? `SLO ${fmtMs(data.slo_s)} · ${t.results} frames · attainment ${fmtPct(t.attainment_pct)} · ` +
      `p50 ${fmtMs(t.p50_s)} · p95 ${fmtMs(t.p95_s)}`
    : `SLO ${fmtMs(data.slo_s)} · no frames yet`;
  const clock = data.clock || { suspect_nodes: [] };
  const clockWarning = document.getElementById("clock-warning");
  clockWarning.hidden = clock.suspect_nodes.length === 0;
  clockWarning.textContent = clock.suspect_nodes.length === 0 ? "" :
    `latencies unreliable: the clock of ${clock.suspect_nodes.join(", ")} is more than ` +
    `${fmtMs(clock.max_offset_s)} off the gateway's (run edgeprune doctor on it)`;
  if (clock.suspect_nodes.length) document.getElementById("summary").textContent += " · ⏱ latencies marked unreliable";
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
  document.getElementById("pipeline").textContent = pipelineLine(data.placement, data.pipeline || []);
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
  drawLatency(data.latency, data.slo_s, data.now, data.recent_s, data.prune_events);
  const show = (v) => (v === null || v === undefined ? "–" : typeof v === "object" ? JSON.stringify(v) : String(v));
  fillTable("actions", data.operator_actions || [], (a) => [
    cell(fmtTime(a.ts)), cell(a.by), cell(a.action), cell(a.target), cell(`${show(a.old)} → ${show(a.new)}`),
  ]);
  const iso = (t) => (t == null ? "–" : new Date(t * 1000).toISOString().slice(0, 16).replace("T", " "));
  fillTable("cameras", data.cameras || [], (c) => [
    cell(c.camera_id), cell(c.location_name), cell(c.latitude, "num"), cell(c.longitude, "num"),
    cell(iso(c.start_ts)), cell(iso(c.end_ts)),
  ]);
  if (document.body.dataset.operator) renderControls(data);
  drawWindows(data.windows);
  fillTable("window-table", data.windows.slice(-8).reverse(), (w) => [
    cell(fmtTime(w.start_ts)), cell(w.count, "num"), cell(fmtPct(w.attainment_pct), "num"),
    cell(fmtMs(w.p50_s), "num"), cell(fmtMs(w.p95_s), "num"), cell(fmtMs(w.p99_s), "num"),
  ]);
  fillTable("errors", data.errors, (e) => [
    cell(fmtTime(e.ts)), cell(e.component), cell(e.kind), cell(e.topic), cell(e.message),
  ]);
}

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
  for (const el of document.querySelectorAll("[data-setting-now]")) {
    el.textContent = show(settings[el.dataset.settingNow]);
  }
  const ladder = ctl.ladder || [];
  const ids = data.nodes.map((n) => n.node_id);
  const key = JSON.stringify([ids, ladder]);
  if (key === controlsKey) return;  // rebuilding would drop what the operator is choosing
  controlsKey = key;
  const options = ladder.map((r) => `<option value="${r}">${r.toFixed(1)}</option>`).join("");
  fillTable("node-controls", ids, (node) => {
    const hold = commandForm(`hold-${node}`, { cmd: "prune", node_id: node },
      `<select name="ratio" aria-label="ratio for ${node}">${options}</select><button type="submit">Hold</button>`);
    const release = commandForm(`release-${node}`, { cmd: "prune", node_id: node, ratio: "release" },
      `<button type="submit">Release</button>`);
    const slow = commandForm(`slowdown-${node}`, { cmd: "node_slowdown", node_id: node },
      `<input name="factor" value="1" size="4" inputmode="decimal" aria-label="slowdown factor"><button>×</button>`);
    const retire = commandForm(`retire-${node}`, { cmd: "retire", node_id: node },
      `<button type="submit" class="danger">Retire</button>`);
    const tds = [cell(node), cell(""), cell(""), cell("")];
    tds[1].append(hold, release);
    tds[2].append(slow);
    tds[3].append(retire);
    return tds;
  });
}

function show(v) {
  return v === null || v === undefined ? "–" : typeof v === "object" ? JSON.stringify(v) : String(v);
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
