// Fine-tuning: the tenant's jobs; a selected job's live loss curve (from its events), its
// checkpoints, events and promotion verdict, with Cancel while it runs; and a form that uploads
// the data (`/v1/files`) and starts a job (`/v1/fine_tuning/jobs`), then follows it.

import { api, clear, every, fmt, h, listAll, lineChart, notify, onSubmit, showError, table } from "./console.js";

const JOBS = "/v1/fine_tuning/jobs";
const DONE = new Set(["succeeded", "failed", "cancelled"]);

const $ = (id) => document.getElementById(id);
// `generation` counts selections: an answer for an earlier one is dropped.
const state = { jobs: [], selected: null, generation: 0, events: [], newest: 0, stopFollowing: null };

const eventNumber = (id) => Number(String(id).replace("ftevent-", "")) || 0;
const badge = (status) => h("span", { class: `badge ${status}` }, status.replaceAll("_", " "));

// ---- the jobs list ------------------------------------------------------------------------

async function loadJobs() {
  const jobs = await listAll(JOBS, { max: 200 });
  // Re-drawn only when something changed: a redraw would take the keyboard focus away.
  const shape = (list) => JSON.stringify(list.map((j) => [j.id, j.status, j.trained_tokens, j.fine_tuned_model]));
  if (state.jobs.length && shape(jobs) === shape(state.jobs)) return;
  state.jobs = jobs;
  renderJobs();
}

function renderJobs() {
  const rows = state.jobs;
  clear($("jobs"), table([
    { label: "Job", value: (j) => h("button", { type: "button", class: "linkish", dataset: { job: j.id },
      "aria-pressed": String(j.id === state.selected), onclick: () => select(j.id) }, j.id) },
    { label: "Status", value: (j) => badge(j.status) },
    { label: "Model", value: (j) => j.model },
    { label: "Method", value: (j) => j.method?.type || "supervised" },
    { label: "Created", value: (j) => fmt.time(j.created_at) },
    { label: "Trained tokens", value: (j) => fmt.num(j.trained_tokens), numeric: true },
    { label: "Fine-tuned model", value: (j) => j.fine_tuned_model },
  ], rows, { empty: "No fine-tuning jobs yet: start one below.", caption: "Fine-tuning jobs, newest first" }));
  const chosen = $("jobs").querySelector(`button[data-job="${CSS.escape(state.selected || "")}"]`);
  chosen?.closest("tr").classList.add("selected");
}

// ---- one job ------------------------------------------------------------------------------

async function select(jobId) {
  if (state.stopFollowing) state.stopFollowing();
  const generation = state.generation + 1;
  Object.assign(state, { selected: jobId, generation, events: [], newest: 0, job: null, checkpoints: 0 });
  renderJobs();
  $("job").hidden = false;
  $("job-title").textContent = jobId;
  for (const id of ["job-summary", "loss-chart", "reward-chart", "verdict", "checkpoints", "events"]) clear($(id));
  $("loss-chart").append(h("p", { class: "muted" }, "Loading…"));
  let ended = 0;
  // Follow until the job ends, then once more (the events written after its last status).
  const current = () => state.generation === generation;
  state.stopFollowing = every(1500, async () => {
    if (current() && await refreshJob(jobId, current)) ended += 1;
  }, () => ended < 2 && current());
}

// Returns whether the job has ended (nothing more to follow).
async function refreshJob(jobId, current) {
  const held = state.events.length;
  const [job, , checkpoints] = await Promise.all([
    api(`${JOBS}/${encodeURIComponent(jobId)}`),
    newEvents(jobId, current),
    api(`${JOBS}/${encodeURIComponent(jobId)}/checkpoints`),
  ]);
  if (!current()) return true;
  const known = state.jobs.findIndex((j) => j.id === job.id);
  if (known >= 0 && state.jobs[known].status !== job.status) { state.jobs[known] = job; renderJobs(); }
  const first = !state.job;
  state.job = job;
  renderSummary(job);
  renderVerdict(job);
  if (first || state.events.length !== held) {
    renderCharts(job);
    renderEvents();
  }
  if (first || checkpoints.data.length !== state.checkpoints) {
    state.checkpoints = checkpoints.data.length;
    renderCheckpoints(checkpoints.data);
  }
  return DONE.has(job.status);
}

// The events since the newest one seen. The API lists newest first and pages back with
// `after`: read pages until one reaches an event already held.
async function newEvents(jobId, current) {
  const fresh = [];
  let after;
  for (;;) {
    const page = await api(`${JOBS}/${encodeURIComponent(jobId)}/events`, { query: { limit: 500, after } });
    const unseen = page.data.filter((e) => eventNumber(e.id) > state.newest);
    fresh.push(...unseen);
    if (!page.has_more || unseen.length < page.data.length || !page.data.length) break;
    after = page.data[page.data.length - 1].id;
  }
  if (!current() || !fresh.length) return;
  state.newest = Math.max(state.newest, ...fresh.map((e) => eventNumber(e.id)));
  state.events.push(...fresh.reverse());  // kept oldest first
}

