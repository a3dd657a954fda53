// Tenants and keys (admins): list and create tenants; edit a tenant's limits, budget, weight
// and guardrail policy; disable it; create keys (the plain key shown once) and revoke them.
import { api, clear, fmt, h, notify, onSubmit, showError, table } from "./console.js";

let tenants = [];
let selected = null;

// An admin object's times come as ISO strings (stored UTC), `last_used_at` as epoch seconds.
function when(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "number") return fmt.time(value);
  const iso = /[zZ]|[+-]\d\d:\d\d$/.test(value) ? value : `${value}Z`;
  return fmt.time(Date.parse(iso) / 1000);
}

// A number field: empty means "no limit" (null), which PATCH takes as "clear it".
function number(form, name) {
  const raw = form.get(name);
  return raw === null || String(raw).trim() === "" ? null : Number(raw);
}

function limitsOf(form) {
  return {
    rpm_limit: number(form, "rpm_limit"),
    tpm_limit: number(form, "tpm_limit"),
    budget_usd: number(form, "budget_usd"),
    budget_period: form.get("budget_period") || "month",
  };
}

function limitsText(o) {
  const parts = [];
  if (o.rpm_limit) parts.push(`${fmt.num(o.rpm_limit)} rpm`);
  if (o.tpm_limit) parts.push(`${fmt.num(o.tpm_limit)} tpm`);
  return parts.length ? parts.join(", ") : "none";
}

function budgetText(o) {
  return o.budget_usd === null ? "none" : `${fmt.usd(o.budget_usd)} / ${o.budget_period}`;
}

// A destructive button asks once more on its first press, instead of a blocking dialog.
function confirming(button, label, action) {
  const original = button.textContent;
  button.addEventListener("click", async () => {
    if (!button.dataset.armed) {
      button.dataset.armed = "1";
      button.textContent = label;
      return;
    }
    delete button.dataset.armed;
    button.textContent = original;
    button.disabled = true;
    try { await action(); } catch (err) { showError(err); } finally { button.disabled = false; }
  });
  button.addEventListener("blur", () => {
    if (button.dataset.armed) { delete button.dataset.armed; button.textContent = original; }
  });
  return button;
}

async function loadTenants() {
  tenants = (await api("/admin/tenants")).data;
  clear(document.getElementById("tenants"), table([
    { label: "Name", value: (t) => t.name },
    { label: "ID", value: (t) => h("code", {}, t.id) },
    { label: "Limits", value: limitsText },
    { label: "Budget", value: budgetText },
    { label: "Weight", numeric: true, value: (t) => fmt.num(t.weight) },
    { label: "Guardrails", value: (t) => (t.guardrails ? "own policy" : "inherited") },
    { label: "Status", value: (t) => (t.disabled_at ? h("span", { class: "badge revoked" }, "disabled") : h("span", { class: "badge ok" }, "active")) },
    { label: "", value: (t) => h("button", { type: "button", class: "secondary", dataset: { tenant: t.id },
      "aria-label": `Manage tenant ${t.name}`, onclick: () => select(t.id) }, "Manage") },
  ], tenants, { empty: "No tenants yet.", caption: "tenants" }));
}

function fillTenantForm(t) {
  const form = document.getElementById("edit-tenant");
  form.elements.name.value = t.name;
  form.elements.rpm_limit.value = t.rpm_limit ?? "";
  form.elements.tpm_limit.value = t.tpm_limit ?? "";
  form.elements.budget_usd.value = t.budget_usd ?? "";
  form.elements.budget_period.value = t.budget_period || "month";
  form.elements.weight.value = t.weight;
  form.elements.guardrails.value = t.guardrails ? JSON.stringify(t.guardrails, null, 2) : "";
  document.getElementById("disable-tenant").hidden = Boolean(t.disabled_at);
}

async function select(id) {
  selected = tenants.find((t) => t.id === id) || await api(`/admin/tenants/${encodeURIComponent(id)}`);
  const panel = document.getElementById("tenant");
  panel.hidden = false;
  document.getElementById("tenant-h").textContent = `Tenant ${selected.name}${selected.disabled_at ? " (disabled)" : ""}`;
  fillTenantForm(selected);
  clear(document.getElementById("new-key-box"));
  await loadKeys();
  panel.scrollIntoView({ block: "start" });
  document.getElementById("et-name").focus({ preventScroll: true });
}

