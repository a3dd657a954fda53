// Playground: chat with any model or adapter the key may use, streamed token by token from
// `/v1/chat/completions`, with a Stop button; the same request is shown as curl and as Python
// (the openai SDK) to copy, with a placeholder where the API key goes.

import { api, clear, events, h, notify, showError } from "./console.js";

const $ = (id) => document.getElementById(id);
const history = [];  // the conversation so far: {role, content}
let running = null;  // the AbortController of the answer being streamed

async function loadModels() {
  const models = (await api("/v1/models")).data.filter((m) => m.kind !== "embedding");
  const wanted = new URLSearchParams(location.search).get("model");
  clear($("pg-model"), models.map((m) => h("option", { value: m.id, selected: m.id === wanted },
    m.parent ? `${m.id} (adapter of ${m.parent})` : m.id)));
  if (!models.length) notify("This key may use no chat model.");
  renderCode();
}

// The request as it would be sent now: the conversation plus the message being typed.
function request() {
  const system = $("pg-system").value.trim();
  const typed = $("pg-input").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...history,
    ...(typed ? [{ role: "user", content: typed }] : [])];
  const body = { model: $("pg-model").value, messages };
  const temperature = $("pg-temperature").value, maxTokens = $("pg-max-tokens").value;
  if (temperature !== "") body.temperature = Number(temperature);
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  body.stream = true;
  return body;
}

const shellQuote = (text) => `'${text.replaceAll("'", `'"'"'`)}'`;

function renderCode() {
  const body = request();
  const base = `${location.origin}/v1`;
  $("code-curl").textContent = [
    `curl ${base}/chat/completions \\`,
    `  -H "Authorization: Bearer $OPENAI_API_KEY" \\`,
    `  -H "Content-Type: application/json" \\`,
    `  -d ${shellQuote(JSON.stringify(body, null, 2))}`,
  ].join("\n");
  // JSON strings are Python string literals; the messages hold nothing else.
  const messages = body.messages.map((m) => `        {"role": ${JSON.stringify(m.role)}, "content": ${JSON.stringify(m.content)}},`);
  $("code-python").textContent = [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(base)}, api_key=os.environ["OPENAI_API_KEY"])`,
    "stream = client.chat.completions.create(",
    `    model=${JSON.stringify(body.model)},`,
    "    messages=[",
    ...messages,
    "    ],",
    ...(body.temperature !== undefined ? [`    temperature=${body.temperature},`] : []),
    ...(body.max_tokens !== undefined ? [`    max_tokens=${body.max_tokens},`] : []),
    "    stream=True,",
    ")",
    "for chunk in stream:",
    "    if chunk.choices and chunk.choices[0].delta.content:",
    "        print(chunk.choices[0].delta.content, end=\"\", flush=True)",
  ].join("\n");
}

function bubble(role, text) {
  $("chat").querySelector(".empty")?.remove();
  const node = h("div", { class: `msg ${role}`, dataset: { role } }, h("span", { class: "text" }, text));
  $("chat").append(node);
  return node;
}

function setRunning(controller) {
  running = controller;
  $("pg-send").disabled = controller !== null;
  $("pg-stop").disabled = controller === null;
}

async function send() {
  const body = request();
  const typed = $("pg-input").value.trim();
  if (!typed || running) return;
  body.stream_options = { include_usage: true };
  history.push({ role: "user", content: typed });
  bubble("user", typed);
  $("pg-input").value = "";
  const answer = bubble("assistant", "");
  answer.dataset.state = "streaming";
  const text = answer.querySelector(".text").appendChild(document.createTextNode(""));
  const controller = new AbortController();
  setRunning(controller);
  let finish = null, usage = null, outcome = "done";
  try {
    const response = await api("/v1/chat/completions", { method: "POST", json: body, raw: true, signal: controller.signal });
    for await (const chunk of events(response)) {
      if (chunk.error) throw Object.assign(new Error(chunk.error.message), chunk.error);
      const choice = chunk.choices?.[0];
      if (choice?.delta?.content) text.appendData(choice.delta.content);  // token by token
      if (choice?.finish_reason) finish = choice.finish_reason;
      if (chunk.usage) usage = chunk.usage;
    }
  } catch (err) {
    if (controller.signal.aborted) outcome = "stopped";
    else { outcome = "error"; showError(err); }
  } finally {
    setRunning(null);
  }
  if (text.data) history.push({ role: "assistant", content: text.data });
  answer.dataset.state = outcome;
  const meta = [outcome === "stopped" ? "stopped" : null, finish ? `finish: ${finish}` : null,
    usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : null].filter(Boolean);
  if (meta.length) answer.append(h("span", { class: "meta" }, meta.join(" · ")));
  renderCode();
}

$("pg-form").addEventListener("submit", (event) => { event.preventDefault(); send(); });
$("pg-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); send(); }
});
$("pg-stop").addEventListener("click", () => running?.abort());
$("pg-clear").addEventListener("click", () => {
  running?.abort();
  history.length = 0;
  clear($("chat"), h("p", { class: "empty" }, "Send a message to start."));
  renderCode();
});
for (const id of ["pg-model", "pg-system", "pg-temperature", "pg-max-tokens", "pg-input"]) {
  $(id).addEventListener("input", renderCode);
}

async function copy(id) {
  const text = $(id).textContent;
  try {
    await navigator.clipboard.writeText(text);
    notify("Copied.", "ok");
  } catch {
    // No clipboard permission: select the text so that Ctrl+C copies it.
    getSelection().selectAllChildren($(id));
    notify("Selected: press Ctrl+C to copy.", "ok");
  }
}
$("copy-curl").addEventListener("click", () => copy("code-curl"));
$("copy-python").addEventListener("click", () => copy("code-python"));

renderCode();
loadModels().catch(showError);