function fact(term, ...value) {
  return [h("dt", {}, term), h("dd", {}, ...value)];
}

function renderSummary(job) {
  const method = job.method?.type || "supervised";
  const hp = job.method?.[method]?.hyperparameters || job.hyperparameters || {};
  const lora = job.lora || {};
  const mlflow = (job.integrations || []).find((i) => i.type === "mlflow")?.mlflow?.run;
  clear($("job-summary"),
    fact("Status", badge(job.status)),
    fact("Base model", job.model),
    fact("Method", method + (method === "dpo" ? ` (beta ${hp.beta})` : "")),
    fact("Hyperparameters", `${hp.n_epochs} epochs, batch ${hp.batch_size}, learning rate ×${hp.learning_rate_multiplier}`),
    fact("LoRA", `r ${lora.r}, alpha ${lora.alpha}, dropout ${lora.dropout}, ${lora.quantization === "nf4" ? "QLoRA (NF4)" : "no quantization"}`
      + `${lora.devices ? `, ${lora.devices} devices` : ""}${lora.gradient_checkpointing ? ", gradient checkpointing" : ""}`),
    fact("Training file", job.training_file),
    fact("Validation file", job.validation_file || "—"),
    fact("Created", fmt.time(job.created_at)),
    fact("Finished", fmt.time(job.finished_at)),
    fact("Trained tokens", fmt.num(job.trained_tokens)),
    fact("Fine-tuned model", job.fine_tuned_model
      ? h("a", { href: `/console/playground?model=${encodeURIComponent(job.fine_tuned_model)}` }, job.fine_tuned_model) : "—"),
    mlflow ? fact("MLflow run", h("a", { href: mlflow.url, rel: "noopener noreferrer", target: "_blank" }, mlflow.run_id)) : null,
    job.error ? fact("Error", h("span", { class: "error" }, job.error.message + (job.error.param ? ` (${job.error.param})` : ""))) : null,
  );
  $("cancel-job").hidden = DONE.has(job.status);
}

function renderCharts(job) {
  const steps = state.events.filter((e) => e.type === "metrics" && e.data);
  const checkpoints = state.events.filter((e) => e.type !== "metrics" && e.data?.valid_loss !== undefined && e.data?.valid_loss !== null);
  const series = [{ name: "training loss", points: steps.map((e) => [e.data.step, e.data.train_loss]) }];
  if (checkpoints.length || job.validation_file) {
    series.push({ name: "validation loss", points: checkpoints.map((e) => [e.data.step, e.data.valid_loss]) });
  }
  const last = steps[steps.length - 1]?.data;
  const progress = last ? h("p", { class: "muted", id: "progress" },
    `Step ${last.step} of ${last.total_steps}: training loss ${last.train_loss.toFixed(4)}, ${fmt.num(last.tokens_per_s)} tokens/s`) : null;
  clear($("loss-chart"), lineChart(series, { title: "Loss by step", xLabel: "step" }), progress);
  // DPO: how far, and how often, the adapter prefers the preferred answers.
  const rewards = steps.filter((e) => typeof e.data.reward_margin === "number");
  if (!rewards.length) { clear($("reward-chart")); return; }
  clear($("reward-chart"), h("h3", {}, "Rewards (DPO)"), lineChart([
    { name: "reward margin", points: rewards.map((e) => [e.data.step, e.data.reward_margin]) },
    { name: "reward accuracy", points: rewards.map((e) => [e.data.step, e.data.reward_accuracy]) },
  ], { title: "Reward margin and accuracy by step", xLabel: "step" }));
}

function renderVerdict(job) {
  const verdict = job.result?.evaluation;
  if (!job.evaluation && !verdict) { clear($("verdict")); return; }
  const box = h("div", { class: "card verdict" }, h("h3", {}, "Promotion"));
  if (!verdict) {
    box.append(h("p", { class: "muted" }, `Base and adapter are evaluated after training (${job.evaluation.promote === "if_better" ? "served only if it beats the base" : "served either way"}).`));
  } else if (verdict.state === "evaluating") {
    box.append(h("p", {}, badge("running"), " Evaluating the base model and the adapter…"));
  } else {
    box.append(h("p", {}, h("span", { class: `badge ${verdict.promoted ? "succeeded" : "failed"}` }, verdict.promoted ? "promoted" : "held back"), " ", verdict.reason));
    const runs = ["base", "adapter"].filter((r) => verdict[r]).map((r) => ({ role: r, ...verdict[r] }));
    box.append(table([
      { label: "Run", value: (r) => r.role },
      { label: "Model", value: (r) => r.model },
      { label: "Status", value: (r) => badge(r.status) },
      { label: "Passed", value: (r) => `${r.passed_items} of ${r.items}`, numeric: true },
      { label: "Pass rate", value: (r) => fmt.pct(r.pass_rate), numeric: true },
    ], runs, { empty: "No eval runs.", caption: verdict.eval_id ? `Eval ${verdict.eval_id}` : "Eval runs" }));
  }
  clear($("verdict"), box);
}

