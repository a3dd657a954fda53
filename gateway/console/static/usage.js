// Usage: the ledger's numbers grouped by tenant, key, model or adapter, per day or month, over a
// date range; a bar chart, a table and the same rows as CSV. Members see their own tenant (the
// API forces it).
import { api, barChart, clear, downloadCsv, fmt, h, me, onSubmit, showError, table } from "./console.js";

const LABELS = { tenant_id: "Tenant", key_id: "Key", model: "Model", adapter: "Adapter" };
const names = { tenant_id: new Map(), key_id: new Map() };
let shown = null;  // {groups, period, rows}: what the table shows, for the CSV

const form = document.getElementById("usage-form");
const tokens = (r) => r.prompt_tokens + r.completion_tokens + r.trained_tokens;

function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

function label(group, value) {
  if (value === null || value === undefined) return group === "adapter" ? "(base model)" : "—";
  const name = names[group]?.get(value);
  return name ? `${name} (${value})` : String(value);
}

function query(data) {
  const q = { group_by: data.get("group_by"), period: data.get("period") || undefined };
  const start = data.get("start"), end = data.get("end");
  if (start) q.start = `${start}T00:00:00Z`;
  if (end) q.end = `${isoDay(new Date(Date.parse(`${end}T00:00:00Z`) + 86400000))}T00:00:00Z`;  // inclusive
  if (data.get("tenant_id")) q.tenant_id = data.get("tenant_id");
  return q;
}

function render(groups, period, rows, metric) {
  const rowLabel = (r) => [...groups.map((g) => label(g, r[g])), period ? r.period : null].filter(Boolean).join(" · ") || "all";
  const value = (r) => (metric === "tokens" ? tokens(r) : r[metric]);
  const title = { tokens: "Tokens", requests: "Requests", cost_usd: "Spend (USD)" }[metric];
  clear(document.getElementById("usage-chart"), rows.length
    ? barChart(rows.map((r) => ({ label: rowLabel(r), value: value(r) })), {
      title: `${title} per ${[...groups.map((g) => LABELS[g].toLowerCase()), period].filter(Boolean).join(" and ")}`,
      format: metric === "cost_usd" ? fmt.usd : (n) => fmt.num(n) })
    : h("p", { class: "empty" }, "No usage in this range."));
  clear(document.getElementById("usage-table"), table([
    ...groups.map((g) => ({ label: LABELS[g], value: (r) => label(g, r[g]) })),
    ...(period ? [{ label: period === "day" ? "Day" : "Month", value: (r) => r.period }] : []),
    { label: "Requests", numeric: true, value: (r) => fmt.num(r.requests) },
    { label: "Rejected", numeric: true, value: (r) => fmt.num(r.rejected) },
    { label: "Errors", numeric: true, value: (r) => fmt.num(r.errors) },
    { label: "Prompt tokens", numeric: true, value: (r) => fmt.num(r.prompt_tokens) },
    { label: "Cached", numeric: true, value: (r) => fmt.num(r.cached_tokens) },
    { label: "Completion tokens", numeric: true, value: (r) => fmt.num(r.completion_tokens) },
    { label: "Trained tokens", numeric: true, value: (r) => fmt.num(r.trained_tokens) },
    { label: "Spend", numeric: true, value: (r) => fmt.usd(r.cost_usd) },
    { label: "Device seconds", numeric: true, value: (r) => fmt.num(r.device_seconds, 1) },
  ], rows, { empty: "No usage in this range.", caption: "usage" }));
}

async function show(data) {
  const q = query(data);
  const groups = q.group_by ? q.group_by.split(",") : [];
  const { data: rows } = await api("/v1/usage", { query: q });
  shown = { groups, period: q.period, rows };
  render(groups, q.period, rows, data.get("metric"));
}

document.getElementById("u-csv").addEventListener("click", () => {
  if (!shown) return;
  const { groups, period, rows } = shown;
  const columns = ["requests", "rejected", "errors", "prompt_tokens", "cached_tokens", "completion_tokens",
    "trained_tokens", "cost_usd", "device_seconds"];
  downloadCsv(`usage-${[...groups, period].filter(Boolean).join("-") || "total"}.csv`,
    [...groups, ...(period ? ["period"] : []), ...columns],
    rows.map((r) => [...groups.map((g) => r[g]), ...(period ? [r.period] : []), ...columns.map((c) => r[c])]));
});

onSubmit(form, show);
form.elements.metric.addEventListener("change", () => {
  if (shown) render(shown.groups, shown.period, shown.rows, form.elements.metric.value);
});

async function start() {
  const today = new Date();
  form.elements.start.value = isoDay(new Date(today.getTime() - 29 * 86400000));
  form.elements.end.value = isoDay(today);
  if (me.isAdmin) {
    // Names for ids; the table still shows the id, which is what the API and CSV carry.
    const [tenants, keys] = await Promise.all([api("/admin/tenants"), api("/admin/keys")]);
    for (const t of tenants.data) {
      names.tenant_id.set(t.id, t.name);
      form.elements.tenant_id.append(h("option", { value: t.id }, t.name));
    }
    for (const k of keys.data) if (k.name) names.key_id.set(k.id, k.name);
  }
  await show(new FormData(form));
}

start().catch(showError);
