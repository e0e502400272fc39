// peftserve playground: one prompt through many adapters side by side (server/api/ui.py).
// Plain JS, public API only. Every column is its own streaming POST /generate; all are sent
// together, so the engine batches them. State the tests read lives in data-* attributes.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const BASE = "(base)";

// Plain words for the machine-readable error codes an upload or a request can get.
const PLAIN = {
  unauthorized: "This action needs a key: type it in the key field at the top.",
  forbidden: "The key is not allowed to do this (uploads and deletes need the admin key).",
  invalid_safetensors: "The weights file is not a valid safetensors file.",
  unsupported_media_type: "Only safetensors weights are accepted (pickled .bin/.pt files are refused).",
  adapter_exists: "An adapter with this name exists; tick 'replace' to upload a new version.",
  invalid_adapter_name: "Names use letters, digits, '.', '_' and '-' (64 at most).",
  invalid_adapter_config: "adapter_config.json is not a valid PEFT config.",
  unsupported_adapter: "This adapter type or option is not served.",
  adapter_shape_mismatch: "The adapter does not fit this base model (module shapes differ).",
  adapter_numerically_unstable: "The adapter's values are so large that generation would overflow.",
  body_too_large: "The upload is larger than the server accepts.",
  adapter_too_large: "The adapter is larger than the server accepts.",
  adapter_not_found: "No adapter of that name is registered.",
  context_length_exceeded: "Prompt plus max_new_tokens is longer than the model's context.",
  invalid_request: "The request was refused as invalid.",
  queue_full: "The server is busy; try again in a moment.",
  numerical_error: "The model produced non-finite values for this request.",
};

function cookieKey() {
  const m = document.cookie.match(/(?:^|;\s*)peftserve_key=([^;]*)/);
  return m ? decodeURIComponent(m[1]) : "";
}

function headers(extra = {}) {
  const key = $("#key").value.trim() || cookieKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
  get plain() { return `${this.code}: ${PLAIN[this.code] || this.message}`; }
}

async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (!resp.ok) {
    let code = `http_${resp.status}`, message = resp.statusText;
    try { const body = await resp.json(); code = body.error.code; message = body.error.message; } catch (_) { /* not JSON */ }
    throw new ApiError(resp.status, code, message);
  }
  return resp;
}

// ---------------------------------------------------------------- adapters
let adapters = [];  // GET /adapters rows
const selected = new Set([BASE]);

function describe(a) {
  const parts = [a.kind];
  if (a.rank !== undefined) parts.push(`r${a.rank}`);
  if (a.num_virtual_tokens !== undefined) parts.push(`${a.num_virtual_tokens} virtual tokens`);
  if (a.placement !== undefined) parts.push(a.placement);
  parts.push(`v ${a.version}`);
  if (a.tier !== undefined) parts.push(a.tier, `${a.requests} req`);
  return parts.join(" · ");
}

function renderAdapters() {
  const list = $("#adapter-list");
  list.replaceChildren();
  for (const a of [{ name: BASE }, ...adapters]) {
    const box = document.createElement("label");
    box.className = "adapter";
    box.dataset.name = a.name;
    const check = document.createElement("input");
    check.type = "checkbox";
    check.checked = selected.has(a.name);
    check.addEventListener("change", () => { check.checked ? selected.add(a.name) : selected.delete(a.name); });
    const title = document.createElement("span");
    title.textContent = a.name;
    box.append(check, title);
    if (a.kind) {
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = describe(a);
      box.append(meta);
    }
    if (a.kind && !a.readOnly) {
      const del = document.createElement("button");
      del.type = "button";
      del.className = "small delete";
      del.textContent = "delete";
      del.addEventListener("click", async (ev) => {
        ev.preventDefault();
        if (!confirm(`Delete adapter ${a.name}? Requests in flight finish on it.`)) return;
        try { await api(`/adapters/${encodeURIComponent(a.name)}`, { method: "DELETE" }); selected.delete(a.name); }
        catch (err) { $("#upload-result").textContent = err.plain || String(err); }
        loadAdapters();
      });
      box.append(del);
    }
    list.append(box);
  }
}

// With only the API key (not the admin key) GET /adapters is refused; /v1/models lists the same
// adapters (name, kind, version) to anyone who may generate, so the page still works — without
// the admin-only details (tier, request counts) and without delete.
async function listFromModels() {
  const models = (await (await api("/v1/models")).json()).data;
  return models.filter((m) => m.parent).map((m) => ({
    name: m.id, kind: m.peftserve.kind, version: m.peftserve.version, readOnly: true,
  }));
}

