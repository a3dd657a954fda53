// Evals: the tenant's evals, one eval's runs with each criterion's pass rate, one run's items
// (input, output, each criterion's result), and the eval's watches with their pass rate over
// their runs. All through /v1/evals.

import { api, clear, every, fmt, h, lineChart, listAll, showError, table } from "./console.js";

const $ = (id) => document.getElementById(id);
const state = { eval: null, run: null, active: false, stop: null };
const path = (...parts) => parts.map(encodeURIComponent).join("/");
const ACTIVE = new Set(["queued", "in_progress"]);

const badge = (status) => h("span", { class: `badge ${status}` }, status);

function remember(name, value) {
  const url = new URL(location.href);
  if (value) url.searchParams.set(name, value); else url.searchParams.delete(name);
  history.replaceState(null, "", url);
}

async function loadEvals() {
  const evals = await listAll("/v1/evals", { query: { order: "desc" } });
  clear($("evals"), table([
    { label: "Name", value: (e) => h("button", {
      type: "button", class: "link", "aria-current": e.id === state.eval?.id ? "true" : null,
      onclick: () => selectEval(e.id).catch(showError) }, e.name || e.id) },
    { label: "Criteria", value: (e) => e.testing_criteria.map((c) => c.name).join(", ") },
    { label: "Created", value: (e) => fmt.time(e.created_at) },
    { label: "ID", value: (e) => h("code", {}, e.id) },
  ], evals, { empty: "No evals yet: create one with the API (POST /v1/evals).", caption: "Evals" }));
}

async function selectEval(id) {
  if (state.stop) state.stop();
  state.eval = null;
  remember("eval", id);
  remember("run", null);
  $("eval").hidden = true;
  $("eval-missing").hidden = true;
  $("run").hidden = true;
  let ev;
  try {
    ev = await api(`/v1/evals/${path(id)}`);
  } catch (err) {
    if (err.status === 404) { $("eval-missing").hidden = false; return; }
    throw err;
  }
  state.eval = ev;
  $("runs-h").textContent = `Runs of ${ev.name || ev.id}`;
  clear($("criteria"), h("p", { class: "muted" }, "Criteria: ",
    ev.testing_criteria.flatMap((c, i) => [i ? ", " : "", h("code", {}, c.name), ` (${c.type})`])));
  $("eval").hidden = false;
  state.stop = every(2000, loadRuns, () => state.active);
  await Promise.all([loadEvals(), loadWatches()]);
}

// A criterion's result in a run: passed of graded (errored items count as not passed).
function rate(result) {
  const total = result.passed + result.failed + result.errored;
  return h("span", { class: "rate", dataset: { criterion: result.testing_criteria } },
    `${result.passed}/${total}`, total ? ` (${fmt.pct(result.passed / total)})` : "");
}

async function loadRuns() {
  const ev = state.eval;
  if (!ev) { state.active = false; return; }
  const runs = await listAll(`/v1/evals/${path(ev.id)}/runs`, { query: { order: "desc" }, max: 200 });
  if (state.eval?.id !== ev.id) return;
  state.active = runs.some((r) => ACTIVE.has(r.status));
  const names = [...new Set(runs.flatMap((r) => r.per_testing_criteria_results.map((c) => c.testing_criteria)))];
  clear($("runs"), table([
    { label: "Run", value: (r) => h("button", {
      type: "button", class: "link", "aria-current": r.id === state.run ? "true" : null,
      dataset: { run: r.id }, onclick: () => selectRun(r.id).catch(showError) }, r.name || r.id) },
    { label: "Model", value: (r) => r.model || "—" },
    { label: "Status", value: (r) => badge(r.status) },
    { label: "Items", numeric: true, value: (r) => `${r.result_counts.total}/${r.datasource_item_count}` },
    { label: "Passed", numeric: true, value: (r) => `${r.result_counts.passed}/${r.result_counts.total}` },
    ...names.map((name) => ({ label: name, numeric: true, value: (r) => {
      const result = r.per_testing_criteria_results.find((c) => c.testing_criteria === name);
      return result ? rate(result) : null;
    } })),
    { label: "Created", value: (r) => fmt.time(r.created_at) },
    { label: "Error", value: (r) => r.error?.message ? h("span", { class: "error" }, r.error.message) : null },
  ], runs, { empty: "No runs of this eval yet.", caption: "Runs, newest first" }));
}

function text(value) {
  return h("span", { class: "cell-text" }, typeof value === "string" ? value : JSON.stringify(value));
}

function inputOf(item) {
  const messages = item.sample?.input;
  if (Array.isArray(messages) && messages.length) return messages[messages.length - 1].content;
  return item.datasource_item;
}

function outputOf(item) {
  const messages = item.sample?.output;
  if (Array.isArray(messages) && messages.length) return messages.map((m) => m.content ?? "").join("\n");
  return item.sample?.output_text ?? null;
}

