// deltawatch live page: draws the runs table (/) and a run's step-indexed charts (/runs/NAME) as
// SVG from the sidecar's JSON API, then polls it. No library, nothing fetched from elsewhere.
// Every shown number carries its exact value in data-value (tests compare it with the API).
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const WIDTH = 620, HEIGHT = 190, PAD = { left: 56, right: 14, top: 10, bottom: 26 };
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"];
const ACTIVE_SECONDS = 60; // a run that reported within this is "updating"

// The charts of the run page (and of a matrix's drill-down): DESIGN §2 keys on the step axis.
const CHARTS = [
  { id: "stable_rank", title: "stable rank (median, quartiles and range over matrices)", band: true, keys: ["stable_rank"] },
  { id: "alignment", title: "horizon and subspace alignment", keys: ["horizon_alignment", "subspace_alignment"], unit: [0, 1] },
  { id: "energy", title: "channel energy and top-K energy", keys: ["channel_energy_ratio", "topk_energy_ratio"], unit: [0, 1] },
  { id: "visible", title: "bf16-visible fraction", keys: ["bf16_visible_ratio"] },
  { id: "overlaps", title: "visible updates in the low-magnitude and principal masks", keys: ["low_magnitude_overlap", "principal_overlap"], unit: [0, 1] },
  { id: "rotation", title: "rotation of W's top-16 subspace (degrees)", keys: ["rotation_max_degrees", "rotation_mean_degrees"] },
  { id: "shift", title: "spectral shift (top-k)", keys: ["spectral_shift_topk"] },
  { id: "locked", title: "locked share", keys: ["locked_ratio"], unit: [0, 1], runOnly: true },
  { id: "norm", title: "‖ΔW‖_F and σ1(ΔW)", keys: ["frobenius_norm", "spectral_norm"], matrixOnly: true },
];
const HEAT_KEYS = ["subspace_alignment", "horizon_alignment", "channel_energy_ratio"];

function h(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, v);
  for (const k of kids) if (k !== null && k !== undefined) e.append(k);
  return e;
}

function s(tag, attrs, ...kids) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, v);
  for (const k of kids) if (k !== null && k !== undefined) e.append(k);
  return e;
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(3);
  return String(Number(v.toPrecision(4)));
}

// A shown number: its text rounded, its exact value in data-value (String(x) round-trips a double).
function value(v, attrs) {
  return h("span", { class: "num", "data-value": v === null || v === undefined ? "null" : String(v), ...attrs }, fmt(v));
}

function ago(iso) {
  if (!iso) return null;
  return (Date.now() - Date.parse(iso)) / 1000;
}

function runState(run, alerts) {
  if (alerts.some((a) => a.run === run.run && a.rule === "RunStalled" && a.state === "firing")) return "stalled";
  const age = ago(run.updated_at);
  return age !== null && age < ACTIVE_SECONDS ? "updating" : "idle";
}

function niceTicks(lo, hi, n) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((x) => x >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Number(t.toPrecision(12)));
  return out;
}

// ------------------------------------------------------------------ line charts

const cursors = []; // every chart's cursor callback: a shared step cursor across charts

function setCursor(step) {
  for (const f of cursors) f(step);
}

