// The live page of geventproxy's -admin endpoint.
//
// Once a second it reads three routes of the same origin: /history (only the
// samples it has not seen yet), /stats and /healthz. It draws plain SVG line
// charts of the last five minutes and a table of totals. No library, no other
// origin: the page must work on a server with no Internet access, opened
// through an SSH tunnel. When the proxy cannot be reached it says so and keeps
// retrying; a proxy that restarted (a new history) is picked up from scratch.
"use strict";

const POLL_MS = 1000;
const TIMEOUT_MS = 2500;
const WINDOW_S = 300; // the longest span a chart shows: the proxy keeps five minutes
const SVG = "http://www.w3.org/2000/svg";

// Each chart: the series it draws (fields of a /history sample) and how to print them.
const CHARTS = [
  {
    id: "traffic",
    title: "Requests and responses per second",
    wide: true,
    series: [
      // Responses follow requests closely: requests as a shaded area, responses as a dark
      // line over it, so that both stay visible where they coincide.
      { key: "requests_per_s", label: "requests/s", color: "#3b82f6", width: 2, area: true },
      { key: "responses_per_s", label: "responses/s", color: "#111827", width: 1.5, dash: "5 3" },
    ],
    format: (v) => fmtNumber(v, 1),
  },
  {
    id: "nak",
    title: "NAK share of responses",
    series: [{ key: "nak_share", label: "NAK share", color: "#ea580c" }],
    scale: 100,
    minTop: 1,
    format: (v) => fmtNumber(v * 100, 1) + " %",
    axis: (v) => fmtAxis(v) + "%",
  },
  {
    id: "invalid",
    title: "Invalid lines per second",
    series: [{ key: "invalid_per_s", label: "invalid/s", color: "#dc2626" }],
    format: (v) => fmtNumber(v, 1),
  },
  {
    id: "latency",
    title: "Upstream latency, ms (over the last 10 s)",
    series: [
      { key: "latency_p50_ms", label: "p50", color: "#a78bfa" },
      { key: "latency_p90_ms", label: "p90", color: "#7c3aed" },
      { key: "latency_p99_ms", label: "p99", color: "#4c1d95" },
    ],
    minTop: 0.1,
    format: (v) => fmtNumber(v, v < 10 ? 2 : 1) + " ms",
  },
  {
    id: "connections",
    title: "Connections active",
    series: [{ key: "connections_active", label: "active", color: "#0d9488" }],
    format: (v) => fmtNumber(v, 0),
  },
];

// The totals beside the charts: [label, field of /stats, kind].
const DIRS = [
  ["client_to_upstream", "client → upstream"],
  ["upstream_to_client", "upstream → client"],
];
const TOTALS = [
  {
    title: "Rates now",
    rows: [
      ["requests/s, last 1 s", "request_rate_1s", "rate"],
      ["requests/s, last 10 s", "request_rate_10s", "rate"],
      ["responses/s, last 1 s", "response_rate_1s", "rate"],
      ["responses/s, last 10 s", "response_rate_10s", "rate"],
    ],
  },
  {
    title: "Connections",
    rows: [
      ["active", "connections_active"],
      ["total", "connections_total"],
      ["refused (limit)", "connections_refused"],
      ["accept errors", "accept_errors"],
    ],
  },
  {
    title: "Closed, by reason",
    rows: [
      ["client closed", "connections_closed.client_closed"],
      ["upstream closed", "connections_closed.upstream_closed"],
      ["client reset", "connections_closed.client_reset"],
      ["upstream reset", "connections_closed.upstream_reset"],
      ["idle timeout", "connections_closed.idle_timeout"],
      ["strict violation", "connections_closed.strict_violation"],
      ["shutdown", "connections_closed.shutdown"],
      ["upstream unavailable", "connections_closed.upstream_unavailable"],
      ["error", "connections_closed.error"],
    ],
  },
  {
    title: "Upstream",
    rows: [
      ["connect failures", "upstream_connect_failures"],
      ["connect timeouts", "upstream_connect_timeouts"],
      ["latency p50 / p90 / p99", "latency", "latency"],
      ["replies timed", "latency_count"],
      ["replies unmatched", "latency_unmatched"],
      ["requests not timed", "latency_dropped"],
    ],
  },
  {
    title: "Bytes",
    rows: DIRS.map(([dir, label]) => [label, "bytes_" + dir, "bytes"]),
  },
];

