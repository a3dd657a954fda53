// Vector stores: the tenant's stores, one store's files with their ingestion status (polled
// until every file is completed or failed), upload-and-attach, search with the query's terms
// highlighted in each hit, and a cited answer from the store's documents. All through /v1.

import { api, clear, every, fmt, h, listAll, notify, onSubmit, showError, table } from "./console.js";

const $ = (id) => document.getElementById(id);
const state = { store: null, names: new Map(), pending: false, stop: null };
const path = (...parts) => parts.map(encodeURIComponent).join("/");

const badge = (status) => h("span", { class: `badge ${status}` }, status);

async function loadStores() {
  const stores = await listAll("/v1/vector_stores");
  clear($("stores"), table([
    { label: "Name", value: (s) => h("button", {
      type: "button", class: "link", "aria-current": s.id === state.store?.id ? "true" : null,
      onclick: () => select(s.id).catch(showError) }, s.name || s.id) },
    { label: "Status", value: (s) => badge(s.status) },
    { label: "Files", numeric: true, value: (s) => fmt.num(s.file_counts.total) },
    { label: "Completed", numeric: true, value: (s) => fmt.num(s.file_counts.completed) },
    { label: "In progress", numeric: true, value: (s) => fmt.num(s.file_counts.in_progress) },
    { label: "Failed", numeric: true, value: (s) => fmt.num(s.file_counts.failed) },
    { label: "Size", numeric: true, value: (s) => fmt.bytes(s.usage_bytes) },
    { label: "Created", value: (s) => fmt.time(s.created_at) },
    { label: "ID", value: (s) => h("code", {}, s.id) },
  ], stores, { empty: "No vector stores yet: create one above.", caption: "Vector stores" }));
}

function stat(label, value) {
  return h("div", { class: "stat" }, h("b", {}, value), h("span", {}, label));
}

async function select(id) {
  if (state.stop) state.stop();
  state.store = null;
  const url = new URL(location.href);
  url.searchParams.set("store", id);
  history.replaceState(null, "", url);
  $("store").hidden = true;
  $("store-missing").hidden = true;
  let store;
  try {
    store = await api(`/v1/vector_stores/${path(id)}`);
  } catch (err) {
    // Another tenant's store is missing to this key, exactly as the API says.
    if (err.status === 404) { $("store-missing").hidden = false; return; }
    throw err;
  }
  state.store = store;
  $("store-h").textContent = `Store: ${store.name || store.id}`;
  clear($("hits"));
  clear($("answer"));
  $("store").hidden = false;
  poll();
  await loadStores();
}

function showStats(store) {
  clear($("store-stats"),
    stat("files", fmt.num(store.file_counts.total)),
    stat("completed", fmt.num(store.file_counts.completed)),
    stat("in progress", fmt.num(store.file_counts.in_progress)),
    stat("failed", fmt.num(store.file_counts.failed)),
    stat("size", fmt.bytes(store.usage_bytes)),
    stat("status", badge(store.status)));
}

async function refreshFiles() {
  const id = state.store?.id;
  if (!id) { state.pending = false; return; }
  const [attached, store] = await Promise.all([
    listAll(`/v1/vector_stores/${path(id)}/files`), api(`/v1/vector_stores/${path(id)}`)]);
  if (state.store?.id !== id) return;
  // A store's file objects carry no filename (as OpenAI's): the files API has them.
  if (attached.some((f) => !state.names.has(f.id))) {
    for (const f of await listAll("/v1/files", { query: { purpose: "assistants" }, max: 10000 })) {
      state.names.set(f.id, f.filename);
    }
  }
  const was = state.pending;
  state.pending = attached.some((f) => f.status === "in_progress");
  state.store = store;
  showStats(store);
  clear($("files"), table([
    { label: "File", value: (f) => state.names.get(f.id) ?? f.id },
    { label: "Status", value: (f) => badge(f.status) },
    { label: "Error", value: (f) => f.last_error
      ? h("span", { class: "error" }, `${f.last_error.code}: ${f.last_error.message}`) : null },
    { label: "Size", numeric: true, value: (f) => fmt.bytes(f.usage_bytes) },
    { label: "Attached", value: (f) => fmt.time(f.created_at) },
    { label: "ID", value: (f) => h("code", {}, f.id) },
  ], attached, { empty: "No files in this store yet.", caption: "Files" }));
  if (was && !state.pending) await loadStores();
}