function verdictBadge(verdict) {
  const kind = { pass: "ok", fail: "failed", error: "error" }[verdict] || "";
  return h("span", { class: `badge ${kind}` }, verdict);
}

function resultCell(result) {
  if (!result) return null;
  return h("span", {}, verdictBadge(result.error ? "error" : result.passed ? "pass" : "fail"),
    result.score === null || result.score === undefined ? "" : ` ${fmt.num(result.score, 3)}`);
}

async function selectRun(runId) {
  const ev = state.eval;
  state.run = runId;
  remember("run", runId);
  const run = await api(`/v1/evals/${path(ev.id, "runs", runId)}`);
  const items = await listAll(`/v1/evals/${path(ev.id, "runs", runId, "output_items")}`, { max: 500 });
  if (state.eval?.id !== ev.id || state.run !== runId) return;
  $("run-h").textContent = `Run ${run.name || run.id}`;
  const counts = run.result_counts;
  clear($("run-summary"),
    h("div", { class: "stat" }, h("b", {}, badge(run.status)), h("span", {}, "status")),
    h("div", { class: "stat" }, h("b", {}, `${counts.passed}/${counts.total}`), h("span", {}, "items passed")),
    h("div", { class: "stat" }, h("b", {}, fmt.num(counts.errored)), h("span", {}, "errored")),
    h("div", { class: "stat" }, h("b", {}, run.model || "—"), h("span", {}, "model")));
  const names = [...new Set(items.flatMap((i) => i.results.map((r) => r.name)))];
  clear($("items"), table([
    { label: "#", numeric: true, value: (i) => String(i.datasource_item_id) },
    { label: "Status", value: (i) => verdictBadge(i.status) },
    { label: "Input", value: (i) => text(inputOf(i)) },
    { label: "Output", value: (i) => { const out = outputOf(i); return out === null ? null : text(out); } },
    ...names.map((name) => ({ label: name, value: (i) => resultCell(i.results.find((r) => r.name === name)) })),
  ], items, { empty: "No items graded yet.", caption: "Items" }));
  $("run").hidden = false;
  await loadRuns();
}

async function loadWatches() {
  const ev = state.eval;
  const watches = (await api(`/v1/evals/${path(ev.id)}/watches`)).data;
  if (state.eval?.id !== ev.id) return;
  clear($("watches"), table([
    { label: "Watch", value: (w) => w.name },
    { label: "Model", value: (w) => w.model },
    { label: "Enabled", value: (w) => (w.enabled ? "yes" : "no") },
    { label: "Every", numeric: true, value: (w) => `${fmt.num(w.interval_s)} s` },
    { label: "Pass rate", numeric: true, value: (w) => fmt.pct(w.pass_rate) },
    { label: "Accepted", numeric: true, value: (w) => fmt.pct(w.accepted_pass_rate) },
    { label: "Minimum", numeric: true, value: (w) => fmt.pct(w.min_pass_rate) },
    { label: "State", value: (w) => [
      w.regressed ? h("span", { class: "badge failed" }, "regressed") : null,
      w.below_threshold ? h("span", { class: "badge failed" }, "below threshold") : null,
      !w.regressed && !w.below_threshold ? h("span", { class: "badge ok" }, "ok") : null] },
    { label: "Next run", value: (w) => fmt.time(w.next_run_at) },
  ], watches, { empty: "No watches on this eval.", caption: "Watches" }));
  const charts = await Promise.all(watches.map(async (w) => {
    const runs = (await api(`/v1/evals/${path(ev.id, "watches", w.id, "runs")}`, { query: { limit: 50 } })).data
      .filter((r) => r.status === "completed" && r.pass_rate !== null);
    const criteria = [...new Set(runs.flatMap((r) => Object.keys(r.per_testing_criteria)))];
    const series = [
      { name: "all criteria", points: runs.map((r, i) => [i + 1, r.pass_rate]) },
      ...criteria.map((c) => ({ name: c, points: runs.flatMap((r, i) =>
        c in r.per_testing_criteria ? [[i + 1, r.per_testing_criteria[c]]] : []) })),
    ];
    return h("div", { class: "card", dataset: { watch: w.name } }, h("h3", {}, `${w.name}: pass rate by run`),
      lineChart(series, { title: `${w.name}: pass rate over its last ${runs.length} completed runs`, xLabel: "run" }));
  }));
  if (state.eval?.id === ev.id) clear($("watch-charts"), charts);
}

async function main() {
  await loadEvals();
  const params = new URL(location.href).searchParams;
  const wanted = params.get("eval");
  if (!wanted) return;
  const run = params.get("run");
  await selectEval(wanted);
  if (run && state.eval) await selectRun(run);
}

main().catch(showError);