function renderCheckpoints(rows) {
  const metric = (name, digits = 4) => (c) => fmt.num(c.metrics?.[name], digits);
  const dpo = rows.some((c) => c.metrics?.valid_reward_accuracy !== undefined);
  clear($("checkpoints"), table([
    { label: "Step", value: (c) => c.step_number, numeric: true },
    { label: "Created", value: (c) => fmt.time(c.created_at) },
    { label: "Training loss", value: metric("train_loss"), numeric: true },
    { label: "Validation loss", value: metric("valid_loss"), numeric: true },
    ...(dpo ? [{ label: "Validation reward accuracy", value: (c) => fmt.pct(c.metrics.valid_reward_accuracy), numeric: true }] : []),
    { label: "Checkpoint", value: (c) => h("code", {}, c.fine_tuned_model_checkpoint) },
  ], rows, { empty: "No checkpoints yet.", caption: "Checkpoints, newest first" }));
}

const SHOWN_EVENTS = 200;

function renderEvents() {
  const newest = state.events.slice(-SHOWN_EVENTS).reverse();
  clear($("events"), table([
    { label: "Time", value: (e) => fmt.time(e.created_at) },
    { label: "Level", value: (e) => h("span", { class: `badge ${e.level === "error" ? "failed" : e.level === "warn" ? "running" : ""}` }, e.level) },
    { label: "Message", value: (e) => e.message },
  ], newest, { empty: "No events yet.", caption: state.events.length > SHOWN_EVENTS
    ? `The newest ${SHOWN_EVENTS} of ${state.events.length} events` : "Events, newest first" }));
}

$("cancel-job").addEventListener("click", async (event) => {
  const button = event.currentTarget;
  const jobId = state.selected;
  if (!jobId) return;
  button.disabled = true;
  try {
    const job = await api(`${JOBS}/${encodeURIComponent(jobId)}/cancel`, { method: "POST" });
    notify(`Cancelling ${jobId}.`, "ok");
    const known = state.jobs.findIndex((j) => j.id === job.id);
    if (known >= 0) state.jobs[known] = job;
    await select(jobId);  // follow it to its end
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
});

// ---- starting a job -----------------------------------------------------------------------

async function loadModels() {
  const models = (await api("/v1/models")).data.filter((m) => m.kind !== "embedding" && !m.parent);
  clear($("base-model"), models.map((m) => h("option", { value: m.id }, m.id)));
}

$("method").addEventListener("change", () => { $("beta-field").hidden = $("method").value !== "dpo"; });

async function upload(file) {
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file, file.name);
  return api("/v1/files", { method: "POST", form });
}

const number = (data, name) => {
  const value = String(data.get(name) ?? "").trim();
  return value === "" ? undefined : Number(value);
};

onSubmit($("create-job"), async (data, form) => {
  const training = data.get("training_file");
  const validation = data.get("validation_file");
  const method = data.get("method");
  const hyperparameters = Object.fromEntries(["n_epochs", "batch_size", "learning_rate_multiplier", "beta"]
    .filter((name) => name !== "beta" || method === "dpo")
    .map((name) => [name, number(data, name) ?? "auto"]));
  const lora = {
    r: number(data, "r"), alpha: number(data, "alpha"), dropout: number(data, "dropout"),
    quantization: data.get("quantization"), checkpoint_every: number(data, "checkpoint_every"),
    devices: number(data, "devices"), gradient_checkpointing: data.get("gradient_checkpointing") === "on",
  };
  const trainingFile = await upload(training);
  const validationFile = validation && validation.size ? await upload(validation) : null;
  const body = {
    model: data.get("model"), training_file: trainingFile.id,
    validation_file: validationFile?.id, suffix: String(data.get("suffix") || "").trim() || undefined,
    method: { type: method, [method]: { hyperparameters } }, lora,
  };
  if (data.get("promote")) body.evaluation = { promote: data.get("promote") };
  const job = await api(JOBS, { method: "POST", json: body });
  notify(`Started ${job.id}.`, "ok");
  form.reset();
  $("beta-field").hidden = true;
  state.jobs = [job, ...state.jobs.filter((j) => j.id !== job.id)];
  await select(job.id);
  $("job").scrollIntoView({ block: "start" });
});

// ---- start --------------------------------------------------------------------------------

loadModels().catch(showError);
// The list keeps up with jobs started elsewhere (the CLI, the SDK).
every(5000, loadJobs);
const wanted = new URLSearchParams(location.search).get("job");
if (wanted) select(wanted);