async function loadAdapters() {
  const note = $("#adapters-note");
  try {
    adapters = (await (await api("/adapters")).json()).adapters;
    note.textContent = adapters.length ? "" : "No adapters registered yet: upload one below.";
  } catch (err) {
    adapters = [];
    if (err.code === "adapters_disabled") {
      note.textContent = "This server runs without an adapter registry.";
    } else if (err.code === "forbidden" || err.code === "unauthorized") {
      try {
        adapters = await listFromModels();
        note.textContent = "Listed with the API key: uploads and deletes need the admin key.";
      } catch (err2) { note.textContent = `Listing adapters failed (${err2.plain || err2}).`; }
    } else {
      note.textContent = `Listing adapters failed (${err.plain || err}).`;
    }
  }
  for (const name of [...selected]) if (name !== BASE && !adapters.some((a) => a.name === name)) selected.delete(name);
  renderAdapters();
  $("#adapter-list").dataset.loaded = String(Date.now());
}

// ---------------------------------------------------------------- columns
function request(name) {
  const prompt = $("#prompt").value;
  const body = {
    max_new_tokens: Number($("#max-new-tokens").value) || 32,
    temperature: Number($("#temperature").value) || 0,
    stream: true,
  };
  const seed = $("#seed").value;
  if (seed !== "") body.seed = Number(seed);
  if ($("#chat").checked) body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  if (name !== BASE) body.adapter = name;
  return body;
}

function makeColumn(name) {
  const col = document.createElement("article");
  col.className = "column";
  col.dataset.adapter = name;
  col.dataset.state = "running";
  const h = document.createElement("h3");
  h.textContent = name;
  const meta = document.createElement("div");
  meta.className = "meta";
  const a = adapters.find((x) => x.name === name);
  meta.textContent = a ? describe(a) : "base model";
  const out = document.createElement("div");
  out.className = "out";
  const stats = document.createElement("div");
  stats.className = "stats";
  col.append(h, meta, out, stats);
  return col;
}

async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function stream(col) {
  const out = $(".out", col), stats = $(".stats", col);
  const pieces = [];  // per generated token: [token_id, text]
  const t0 = performance.now();
  let ttft = null;
  try {
    const resp = await api("/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request(col.dataset.adapter)),
    });
    for await (const ev of sseEvents(resp)) {
      if (ev.error) throw new ApiError(200, ev.error.code, ev.error.message);
      if (ev.finish_reason !== undefined) {  // the final event: the non-streaming body
        col.dataset.text = ev.text;
        col.dataset.tokenIds = JSON.stringify(ev.token_ids);
        col.dataset.finishReason = ev.finish_reason;
        break;
      }
      if (ttft === null) ttft = performance.now() - t0;
      pieces.push([ev.token_id, ev.text]);
      out.textContent += ev.text;
      const secs = (performance.now() - t0) / 1000;
      stats.textContent = `${pieces.length} tokens · TTFT ${ttft.toFixed(0)} ms · ${(pieces.length / secs).toFixed(1)} tok/s`;
    }
    col.pieces = pieces;
    col.dataset.state = "done";
  } catch (err) {
    col.classList.add("error");
    col.dataset.state = "error";
    col.dataset.errorCode = err.code || "network_error";
    out.textContent = err.plain || String(err);
  }
}

function highlight(columns) {
  const done = columns.filter((c) => c.dataset.state === "done");
  if (!$("#diff").checked || done.length < 2) return;
  const ref = JSON.parse(done[0].dataset.tokenIds);
  for (const col of done) {
    const out = $(".out", col);
    out.replaceChildren();
    col.pieces.forEach(([id, text], i) => {
      const span = document.createElement("span");
      span.className = id === ref[i] ? "tok" : "tok diff";
      span.textContent = text;
      out.append(span);
    });
    const tail = col.dataset.text.slice(col.pieces.map((p) => p[1]).join("").length);
    if (tail) out.append(tail);  // text held back for a stop string is released at the end
    col.dataset.diffTokens = String($$(".tok.diff", col).length);
  }
}

const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

