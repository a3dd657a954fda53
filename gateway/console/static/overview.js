// Overview: today's and this month's requests, tokens and spend (per tenant and per model),
// budgets used this period, and (admins) the engines' health, polled.
import { api, clear, every, fmt, h, me, showError, table } from "./console.js";

function dayStart(now = new Date()) {
  return new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate()));
}

function monthStart(now = new Date()) {
  return new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1));
}

const tokens = (r) => r.prompt_tokens + r.completion_tokens + r.trained_tokens;

function sum(rows) {
  const total = { requests: 0, tokens: 0, cost_usd: 0, rejected: 0, errors: 0 };
  for (const r of rows) {
    total.requests += r.requests;
    total.tokens += tokens(r);
    total.cost_usd += r.cost_usd;
    total.rejected += r.rejected;
    total.errors += r.errors;
  }
  return total;
}

function stat(label, value, name) {
  return h("div", { class: "stat", dataset: { stat: name } }, h("b", {}, value), h("span", {}, label));
}

function meter(fraction) {
  const fill = h("span", { class: `bar-fill${fraction >= 1 ? " over" : fraction >= 0.8 ? " near" : ""}` });
  fill.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;  // CSSOM: allowed by the CSP
  return h("span", { class: "bar-track meter", role: "meter", "aria-valuemin": 0, "aria-valuemax": 100,
    "aria-valuenow": Math.round(fraction * 100), "aria-label": "budget used" }, fill);
}

// Today's and this month's rows of one grouping, joined by the group's value.
async function byGroup(group) {
  const [month, today] = await Promise.all([
    api("/v1/usage", { query: { group_by: group, start: monthStart().toISOString() } }),
    api("/v1/usage", { query: { group_by: group, start: dayStart().toISOString() } }),
  ]);
  const todays = new Map(today.data.map((r) => [r[group], r]));
  return month.data.map((r) => ({ key: r[group], month: r, today: todays.get(r[group]) }))
    .sort((a, b) => b.month.cost_usd - a.month.cost_usd || b.month.requests - a.month.requests);
}

function groupTable(rows, label, name, caption) {
  const zero = { requests: 0, prompt_tokens: 0, completion_tokens: 0, trained_tokens: 0, cost_usd: 0, rejected: 0, errors: 0 };
  return table([
    { label, value: (r) => name(r.key) },
    { label: "Requests today", numeric: true, value: (r) => fmt.num((r.today || zero).requests) },
    { label: "Spend today", numeric: true, value: (r) => fmt.usd((r.today || zero).cost_usd) },
    { label: "Requests this month", numeric: true, value: (r) => fmt.num(r.month.requests) },
    { label: "Tokens this month", numeric: true, value: (r) => fmt.num(tokens(r.month)) },
    { label: "Spend this month", numeric: true, value: (r) => fmt.usd(r.month.cost_usd) },
    { label: "Rejected", numeric: true, value: (r) => fmt.num(r.month.rejected) },
    { label: "Errors", numeric: true, value: (r) => fmt.num(r.month.errors) },
  ], rows, { empty: "No requests this month.", caption });
}

async function usage(names) {
  const [tenants, models] = await Promise.all([me.isAdmin ? byGroup("tenant_id") : null, byGroup("model")]);
  const today = sum(models.map((r) => r.today).filter(Boolean));
  const month = sum(models.map((r) => r.month));
  clear(document.getElementById("totals"),
    stat("requests today", fmt.num(today.requests), "requests-today"),
    stat("tokens today", fmt.num(today.tokens), "tokens-today"),
    stat("spend today", fmt.usd(today.cost_usd), "spend-today"),
    stat("requests this month", fmt.num(month.requests), "requests-month"),
    stat("tokens this month", fmt.num(month.tokens), "tokens-month"),
    stat("spend this month", fmt.usd(month.cost_usd), "spend-month"),
    stat("rejected this month", fmt.num(month.rejected), "rejected-month"),
    stat("errors this month", fmt.num(month.errors), "errors-month"));
  if (tenants) {
    clear(document.getElementById("by-tenant"),
      groupTable(tenants, "Tenant", (id) => names.get(id) || id, "usage per tenant"));
  }
  clear(document.getElementById("by-model"), groupTable(models, "Model", (m) => m, "usage per model"));
}

async function budgets(names) {
  const { data } = await api("/v1/usage/budgets");
  clear(document.getElementById("budgets"), table([
    { label: "Budget of", value: (b) => b.scope === "tenant" ? `tenant ${names.get(b.id) || b.name || b.id}` : `key ${b.name || b.id}` },
    { label: "Period", value: (b) => `${b.period} from ${fmt.time(b.period_start).slice(0, 10)}` },
    { label: "Spent", numeric: true, value: (b) => fmt.usd(b.spent_usd) },
    { label: "Budget", numeric: true, value: (b) => fmt.usd(b.budget_usd) },
    { label: "Used", value: (b) => {
      const used = b.budget_usd > 0 ? b.spent_usd / b.budget_usd : (b.spent_usd > 0 ? 1 : 0);
      return h("span", { class: "used" }, meter(used), ` ${fmt.pct(used)}`);
    } },
  ], data, { empty: "No tenant or key has a budget.", caption: "budgets" }));
}

function badge(text, kind) {
  return h("span", { class: `badge ${kind}` }, text);
}

function engineModel(m) {
  const rows = m.pools.flatMap((p) => p.replicas.map((r) => ({ pool: p, r })));
  return h("div", { class: "engine", dataset: { model: m.model } },
    h("h3", {}, m.model, " ",
      badge(`${m.healthy_replicas}/${m.replicas} healthy`, m.healthy_replicas === m.replicas ? "healthy" : m.healthy_replicas ? "half_open" : "unhealthy"),
      m.queued ? h("span", { class: "muted" }, ` · ${m.queued} queued at the gateway`) : null),
    table([
      { label: "Pool", value: ({ pool }) => `${pool.device} (priority ${pool.priority})` },
      { label: "Replica", value: ({ r }) => h("span", {}, `#${r.index} `, h("code", {}, r.url)) },
      { label: "Health", value: ({ r }) => badge(r.healthy ? "healthy" : "unhealthy", r.healthy ? "healthy" : "unhealthy") },
      { label: "Circuit", value: ({ r }) => badge(r.circuit.state.replace("_", "-"), r.circuit.state) },
      { label: "Adapters", value: ({ r }) => r.adapters.length ? r.adapters.join(", ") : "—" },
      { label: "KV cache", numeric: true, value: ({ r }) => fmt.pct(r.kv_cache_usage) },
      { label: "Waiting", numeric: true, value: ({ r }) => fmt.num(r.waiting) },
      { label: "Running", numeric: true, value: ({ r }) => fmt.num(r.running) },
      { label: "In flight", numeric: true, value: ({ r }) => `${r.in_flight}/${r.max_concurrency}` },
    ], rows, { caption: `replicas of ${m.model}` }));
}

async function engines() {
  const { data } = await api("/admin/engines");
  clear(document.getElementById("engines"), data.length ? data.map(engineModel) : h("p", { class: "empty" }, "No models are configured."));
}

async function start() {
  let names = new Map();
  if (me.isAdmin) {
    try {
      names = new Map((await api("/admin/tenants")).data.map((t) => [t.id, t.name]));
    } catch (err) { showError(err); }
  }
  await Promise.all([usage(names), budgets(names)].map((p) => p.catch(showError)));
  if (me.isAdmin) every(5000, engines);
}

start();
