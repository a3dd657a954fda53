// The console's shared helpers: API calls with the session (and its CSRF token), safe DOM
// building (text is only ever set as text, never parsed as HTML), tables, SVG charts, alerts
// and server-sent events. Every page's script imports what it needs from here.

const CONSOLE = "/console";

export function csrfToken() {
  return document.querySelector('meta[name="csrf-token"]').content;
}

export const me = {
  role: document.body.dataset.role,
  tenant: document.body.dataset.tenant,
  key: document.body.dataset.key,
  get isAdmin() { return this.role === "admin"; },
};

export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `The request failed (${status}).`);
    this.status = status;
    this.type = error?.type;
    this.code = error?.code;
    this.param = error?.param;
  }
}

function signInAgain() {
  const here = location.pathname + location.search;
  location.assign(`${CONSOLE}/login?next=${encodeURIComponent(here)}`);
}

// fetch() as the signed-in session. `json` sends a JSON body, `form` a FormData; `query` is
// added to the URL. Resolves to the parsed JSON (or the Response itself with raw: true) and
// rejects with an ApiError carrying OpenAI's error fields.
export async function api(path, { method = "GET", json, form, query, raw = false, signal } = {}) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const headers = {};
  let body;
  if (method !== "GET" && method !== "HEAD") headers["x-csrf-token"] = csrfToken();
  if (json !== undefined) {
    headers["content-type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  const response = await fetch(url, { method, headers, body, signal, credentials: "same-origin" });
  if (response.status === 401) {
    signInAgain();
    throw new ApiError(401, { message: "Your session has ended." });
  }
  if (!response.ok) {
    let error;
    try { error = (await response.json()).error; } catch { error = undefined; }
    throw new ApiError(response.status, error);
  }
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

// Every page of a list endpoint (OpenAI's cursor paging: has_more, last_id), up to `max` items.
export async function listAll(path, { query = {}, max = 1000 } = {}) {
  const items = [];
  let after;
  for (;;) {
    const page = await api(path, { query: { ...query, limit: 100, after } });
    items.push(...page.data);
    if (!page.has_more || items.length >= max || page.data.length === 0) return items;
    after = page.last_id ?? page.data[page.data.length - 1].id;
  }
}

// h("a", {href: "/x", class: "btn", onclick: fn}, "text", childNode): an element, safely.
export function h(tag, props = {}, ...children) {
  const svg = ["svg", "g", "path", "line", "text", "rect", "circle", "polyline", "title"].includes(tag);
  const node = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else if (name === "text") node.textContent = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function clear(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== undefined && c !== null && c !== false));
  return node;
}

// columns: [{label, value: row => string | Node, numeric?}]; rows: objects.
export function table(columns, rows, { empty = "Nothing here yet.", caption } = {}) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h("div", { class: "table-wrap", tabindex: 0, role: "region", "aria-label": caption || "table" },
    h("table", {},
      caption ? h("caption", {}, caption) : null,
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.numeric ? "num" : null }, c.label)))),
      h("tbody", {}, rows.map((row) => h("tr", {}, columns.map((c) => {
        const value = c.value(row);
        return h("td", { class: c.numeric ? "num" : null }, value ?? "—");
      }))))));
}

export const fmt = {
  time(epoch) {
    if (epoch === null || epoch === undefined) return "—";
    return new Date(epoch * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
  },
  num(n, digits = 0) {
    if (n === null || n === undefined) return "—";
    return Number(n).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
  },
  usd(n) {
    if (n === null || n === undefined) return "—";
    return "$" + Number(n).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: n && Math.abs(n) < 0.01 ? 6 : 2 });
  },
  pct(x) { return x === null || x === undefined ? "—" : `${(x * 100).toFixed(1)}%`; },
  bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  },
};

export function notify(message, kind = "error") {
  const box = document.getElementById("alerts");
  const note = h("div", { class: `alert ${kind}` }, h("span", {}, message),
    h("button", { type: "button", class: "close", "aria-label": "Dismiss", onclick: () => note.remove() }, "×"));
  box.append(note);
  if (kind !== "error") setTimeout(() => note.remove(), 6000);
  return note;
}

export function showError(err) {
  const where = err?.param ? ` (${err.param})` : "";
  notify(`${err?.message || err}${where}`, "error");
}

// A form's submit runs `handler(formData, form)`; the button is disabled meanwhile, an error is
// shown instead of thrown.
export function onSubmit(form, handler) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const buttons = form.querySelectorAll("button[type=submit]");
    buttons.forEach((b) => { b.disabled = true; });
    try {
      await handler(new FormData(form), form);
    } catch (err) {
      showError(err);
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
    }
  });
}