const state = {
  instance: null,
  lastSeq: -1,
  samples: [], // oldest first, at most the proxy's capacity
  capacity: 300,
  stats: null,
  failingSince: null,
  lastOk: null,
};

function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmtNumber(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  return v.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function fmtAxis(v) {
  if (v >= 1e6) return +(v / 1e6).toPrecision(3) + "M";
  if (v >= 1e4) return +(v / 1e3).toPrecision(3) + "k";
  return String(+v.toPrecision(3));
}

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return (i ? v.toFixed(2) : String(v)) + " " + units[i];
}

function fmtDuration(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  const pad = (x) => String(x).padStart(2, "0");
  if (d) return `${d}d ${pad(h)}h ${pad(m)}m`;
  if (h) return `${h}h ${pad(m)}m ${pad(sec)}s`;
  if (m) return `${m}m ${pad(sec)}s`;
  return `${sec}s`;
}

function fmtClock(t) {
  return new Date(t * 1000).toLocaleTimeString("en-GB", { hour12: false });
}

// The smallest round number >= v whose quarters are round too (the grid has four steps).
function niceTop(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 1.2, 1.6, 2, 2.4, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// ---- the page's skeleton -------------------------------------------------------

function buildCharts() {
  const box = document.getElementById("charts");
  for (const chart of CHARTS) {
    const legend = el("div", { class: "legend" });
    for (const s of chart.series) {
      legend.append(
        el(
          "span",
          { class: "item" },
          el("i", { class: "swatch", "data-color": s.color }),
          s.label + " ",
          el("b", { "data-current": s.key }, "–"),
        ),
      );
    }
    const svg = el("svg:svg", { class: "plot", "data-chart": chart.id, role: "img" });
    const card = el(
      "div",
      { class: "card" + (chart.wide ? " wide" : ""), "data-card": chart.id },
      el("h2", {}, chart.title),
      legend,
      svg,
    );
    box.append(card);
  }
  // Swatch colours through the CSSOM: the policy forbids style attributes.
  for (const swatch of document.querySelectorAll(".swatch")) {
    swatch.style.background = swatch.dataset.color;
  }
}

function buildTotals() {
  const box = document.getElementById("totals");
  const messages = el("table", { class: "messages" });
  messages.append(
    el("tr", {}, el("th", {}, "Messages"), ...DIRS.map(([, l]) => el("th", {}, l)), el("th", {}, "total")),
  );
  for (const [kind, label] of [["req", "REQ"], ["ack", "ACK"], ["nak", "NAK"], ["invalid", "invalid"]]) {
    messages.append(
      el(
        "tr",
        {},
        el("td", {}, label),
        ...DIRS.map(([dir]) => el("td", { "data-field": `msg_${kind}_${dir}` }, "–")),
        el("td", { "data-field": `msg_${kind}` }, "–"),
      ),
    );
  }
  messages.append(
    el(
      "tr",
      { class: "sum" },
      el("td", { colspan: 3 }, "well-formed, both directions"),
      el("td", { "data-field": "msg_total" }, "–"),
    ),
  );
  box.append(el("div", { class: "card" }, messages));
  for (const group of TOTALS) {
    const table = el("table", {}, el("tr", {}, el("th", { colspan: 2 }, group.title)));
    for (const [label, field, kind] of group.rows) {
      table.append(
        el("tr", {}, el("td", {}, label), el("td", { "data-field": field, "data-kind": kind || "count" }, "–")),
      );
    }
    if (group.title === "Upstream") {
      table.append(el("tr", {}, el("td", {}, "health"), el("td", { id: "health-text", "data-field": "healthz" }, "–")));
    }
    box.append(el("div", { class: "card" }, table));
  }
}

// ---- drawing ------------------------------------------------------------------

function drawChart(chart, samples) {
  const svg = document.querySelector(`svg[data-chart="${chart.id}"]`);
  const width = Math.max(240, svg.clientWidth || svg.parentNode.clientWidth - 24);
  const height = chart.wide ? 230 : 190;
  const m = { left: 52, right: 10, top: 8, bottom: 22 };
  const w = width - m.left - m.right;
  const h = height - m.top - m.bottom;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.replaceChildren();

  const scale = chart.scale || 1;
  const newest = samples.length ? samples[samples.length - 1].t : Date.now() / 1000;
  const oldest = samples.length ? samples[0].t : newest;
  // Five minutes once the proxy has them; until then, the time since it started.
  const span = Math.min(WINDOW_S, Math.max(10, newest - oldest));
  const t0 = newest - span;
  const shown = samples.filter((s) => s.t >= t0);
  let top = 0;
  for (const s of shown) for (const series of chart.series) top = Math.max(top, (s[series.key] || 0) * scale);
  top = niceTop(Math.max(top, chart.minTop || 1));
  const x = (t) => m.left + ((t - t0) / span) * w;
  const y = (v) => m.top + h - (v / top) * h;

  // Grid and axes: four horizontal lines with their values, time ticks below.
  const axis = chart.axis || fmtAxis;
  for (let i = 0; i <= 4; i += 1) {
    const v = (top * i) / 4;
    svg.append(el("svg:line", { class: "grid", x1: m.left, x2: m.left + w, y1: y(v), y2: y(v) }));
    svg.append(el("svg:text", { class: "ylabel", x: m.left - 6, y: y(v) + 4 }, axis(v)));
  }
  const step = [2, 5, 10, 15, 30, 60, 120].find((s) => span / s <= 6) || 60;
  for (let t = Math.ceil(t0 / step) * step; t <= newest; t += step) {
    svg.append(el("svg:line", { class: "tick", x1: x(t), x2: x(t), y1: m.top + h, y2: m.top + h + 4 }));
    svg.append(el("svg:text", { class: "xlabel", x: x(t), y: height - 5 }, fmtClock(t)));
  }

  for (const series of chart.series) {
    // A missing value or a missed second (the proxy was busy, or restarting) is a gap.
    let d = "";
    let area = "";
    let prev = null;
    const points = [];
    const close = () => (prev === null ? "" : `L${x(prev.t).toFixed(1)},${y(0)}Z`);
    for (const s of shown) {
      const v = s[series.key];
      points.push([s.seq, v]);
      if (v === null || v === undefined) {
        area += close();
        prev = null;
        continue;
      }
      const joined = prev !== null && s.t - prev.t < 2.5;
      const xy = `${x(s.t).toFixed(1)},${y(v * scale).toFixed(1)}`;
      if (!joined) area += close() + `M${x(s.t).toFixed(1)},${y(0)}`;
      area += "L" + xy;
      d += (joined ? "L" : "M") + xy;
      prev = s;
    }
    area += close();
    if (series.area && area) {
      svg.append(el("svg:path", { class: "area", d: area, fill: series.color, "fill-opacity": 0.25 }));
    }
    const path = el("svg:path", {
      class: "line",
      d: d || "M0,0",
      stroke: series.color,
      "stroke-width": series.width || 2,
      "stroke-dasharray": series.dash,
      "data-series": series.key,
      "data-points": JSON.stringify(points),
    });
    if (!d) path.setAttribute("visibility", "hidden");
    svg.append(path);
    // A single sample has no line: show it as a dot.
    if (prev !== null && shown.length === 1) {
      svg.append(el("svg:circle", { cx: x(prev.t), cy: y(prev[series.key] * scale), r: 3, fill: series.color }));
    }
    const last = shown.length ? shown[shown.length - 1][series.key] : null;
    const current = document.querySelector(`[data-current="${series.key}"]`);
    current.textContent = last === null || last === undefined ? "–" : chart.format(last);
    current.dataset.value = last === null || last === undefined ? "" : String(last);
  }
  if (!shown.length) {
    svg.append(el("svg:text", { class: "empty", x: m.left + w / 2, y: m.top + h / 2 }, "waiting for the first sample…"));
  }
}

function drawAll() {
  for (const chart of CHARTS) drawChart(chart, state.samples);
}

function fieldValue(stats, field) {
  return field.split(".").reduce((o, k) => (o === undefined || o === null ? undefined : o[k]), stats);
}

function showTotals(stats, health, version) {
  for (const cell of document.querySelectorAll("#totals [data-field]")) {
    const field = cell.dataset.field;
    if (field === "healthz") continue;
    const kind = cell.dataset.kind || "count";
    if (kind === "latency") {
      const qs = ["p50", "p90", "p99"].map((q) => stats[`latency_${q}_ms`]);
      cell.textContent = qs[0] === null ? "no replies in 10 s" : qs.map((v) => fmtNumber(v, 2)).join(" / ") + " ms";
      continue;
    }
    const v = fieldValue(stats, field);
    cell.dataset.value = String(v);
    if (kind === "rate") cell.textContent = fmtNumber(v, 1);
    else if (kind === "bytes") {
      cell.textContent = fmtBytes(v);
      cell.title = v.toLocaleString("en-US") + " bytes";
    } else cell.textContent = fmtNumber(v, 0);
    cell.classList.toggle("bad", v > 0 && /refused|errors|failures|timeouts|reset|error|unavailable|violation/.test(field));
  }
  document.querySelector('header [data-field="uptime_s"]').textContent = fmtDuration(stats.uptime_s);
  document.querySelector('header [data-field="uptime_s"]').dataset.value = String(stats.uptime_s);
  document.querySelector('header [data-field="version"]').textContent = version;
  const badge = document.getElementById("health");
  badge.dataset.health = health.ok ? "ok" : "failing";
  badge.textContent = health.ok ? "healthy" : "unhealthy";
  badge.title = health.reason;
  const text = document.getElementById("health-text");
  text.textContent = health.reason;
  text.classList.toggle("bad", !health.ok);
}

// ---- polling ------------------------------------------------------------------

async function get(path) {
  const ctrl = new AbortController();
  const timer = setTimeout(() => ctrl.abort(), TIMEOUT_MS);
  try {
    return await fetch(path, { cache: "no-store", signal: ctrl.signal });
  } finally {
    clearTimeout(timer);
  }
}

async function getJSON(path) {
  const response = await get(path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

async function getHealth() {
  const response = await get("healthz");
  const reason = (await response.text()).trim();
  return { ok: response.status === 200, reason: reason || `HTTP ${response.status}` };
}

function merge(history) {
  if (history.instance !== state.instance) {
    state.instance = history.instance;
    state.samples = [];
    state.lastSeq = -1;
  }
  state.capacity = history.capacity;
  for (const s of history.samples) {
    if (s.seq > state.lastSeq) {
      state.samples.push(s);
      state.lastSeq = s.seq;
    }
  }
  if (state.samples.length > state.capacity) state.samples.splice(0, state.samples.length - state.capacity);
}

function setReachable(ok, error) {
  const banner = document.getElementById("banner");
  const updated = document.getElementById("updated");
  const now = Date.now() / 1000;
  if (ok) {
    state.failingSince = null;
    state.lastOk = now;
    banner.hidden = true;
    document.body.dataset.state = "live";
    updated.textContent = "live · updated " + fmtClock(now);
    return;
  }
  if (state.failingSince === null) state.failingSince = now;
  document.body.dataset.state = "unreachable";
  const last = state.lastOk === null ? "no data yet" : "the figures below are from " + fmtClock(state.lastOk);
  banner.textContent =
    `Cannot reach the proxy at ${location.host} since ${fmtClock(state.failingSince)} (${error}). ` +
    `Retrying every second; ${last}.`;
  banner.hidden = false;
  updated.textContent = "not connected";
  document.getElementById("health").dataset.health = "unknown";
  document.getElementById("health").textContent = "unreachable";
}

async function poll() {
  const started = Date.now();
  try {
    let history = await getJSON(`history?after=${state.lastSeq}`);
    if (history.instance !== state.instance && state.lastSeq >= 0) {
      history = await getJSON("history"); // the proxy restarted: its whole new history
    }
    const [stats, health] = await Promise.all([getJSON("stats"), getHealth()]);
    merge(history);
    state.stats = stats;
    document.body.dataset.instance = state.instance;
    document.body.dataset.lastSeq = String(state.lastSeq);
    drawAll();
    showTotals(stats, health, history.version);
    setReachable(true);
  } catch (err) {
    setReachable(false, err.name === "AbortError" ? "no answer within 2.5 s" : err.message || String(err));
  } finally {
    setTimeout(poll, Math.max(100, POLL_MS - (Date.now() - started)));
  }
}

buildCharts();
buildTotals();
drawAll();
window.addEventListener("resize", drawAll);
poll();