async function loadKeys() {
  const keys = (await api("/admin/keys", { query: { tenant_id: selected.id } })).data;
  clear(document.getElementById("keys"), table([
    { label: "Name", value: (k) => k.name || "—" },
    { label: "Key", value: (k) => h("code", {}, `${k.prefix}…`) },
    { label: "Role", value: (k) => k.role },
    { label: "Models", value: (k) => (k.models ? k.models.join(", ") : "all") },
    { label: "Limits", value: limitsText },
    { label: "Budget", value: budgetText },
    { label: "Created", value: (k) => when(k.created_at) },
    { label: "Last used", value: (k) => when(k.last_used_at) },
    { label: "Status", value: (k) => (k.revoked_at ? h("span", { class: "badge revoked" }, "revoked")
      : h("span", { class: "badge ok" }, "active")) },
    { label: "", value: (k) => (k.revoked_at ? null : confirming(
      h("button", { type: "button", class: "danger", dataset: { key: k.id }, "aria-label": `Revoke key ${k.name || k.prefix}` }, "Revoke"),
      "Confirm revoke", async () => {
        await api(`/admin/keys/${encodeURIComponent(k.id)}/revoke`, { method: "POST" });
        notify(`Key ${k.name || k.prefix} revoked.`, "ok");
        await loadKeys();
      })) },
  ], keys, { empty: "This tenant has no keys yet.", caption: "keys" }));
}

function showNewKey(created) {
  const box = document.getElementById("new-key-box");
  const value = h("code", { id: "new-key-value" }, created.key);
  const copy = h("button", { type: "button", class: "secondary", onclick: async () => {
    try {
      await navigator.clipboard.writeText(created.key);
      notify("Copied.", "ok");
    } catch {
      const range = document.createRange();  // no clipboard access: select it for the user
      range.selectNodeContents(value);
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      notify("Select and copy the key yourself: this browser blocked the clipboard.", "error");
    }
  } }, "Copy");
  const dismiss = h("button", { type: "button", class: "secondary", onclick: () => clear(box) }, "Dismiss");
  clear(box, h("div", { class: "keybox", role: "status" },
    h("p", {}, h("strong", {}, `New key ${created.name || created.prefix}: `),
      "copy it now, it will not be shown again."),
    h("div", { class: "keyline" }, value, copy, dismiss)));
  copy.focus();
}

onSubmit(document.getElementById("new-tenant"), async (form, el) => {
  const created = await api("/admin/tenants", { method: "POST", json: {
    name: form.get("name"), weight: number(form, "weight") ?? 1, ...limitsOf(form) } });
  el.reset();
  notify(`Tenant ${created.name} created.`, "ok");
  await loadTenants();
  await select(created.id);
});

onSubmit(document.getElementById("edit-tenant"), async (form) => {
  let guardrails = null;
  const text = String(form.get("guardrails") || "").trim();
  if (text) {
    try { guardrails = JSON.parse(text); } catch (err) {
      throw Object.assign(new Error(`The guardrail policy is not JSON: ${err.message}`), { param: "guardrails" });
    }
  }
  selected = await api(`/admin/tenants/${encodeURIComponent(selected.id)}`, { method: "PATCH", json: {
    name: form.get("name"), weight: number(form, "weight"), guardrails, ...limitsOf(form) } });
  fillTenantForm(selected);
  notify(`Tenant ${selected.name} saved.`, "ok");
  await loadTenants();
});

confirming(document.getElementById("disable-tenant"), "Confirm: disable tenant and its keys", async () => {
  selected = await api(`/admin/tenants/${encodeURIComponent(selected.id)}/disable`, { method: "POST" });
  notify(`Tenant ${selected.name} disabled: its keys no longer work.`, "ok");
  await loadTenants();
  await select(selected.id);
});

onSubmit(document.getElementById("new-key"), async (form, el) => {
  const models = String(form.get("models") || "").split(",").map((m) => m.trim()).filter(Boolean);
  const created = await api("/admin/keys", { method: "POST", json: {
    tenant_id: selected.id, name: form.get("name") || "", role: form.get("role"),
    models: models.length ? models : null, ...limitsOf(form) } });
  el.reset();
  await loadKeys();
  showNewKey(created);
});

loadTenants().then(() => {
  const wanted = new URLSearchParams(location.search).get("tenant");
  if (wanted) return select(wanted);
  return undefined;
}).catch(showError);