async function runAll() {
  const area = $("#columns");
  const names = [BASE, ...adapters.map((a) => a.name)].filter((n) => selected.has(n));
  const columns = names.map(makeColumn);
  area.replaceChildren(...columns);
  area.dataset.state = "running";
  await Promise.all(columns.map(stream));  // all in flight together: they share engine steps
  highlight(columns);
  area.dataset.state = "done";
  loadAdapters();
}

// ---------------------------------------------------------------- upload
async function upload(ev) {
  ev.preventDefault();
  const form = ev.target, result = $("#upload-result");
  const data = new FormData(form);
  if (!form.elements.replace.checked) data.delete("replace");
  result.className = "";
  result.textContent = "uploading…";
  try {
    const info = await (await api("/adapters", { method: "POST", body: data })).json();
    result.textContent = `uploaded ${info.name} (${info.kind}, version ${info.version})` +
      (info.warnings && info.warnings.length ? ` — warnings: ${info.warnings.join("; ")}` : "");
    result.dataset.code = "ok";
    form.reset();
  } catch (err) {
    result.className = "error-text";
    result.textContent = err.plain || String(err);
    result.dataset.code = err.code || "network_error";
  }
  loadAdapters();
}

// ---------------------------------------------------------------- live metrics
function parseMetrics(text) {
  const rows = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const kv of (m[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[kv[1]] = kv[2];
    rows.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return rows;
}

function quantile(rows, name, q) {
  const buckets = new Map();  // le -> count, summed over label sets
  for (const r of rows) if (r.name === `${name}_bucket`) buckets.set(r.labels.le, (buckets.get(r.labels.le) || 0) + r.value);
  const les = [...buckets.keys()].map((le) => [le === "+Inf" ? Infinity : Number(le), buckets.get(le)]).sort((a, b) => a[0] - b[0]);
  const total = les.length ? les[les.length - 1][1] : 0;
  if (!total) return null;
  for (const [le, count] of les) if (count >= q * total) return le;  // the bucket's upper bound
  return null;
}

function fmtSeconds(s) { return s === null ? "–" : s === Infinity ? "> max bucket" : `≤ ${(s * 1000).toFixed(0)} ms`; }

async function refreshMetrics() {
  let rows;
  try { rows = parseMetrics(await (await api("/metrics")).text()); } catch (_) { return; }
  const one = (name, labels = {}) => rows.filter((r) => r.name === name && Object.entries(labels).every(([k, v]) => r.labels[k] === v))
    .reduce((s, r) => s + r.value, 0);
  const lines = [
    ["running", one("peftserve_num_requests_running")],
    ["waiting", one("peftserve_num_requests_waiting")],
    ["KV cache in use", `${(100 * one("peftserve_kv_cache_usage_perc")).toFixed(0)} %`],
    ["TTFT p50 / p95", `${fmtSeconds(quantile(rows, "peftserve_time_to_first_token_seconds", 0.5))} / ${fmtSeconds(quantile(rows, "peftserve_time_to_first_token_seconds", 0.95))}`],
    ["ITL p50 / p95", `${fmtSeconds(quantile(rows, "peftserve_inter_token_latency_seconds", 0.5))} / ${fmtSeconds(quantile(rows, "peftserve_inter_token_latency_seconds", 0.95))}`],
  ];
  for (const r of rows) if (r.name === "peftserve_adapters_resident") lines.push([`adapters resident (${r.labels.tier})`, r.value]);
  for (const a of adapters) lines.push([`requests: ${a.name}`, a.requests]);
  const body = $("#metrics-table tbody");
  body.replaceChildren(...lines.map(([k, v]) => {
    const tr = document.createElement("tr");
    const a = document.createElement("td"), b = document.createElement("td");
    a.textContent = k; b.textContent = String(v);
    tr.append(a, b);
    return tr;
  }));
  $("#metrics").dataset.updated = String(Date.now());
}

// ---------------------------------------------------------------- start
async function start() {
  try {
    const ready = await (await api("/ready")).json();
    $("#model").textContent = `model: ${ready.model}`;
  } catch (err) { $("#model").textContent = `server not ready (${err.code || err})`; }
  $("#run").addEventListener("click", runAll);
  $("#refresh").addEventListener("click", loadAdapters);
  $("#upload").addEventListener("submit", upload);
  $("#key").addEventListener("change", () => { loadAdapters(); refreshMetrics(); });
  await loadAdapters();
  refreshMetrics();
  setInterval(refreshMetrics, 2000);
  document.body.dataset.ready = "1";
}

document.addEventListener("DOMContentLoaded", start);