// The data frames of a server-sent events response, parsed as JSON ("[DONE]" ends them).
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// Calls `tick` now and every `ms` while the page is open and `keepGoing()` holds.
export function every(ms, tick, keepGoing = () => true) {
  let timer;
  const run = async () => {
    try { await tick(); } catch (err) { showError(err); }
    if (keepGoing()) timer = setTimeout(run, ms);
  };
  run();
  return () => clearTimeout(timer);
}

export function downloadCsv(filename, header, rows) {
  const cell = (v) => {
    const s = v === null || v === undefined ? "" : String(v);
    // Quote what needs it; a leading =, +, - or @ could run as a formula in a spreadsheet.
    const safe = /^[=+\-@]/.test(s) ? `'${s}` : s;
    return /[",\n]/.test(safe) ? `"${safe.replaceAll('"', '""')}"` : safe;
  };
  const text = [header, ...rows].map((r) => r.map(cell).join(",")).join("\n") + "\n";
  const link = h("a", { href: URL.createObjectURL(new Blob([text], { type: "text/csv" })), download: filename });
  document.body.append(link);
  link.click();
  link.remove();
}

const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];

function ticks(lo, hi, count = 5) {
  if (hi === lo) return [lo];
  const step = (hi - lo) / (count - 1);
  return Array.from({ length: count }, (_, i) => lo + i * step);
}

function short(n) {
  const a = Math.abs(n);
  if (a >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (a >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
  if (a >= 10 || a === 0) return n.toFixed(0);
  return n.toPrecision(2);
}

// series: [{name, points: [[x, y], ...]}]. An accessible SVG line chart; each series' path
// carries data-series and data-points (its number of points).
export function lineChart(series, { title, xLabel = "", yLabel = "", width = 640, height = 260 } = {}) {
  const pad = { left: 52, right: 12, top: 12, bottom: 36 };
  const all = series.flatMap((s) => s.points);
  const svg = h("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title || yLabel });
  svg.append(h("title", {}, title || yLabel));
  if (!all.length) {
    svg.append(h("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "muted" }, "No points yet"));
    return svg;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(0, ...ys), Math.max(...ys)];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) y1 = y0 + 1;
  const X = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const Y = (y) => height - pad.bottom - ((y - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  const axes = h("g", { class: "axes" });
  for (const t of ticks(y0, y1)) {
    axes.append(h("line", { x1: pad.left, x2: width - pad.right, y1: Y(t), y2: Y(t), class: "grid" }),
      h("text", { x: pad.left - 6, y: Y(t) + 4, "text-anchor": "end" }, short(t)));
  }
  for (const t of ticks(x0, x1)) {
    axes.append(h("text", { x: X(t), y: height - pad.bottom + 16, "text-anchor": "middle" }, short(t)));
  }
  axes.append(h("text", { x: width / 2, y: height - 4, "text-anchor": "middle", class: "label" }, xLabel));
  svg.append(axes);
  series.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    svg.append(h("path", { d, fill: "none", stroke: color, "stroke-width": 2, dataset: { series: s.name, points: s.points.length } }));
    if (s.points.length === 1) svg.append(h("circle", { cx: X(s.points[0][0]), cy: Y(s.points[0][1]), r: 3, fill: color }));
  });
  const legend = h("div", { class: "legend" }, series.map((s, i) =>
    h("span", {}, h("i", { class: `swatch c${i % PALETTE.length}` }), s.name)));
  return h("figure", { class: "chart-box" }, svg, legend);
}

function fill(fraction) {
  const bar = h("span", { class: "bar-fill" });
  bar.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;  // CSSOM: allowed by the CSP
  return bar;
}

// bars: [{label, value}]; a horizontal bar chart (labels stay readable on a phone).
export function barChart(bars, { title = "", format = short } = {}) {
  const max = Math.max(0, ...bars.map((b) => b.value)) || 1;
  return h("figure", { class: "bars", "aria-label": title },
    title ? h("figcaption", {}, title) : null,
    bars.map((b) => h("div", { class: "bar-row", dataset: { label: b.label, value: b.value } },
      h("span", { class: "bar-label", title: b.label }, b.label),
      h("span", { class: "bar-track" }, fill(b.value / max)),
      h("span", { class: "bar-value num" }, format(b.value)))));
}