function chart(spec, steps, series, alerts) {
  // series: [{key, label, values, color}], bands: [{lo, hi, cls}] (values per step, null = unknown)
  const lines = series.lines, bands = series.bands || [];
  const all = [...lines.flatMap((l) => l.values), ...bands.flatMap((b) => [...b.lo, ...b.hi])].filter((v) => v !== null);
  let lo = spec.unit ? spec.unit[0] : Math.min(...all), hi = spec.unit ? spec.unit[1] : Math.max(...all);
  if (!spec.unit && all.length) {
    if (hi === lo) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
    const pad = (hi - lo) * 0.08; lo = lo >= 0 && lo - pad < 0 ? 0 : lo - pad; hi += pad;
  }
  if (!all.length) { lo = 0; hi = 1; }
  const x0 = steps.length ? steps[0] : 0, x1 = steps.length ? steps[steps.length - 1] : 1;
  const X = (st) => PAD.left + (x1 > x0 ? (st - x0) / (x1 - x0) : 0.5) * (WIDTH - PAD.left - PAD.right);
  const Y = (v) => HEIGHT - PAD.bottom - ((v - lo) / (hi - lo)) * (HEIGHT - PAD.top - PAD.bottom);
  const g = s("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: "chart", role: "img", "aria-label": spec.title });
  for (const t of niceTicks(lo, hi, 4)) {
    g.append(s("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: Y(t), y2: Y(t), class: "grid" }));
    g.append(s("text", { x: PAD.left - 6, y: Y(t) + 4, class: "tick", "text-anchor": "end" }, String(Number(t.toPrecision(3)))));
  }
  for (const t of niceTicks(x0, x1, 6).filter((t) => Number.isInteger(t))) {
    g.append(s("text", { x: X(t), y: HEIGHT - 8, class: "tick", "text-anchor": "middle" }, String(t)));
  }
  for (const [a, b] of alertSpans(alerts, x1)) {
    g.append(s("rect", { x: X(a), y: PAD.top, width: Math.max(2, X(b) - X(a)), height: HEIGHT - PAD.top - PAD.bottom, class: "alert-span" }));
  }
  for (const a of alerts.filter((a) => a.start_step !== null && a.start_step !== undefined)) {
    const x = X(a.start_step);
    g.append(s("path", { d: `M${x - 4},${PAD.top}L${x + 4},${PAD.top}L${x},${PAD.top + 7}Z`, class: `alert-mark ${a.state}` },
      s("title", {}, `${a.rule} ${a.matrix || "(run)"}: from step ${a.start_step}${a.end_step != null ? " to " + a.end_step : ", firing"}`)));
  }
  for (const b of bands) {
    for (const seg of segments(steps, b.lo, b.hi)) {
      const pts = seg.map((i) => `${X(steps[i])},${Y(b.hi[i])}`).concat(seg.slice().reverse().map((i) => `${X(steps[i])},${Y(b.lo[i])}`));
      g.append(s("polygon", { points: pts.join(" "), class: `band ${b.cls}` }));
    }
  }
  lines.forEach((l) => {
    let d = "", n = 0;
    for (const seg of segments(steps, l.values)) {
      d += seg.map((i, j) => `${j ? "L" : "M"}${X(steps[i]).toFixed(1)},${Y(l.values[i]).toFixed(1)}`).join("");
      n += seg.length;
      if (seg.length === 1) g.append(s("circle", { cx: X(steps[seg[0]]), cy: Y(l.values[seg[0]]), r: 2.5, fill: l.color }));
    }
    g.append(s("path", { d, stroke: l.color, class: "line", "data-key": l.key, "data-points": n }));
  });
  g.append(s("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: HEIGHT - PAD.bottom, y2: HEIGHT - PAD.bottom, class: "axis" }));
  const cursor = s("line", { y1: PAD.top, y2: HEIGHT - PAD.bottom, class: "cursor", visibility: "hidden" });
  g.append(cursor);
  const overlay = s("rect", { x: PAD.left, y: PAD.top, width: WIDTH - PAD.left - PAD.right, height: HEIGHT - PAD.top - PAD.bottom, class: "overlay" });
  g.append(overlay);

  const legend = h("div", { class: "legend" });
  const shown = lines.map((l) => {
    const v = value(null, { "data-key": l.key });
    legend.append(h("span", { class: "entry" }, h("i", { style: `background:${l.color}` }), `${l.label} `, v));
    return v;
  });
  const stepLabel = h("span", { class: "at" });
  legend.append(stepLabel);
  const show = (i) => {
    lines.forEach((l, k) => {
      let j = i;
      if (j === null) { j = l.values.length - 1; while (j >= 0 && l.values[j] === null) j--; }
      const v = j !== null && j >= 0 ? l.values[j] : null;
      shown[k].textContent = fmt(v);
      shown[k].dataset.value = v === null || v === undefined ? "null" : String(v);
      shown[k].dataset.step = j !== null && j >= 0 ? String(steps[j]) : "";
    });
    stepLabel.textContent = i === null ? (steps.length ? `latest (step ${steps[steps.length - 1]})` : "no checks yet") : `step ${steps[i]}`;
  };
  show(null);
  cursors.push((step) => {
    const i = step === null ? -1 : steps.indexOf(step);
    if (i < 0) { cursor.setAttribute("visibility", "hidden"); show(null); return; }
    cursor.setAttribute("x1", X(steps[i])); cursor.setAttribute("x2", X(steps[i]));
    cursor.setAttribute("visibility", "visible"); show(i);
  });
  overlay.addEventListener("mousemove", (ev) => {
    const r = g.getBoundingClientRect(), px = ((ev.clientX - r.left) / r.width) * WIDTH;
    let best = null;
    steps.forEach((st, i) => { if (best === null || Math.abs(X(st) - px) < Math.abs(X(steps[best]) - px)) best = i; });
    setCursor(best === null ? null : steps[best]);
  });
  overlay.addEventListener("mouseleave", () => setCursor(null));
  return h("figure", { class: "panel", id: `chart-${spec.id}` }, h("figcaption", {}, spec.title), legend, g);
}

// The union of the alerts' [start_step, end_step] intervals (a firing alert runs to `last`).
function alertSpans(alerts, last) {
  const spans = alerts.filter((a) => a.start_step !== null && a.start_step !== undefined)
    .map((a) => [a.start_step, a.end_step === null || a.end_step === undefined ? last : a.end_step])
    .sort((p, q) => p[0] - q[0]);
  const out = [];
  for (const sp of spans) {
    if (out.length && sp[0] <= out[out.length - 1][1]) out[out.length - 1][1] = Math.max(out[out.length - 1][1], sp[1]);
    else out.push([...sp]);
  }
  return out;
}

// Runs of consecutive indices where every given array is non-null.
function segments(steps, ...arrays) {
  const out = []; let cur = [];
  for (let i = 0; i < steps.length; i++) {
    if (arrays.every((a) => a[i] !== null && a[i] !== undefined)) cur.push(i);
    else if (cur.length) { out.push(cur); cur = []; }
  }
  if (cur.length) out.push(cur);
  return out;
}

// ------------------------------------------------------------------ heatmap and alert strip

function color(v) {
  // 0 -> dark purple, 0.5 -> teal, 1 -> yellow (a viridis-like ramp); null -> grey.
  if (v === null || v === undefined) return "#e4e4e4";
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const t = Math.max(0, Math.min(1, v)) * (stops.length - 1), i = Math.min(Math.floor(t), stops.length - 2), f = t - i;
  const c = stops[i].map((a, k) => Math.round(a + f * (stops[i + 1][k] - a)));
  return `rgb(${c.join(",")})`;
}

function heatmap(series, key) {
  const steps = series.steps, layers = series.layers, rows = series.layer_keys[key] || [];
  const left = 64, top = 6, cellH = Math.max(10, Math.min(26, 220 / Math.max(1, layers.length)));
  const w = WIDTH * 2 - left - PAD.right, cellW = w / Math.max(1, steps.length);
  const g = s("svg", { viewBox: `0 0 ${WIDTH * 2} ${top + cellH * layers.length + 28}`, class: "heatmap", "data-key": key });
  layers.forEach((layer, li) => {
    g.append(s("text", { x: left - 6, y: top + li * cellH + cellH / 2 + 4, class: "tick", "text-anchor": "end" }, `layer ${layer}`));
    steps.forEach((st, si) => {
      const v = rows[li][si];
      g.append(s("rect", {
        x: left + si * cellW, y: top + li * cellH, width: cellW + 0.5, height: cellH - 1, fill: color(v), class: "cell",
        "data-layer": layer, "data-step": st, "data-value": v === null ? "null" : String(v),
      }, s("title", {}, `layer ${layer}, step ${st}: ${key} ${fmt(v)}`)));
    });
  });
  const y = top + cellH * layers.length + 16;
  for (const t of niceTicks(steps[0] || 0, steps[steps.length - 1] || 1, 10).filter((t) => Number.isInteger(t))) {
    const i = steps.findIndex((st) => st >= t);
    if (i >= 0) g.append(s("text", { x: left + (i + 0.5) * cellW, y, class: "tick", "text-anchor": "middle" }, String(t)));
  }
  return g;
}

function heatLegend() {
  const g = s("svg", { viewBox: "0 0 240 24", class: "heatlegend" });
  for (let i = 0; i < 40; i++) g.append(s("rect", { x: 20 + i * 5, y: 2, width: 5.5, height: 10, fill: color(i / 39) }));
  g.append(s("text", { x: 16, y: 11, class: "tick", "text-anchor": "end" }, "0"));
  g.append(s("text", { x: 224, y: 11, class: "tick" }, "1"));
  g.append(s("rect", { x: 100, y: 14, width: 10, height: 9, fill: color(null) }));
  g.append(s("text", { x: 114, y: 22, class: "tick" }, "null (before lock)"));
  return g;
}

// One row per alert (rule and matrix), a bar from its start step to its end step (or the last
// step while it fires), on the run's step axis.
function alertStrip(alerts, steps) {
  const placed = alerts.filter((a) => a.start_step !== null && a.start_step !== undefined);
  const width = WIDTH * 2, left = 300, rowH = 14, top = 4;
  const x0 = steps.length ? steps[0] : 0, x1 = steps.length ? steps[steps.length - 1] : 1;
  const X = (st) => left + (x1 > x0 ? (st - x0) / (x1 - x0) : 0.5) * (width - left - PAD.right);
  const g = s("svg", { viewBox: `0 0 ${width} ${top + rowH * placed.length + 22}`, class: "strip" });
  placed.forEach((a, i) => {
    const y = top + i * rowH, end = a.end_step === null || a.end_step === undefined ? x1 : a.end_step;
    g.append(s("text", { x: left - 6, y: y + 10, class: "tick", "text-anchor": "end" }, `${a.rule} ${a.matrix || "(run)"}`));
    g.append(s("rect", { x: X(a.start_step), y: y + 2, width: Math.max(3, X(end) - X(a.start_step)), height: rowH - 4, class: `alert-bar ${a.state}`,
      "data-id": a.id, "data-start-step": a.start_step, "data-end-step": a.end_step === null || a.end_step === undefined ? "null" : a.end_step },
      s("title", {}, `${a.rule} ${a.matrix || "(run)"}: step ${a.start_step} to ${a.end_step == null ? "now (firing)" : a.end_step}`)));
  });
  const y = top + rowH * placed.length + 14;
  g.append(s("line", { x1: left, x2: width - PAD.right, y1: y - 10, y2: y - 10, class: "axis" }));
  for (const t of niceTicks(x0, x1, 10).filter((t) => Number.isInteger(t))) {
    g.append(s("text", { x: X(t), y: y + 2, class: "tick", "text-anchor": "middle" }, String(t)));
  }
  return g;
}

function alertTable(alerts, withRun) {
  if (!alerts.length) return h("p", { class: "none" }, "no alerts");
  const t = h("table", { class: "alerts" });
  const when = withRun ? ["started", "ended"] : ["start step", "end step"];
  t.append(h("tr", {}, ...[withRun ? "run" : null, "rule", "matrix", "state", "severity", ...when, "value", "summary"].filter((x) => x).map((x) => h("th", {}, x))));
  for (const a of alerts) {
    t.append(h("tr", { class: `alert ${a.state}`, "data-id": a.id, "data-rule": a.rule },
      withRun ? h("td", {}, h("a", { href: `/runs/${encodeURIComponent(a.run)}` }, a.run)) : null,
      h("td", {}, a.rule), h("td", { class: "name" }, a.matrix || "(run)"), h("td", { class: "state" }, a.state), h("td", {}, a.severity),
      withRun ? null : h("td", {}, value(a.start_step)), withRun ? null : h("td", {}, value(a.end_step)),
      withRun ? h("td", {}, a.started_at) : null, withRun ? h("td", {}, a.ended_at || "") : null,
      h("td", {}, value(a.value)), h("td", { class: "summary" }, a.summary)));
  }
  return t;
}

// ------------------------------------------------------------------ pages

function indexPage(app, data) {
  const runs = data.runs, alerts = data.alerts;
  app.replaceChildren();
  if (!runs.length) { app.append(h("p", { class: "none" }, "No runs yet: point a Monitor at this sidecar's gRPC address.")); return; }
  const t = h("table", { class: "runs", id: "runs" });
  t.append(h("tr", {}, ...["run", "state", "last step", "matrices", "locked share", "firing alerts", "updated"].map((x) => h("th", {}, x))));
  for (const r of runs) {
    const firing = alerts.filter((a) => a.run === r.run && a.state === "firing");
    const state = runState(r, alerts);
    t.append(h("tr", { class: "run", "data-run": r.run },
      h("td", {}, h("a", { href: `/runs/${encodeURIComponent(r.run)}` }, r.run)),
      h("td", {}, h("span", { class: `state ${state}` }, state)),
      h("td", { class: "last-step" }, value(r.last_step)), h("td", { class: "matrices" }, value(r.matrices)),
      h("td", { class: "locked" }, value(r.locked_ratio)),
      h("td", { class: "firing" }, h("span", { class: firing.length ? "badge firing" : "badge", "data-value": String(firing.length) }, String(firing.length)),
        firing.length ? " " + [...new Set(firing.map((a) => a.rule))].join(", ") : ""),
      h("td", {}, r.updated_at || "")));
  }
  app.append(t, h("h2", {}, "alerts"), alertTable(alerts, true));
}

let heatKey = HEAT_KEYS[0];

function runPage(app, data) {
  const d = data.detail, sr = data.series, steps = sr.steps, runAlerts = sr.alerts;
  const firing = runAlerts.filter((a) => a.state === "firing");
  cursors.length = 0;
  app.replaceChildren();
  const agg = d.aggregate;
  const summary = h("dl", { class: "summary", id: "summary" });
  const item = (label, v, key) => summary.append(h("div", {}, h("dt", {}, label), h("dd", { "data-key": key }, value(v))));
  item("last step", d.last_step, "last_step");
  item("matrices", d.page ? d.page.total : d.matrices.length, "matrices");
  item("locked share", agg.locked_ratio, "locked_ratio");
  item("lock step (median)", agg.lock_step, "lock_step");
  item("stable rank (mean)", agg.stable_rank, "stable_rank");
  item("bf16-visible", agg.bf16_visible_ratio, "bf16_visible_ratio");
  item("firing alerts", firing.length, "firing");
  app.append(summary);

  const grid = h("section", { class: "grid", id: "charts" });
  for (const spec of CHARTS.filter((c) => !c.matrixOnly)) {
    const lines = spec.band
      ? [{ key: "median", label: "median", values: sr.stable_rank.median, color: COLORS[0] }]
      : spec.keys.map((k, i) => ({ key: k, label: k, values: sr.aggregate[k] || [], color: COLORS[i] }));
    const bands = spec.band
      ? [{ lo: sr.stable_rank.min, hi: sr.stable_rank.max, cls: "range" }, { lo: sr.stable_rank.q25, hi: sr.stable_rank.q75, cls: "quartiles" }]
      : [];
    grid.append(chart(spec, steps, { lines, bands }, runAlerts));
  }
  app.append(grid);

  const heat = h("section", { class: "panel wide", id: "heatmap" });
  const select = h("select", { id: "heat-key" }, ...HEAT_KEYS.map((k) => h("option", k === heatKey ? { value: k, selected: "" } : { value: k }, k)));
  const holder = h("div", {}, heatmap(sr, heatKey));
  select.addEventListener("change", () => { heatKey = select.value; holder.replaceChildren(heatmap(sr, heatKey)); });
  heat.append(h("h2", {}, "layer × step: mean over the layer's matrices of ", select), holder, heatLegend());
  app.append(heat);

  app.append(h("section", { class: "panel wide", id: "alerts" }, h("h2", {}, "alerts on the step axis (shaded on the charts, ▼ where one starts)"),
    runAlerts.length ? alertStrip(runAlerts, steps) : null, alertTable(runAlerts, false)));

  app.append(modulesPanel(data));
  const shown = data.matrices || d;
  const title = shown.where ? `matrices of layer ${value(shown.where.layer)} ${shown.where.module}` : "matrices";
  const more = shown.page && shown.page.next_offset !== null ? ` (first ${shown.matrices.length} of ${shown.page.total})` : "";
  app.append(h("section", { class: "panel wide" }, h("h2", {}, `${title}${more} (latest check; click one for its history)`), matrixTable(shown.matrices)));
  app.append(h("section", { class: "panel wide", id: "drill" }));
  drill(data.run, sr.alerts);
}

const MATRIX_COLS = ["stable_rank", "horizon_alignment", "subspace_alignment", "channel_energy_ratio", "bf16_visible_ratio", "rotation_max_degrees"];

function matrixTable(matrices) {
  const t = h("table", { class: "matrices", id: "matrices" });
  t.append(h("tr", {}, ...["matrix", "layer", "module", "expert", "shape", "step", "locked", ...MATRIX_COLS].map((x) => h("th", {}, x))));
  for (const m of matrices) {
    const link = h("a", { href: `#matrix=${encodeURIComponent(m.matrix)}` }, m.matrix);
    t.append(h("tr", { class: "matrix", "data-matrix": m.matrix },
      h("td", { class: "name" }, link), h("td", {}, value(m.layer)), h("td", {}, m.module), h("td", {}, value(m.expert)), h("td", {}, m.shape.join("×")),
      h("td", {}, value(m.step)), h("td", {}, value(m.locked)), ...MATRIX_COLS.map((k) => h("td", { "data-key": k }, value(m[k])))));
  }
  return t;
}

let moduleLayer = "";

// One row per (layer, module): the §2 aggregate over its matrices (an MoE module's experts).
function modulesPanel(data) {
  const items = (data.modules && data.modules.modules) || [];
  const layers = [...new Set(items.map((m) => m.layer))];
  const select = h("select", { id: "module-layer" }, h("option", { value: "" }, "every layer"),
    ...layers.map((l) => h("option", String(l) === moduleLayer ? { value: String(l), selected: "" } : { value: String(l) }, `layer ${value(l)}`)));
  const t = h("table", { class: "modules", id: "modules" });
  const cols = ["stable_rank", "horizon_alignment", "subspace_alignment", "bf16_visible_ratio", "locked_ratio"];
  const fill = () => {
    t.replaceChildren(h("tr", {}, ...["layer", "module", "matrices", "experts", "step", ...cols].map((x) => h("th", {}, x))));
    for (const m of items.filter((x) => moduleLayer === "" || String(x.layer) === moduleLayer)) {
      const link = h("a", { href: "#" }, m.module);
      link.addEventListener("click", (ev) => { ev.preventDefault(); showModule(data, m.layer, m.module); });
      t.append(h("tr", { class: "module", "data-layer": String(m.layer), "data-module": m.module },
        h("td", {}, value(m.layer)), h("td", { class: "name" }, link), h("td", {}, value(m.matrices)), h("td", {}, value(m.experts)),
        h("td", {}, value(m.step)), ...cols.map((k) => h("td", { "data-key": k }, value(m.aggregate[k])))));
    }
  };
  select.addEventListener("change", () => { moduleLayer = select.value; fill(); });
  fill();
  return h("section", { class: "panel wide", id: "modules-panel" },
    h("h2", {}, "modules: the run aggregate per layer and module (over the experts of an MoE module) ", select), t);
}

async function showModule(data, layer, module) {
  const q = new URLSearchParams({ module, limit: "1000" });
  if (layer !== null) q.set("layer", String(layer));
  const body = await getJSON(`/api/v1/runs/${encodeURIComponent(data.run)}?${q}`);
  if (!body) return;
  data.matrices = { ...body, where: { layer, module } };
  const y = window.scrollY;
  runPage(document.getElementById("app"), data);
  window.scrollTo(0, y);
}

async function drill(run, alerts) {
  const box = document.getElementById("drill");
  const m = /^#matrix=(.+)$/.exec(location.hash);
  if (!box) return;
  if (!m) { box.replaceChildren(); box.hidden = true; return; }
  const name = decodeURIComponent(m[1]);
  const body = await getJSON(`/api/v1/runs/${encodeURIComponent(run)}/history?matrix=${encodeURIComponent(name)}`);
  if (!body) return;
  const steps = body.points.map((p) => p.step);
  const mine = alerts.filter((a) => a.matrix === name);
  const grid = h("div", { class: "grid" });
  for (const spec of CHARTS.filter((c) => !c.runOnly)) {
    const lines = spec.keys.map((k, i) => ({ key: k, label: k, values: body.points.map((p) => p[k] === undefined ? null : p[k]), color: COLORS[i] }));
    grid.append(chart({ ...spec, id: `matrix-${spec.id}`, title: spec.band ? "stable rank" : spec.title }, steps, { lines }, mine));
  }
  box.hidden = false;
  box.replaceChildren(h("h2", { "data-matrix": name }, `matrix ${name}`, " ", h("a", { href: "#" }, "(close)")), grid);
  box.scrollIntoView({ block: "start" });
}

// ------------------------------------------------------------------ polling

async function getJSON(path) {
  try {
    const r = await fetch(path, { credentials: "same-origin", cache: "no-store" });
    if (!r.ok) { status(`${path}: HTTP ${r.status}`, true); return null; }
    return await r.json();
  } catch (e) {
    status(`sidecar unreachable (${e.message}); retrying`, true);
    return null;
  }
}

function status(text, bad) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.className = bad ? "status bad" : "status";
}

function stamp() {
  status(`updated ${new Date().toLocaleTimeString()}; polling every ${DATA.poll_seconds} s`, false);
}

const DATA = JSON.parse(document.getElementById("dw-data").textContent);

async function poll() {
  if (document.hidden) return;
  const app = document.getElementById("app");
  if (DATA.page === "index") {
    const [runs, alerts] = await Promise.all([getJSON("/api/v1/runs"), getJSON("/api/v1/alerts")]);
    if (!runs || !alerts) return;
    DATA.runs = runs.runs; DATA.alerts = alerts.alerts;
    indexPage(app, DATA);
  } else {
    const base = `/api/v1/runs/${encodeURIComponent(DATA.run)}`;
    const [detail, alerts, modules] = await Promise.all([getJSON(base), getJSON("/api/v1/alerts"), getJSON(`${base}/modules`)]);
    if (!detail || !alerts || !modules) return;
    const key = (list) => JSON.stringify(list.filter((a) => a.run === DATA.run).map((a) => [a.id, a.state]));
    const changed = JSON.stringify(detail) !== JSON.stringify(DATA.detail) || key(alerts.alerts) !== key(DATA.series.alerts);
    if (!changed) { stamp(); return; }
    const series = await getJSON(`${base}/series`);
    if (!series) return;
    const y = window.scrollY;
    DATA.detail = detail; DATA.series = series; DATA.modules = modules;
    runPage(app, DATA);
    window.scrollTo(0, y);
  }
  stamp();
}

function start() {
  const app = document.getElementById("app");
  if (DATA.page === "index") indexPage(app, DATA);
  else {
    runPage(app, DATA);
    window.addEventListener("hashchange", () => drill(DATA.run, DATA.series.alerts));
  }
  stamp();
  setInterval(poll, DATA.poll_seconds * 1000);
}

start();