function poll() {
  if (state.stop) state.stop();
  state.pending = true;
  state.stop = every(1000, refreshFiles, () => state.pending);
}

// The query's words as <mark> nodes in the hit's text (built as DOM nodes, never as HTML).
const STOP = new Set(["the", "and", "for", "how", "what", "which", "who", "does", "with",
  "from", "that", "this", "are", "was", "can", "you", "your", "my", "is", "of", "to", "in",
  "a", "an", "do", "i", "it", "on", "or"]);

export function highlight(text, query) {
  const terms = [...new Set((query.toLowerCase().match(/[\p{L}\p{N}]+/gu) || [])
    .filter((t) => t.length > 1 && !STOP.has(t)))];
  if (!terms.length) return [text];
  const escaped = terms.map((t) => t.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
  const pattern = new RegExp(`(${escaped.join("|")})`, "giu");
  return text.split(pattern).map((part, i) => (i % 2 ? h("mark", {}, part) : part));
}

function showHits(hits, query) {
  if (!hits.length) {
    clear($("hits"), h("p", { class: "empty" }, "No passage of this store matches."));
    return;
  }
  clear($("hits"), h("ol", { class: "hits" }, hits.map((hit) => h("li", { class: "hit" },
    h("div", { class: "hit-head" }, h("strong", { class: "hit-file" }, hit.filename),
      h("span", { class: "badge" }, `score ${fmt.num(hit.score, 3)}`)),
    h("p", { class: "hit-text" },
      highlight(hit.content.map((c) => c.text).join("\n"), query))))));
}

function showAnswer(reply) {
  const text = reply.choices?.[0]?.message?.content ?? "";
  const citations = reply.citations || [];
  if (!citations.length) {  // the gateway answered itself: no source was relevant enough
    clear($("answer"), h("div", { class: "answer not-found" },
      h("span", { class: "badge failed" }, "Not in the documents"), h("p", {}, text)));
    return;
  }
  clear($("answer"), h("div", { class: "answer" },
    h("p", { class: "msg assistant" }, text),
    h("h3", {}, "Sources"),
    h("ol", { class: "citations" }, citations.map((c) => h("li", { class: "citation" },
      h("strong", {}, `[${c.index}] ${c.filename}`), " ",
      h("span", { class: "muted" }, `score ${fmt.num(c.score, 3)}`),
      h("blockquote", {}, c.quote))))));
}

async function loadModels() {
  const models = (await api("/v1/models")).data.filter((m) => m.kind !== "embedding");
  clear($("ask-model"), models.map((m) => h("option", { value: m.id }, m.id)));
}

onSubmit($("create-store"), async (data, form) => {
  const store = await api("/v1/vector_stores", { method: "POST", json: { name: String(data.get("name")).trim() } });
  form.reset();
  notify(`Created ${store.name}.`, "ok");
  await select(store.id);
});

onSubmit($("upload"), async (data, form) => {
  const file = data.get("file");
  const id = state.store.id;
  const body = new FormData();
  body.append("purpose", "assistants");
  body.append("file", file, file.name);
  const uploaded = await api("/v1/files", { method: "POST", form: body });
  state.names.set(uploaded.id, uploaded.filename);
  await api(`/v1/vector_stores/${path(id)}/files`, { method: "POST", json: { file_id: uploaded.id } });
  form.reset();
  notify(`${uploaded.filename} uploaded: ingesting.`, "ok");
  poll();
});

onSubmit($("search"), async (data) => {
  const query = String(data.get("query")).trim();
  clear($("hits"), h("p", { class: "muted" }, "Searching…"));
  const page = await api(`/v1/vector_stores/${path(state.store.id)}/search`, {
    method: "POST", json: { query, max_num_results: 10 } });
  showHits(page.data, query);
});

onSubmit($("ask"), async (data) => {
  clear($("answer"), h("p", { class: "muted" }, "Answering…"));
  try {
    showAnswer(await api("/v1/chat/completions", { method: "POST", json: {
      model: data.get("model"), temperature: 0, max_tokens: 200,
      messages: [{ role: "user", content: String(data.get("question")).trim() }],
      retrieval: { vector_store_ids: [state.store.id] } } }));
  } catch (err) {
    clear($("answer"));
    throw err;
  }
});

async function main() {
  await Promise.all([loadStores(), loadModels()]);
  const wanted = new URL(location.href).searchParams.get("store");
  if (wanted) await select(wanted);
}

main().catch(showError);
