// The search page: an image (chosen, dropped or pasted) or a database image
// (clicked) is the query; the results come from the JSON API as a grid.
// Everything shown from the server goes in with textContent, never as HTML.
// (common.js, loaded first, has the helpers both pages use.)
"use strict";

const state = { kind: null, file: null, name: "", id: null, topK: 24, step: 24 };

async function loadInfo() {
  const response = await fetch("/api/info", { credentials: "same-origin" });
  if (!response.ok) { setError(await apiError(response)); $("db-info").textContent = ""; return; }
  const info = await response.json();
  const weights = (info.model.weights || "").split("/").pop();
  $("db-info").textContent =
    `${info.count.toLocaleString()} images · ${info.bits} bits · fc7 ${info.fc7_dim} · ` +
    `model ${weights || "unknown"}` + (info.net ? "" : " · search by id only (no net)");
}

function timing(response) {
  const header = response.headers.get("Server-Timing") || "";
  const parts = {};
  for (const item of header.split(",")) {
    const m = item.trim().match(/^(\w+);dur=([\d.]+)/);
    if (m) parts[m[1]] = parseFloat(m[2]);
  }
  return parts;
}

async function run() {
  if (!state.kind) return;
  setError("");
  setStatus("searching…");
  const params = new URLSearchParams({ top_k: String(state.topK) });
  const started = performance.now();
  let response;
  try {
    if (state.kind === "upload") {
      const form = new FormData();
      form.append("image", state.file, state.name);
      response = await fetch(`/api/search?${params}`, { method: "POST", body: form,
                                                        credentials: "same-origin" });
    } else {
      params.append("id", String(state.id));
      response = await fetch(`/api/search?${params}`, { credentials: "same-origin" });
    }
  } catch (e) {
    setStatus(""); setError(`the server did not answer (${e})`); return;
  }
  if (!response.ok) { setStatus(""); setError(await apiError(response)); return; }
  const answers = await response.json();
  render(answers[0], performance.now() - started, timing(response));
}

function caption(parts) {
  const cap = document.createElement("figcaption");
  parts.forEach(([label, value], i) => {
    if (i) cap.append(document.createTextNode(" · "));
    const b = document.createElement("b");
    b.textContent = value;
    cap.append(document.createTextNode(label ? `${label} ` : ""), b);
  });
  return cap;
}

function render(answer, elapsed, timings) {
  const meta = $("query-meta");
  meta.replaceChildren();
  const name = document.createElement("div");
  const b = document.createElement("b");
  b.textContent = answer.query;
  name.append(b);
  const facts = document.createElement("div");
  let text = `${answer.results.length} results from ${answer.candidates} candidates ` +
             `(Hamming radius ${answer.radius}) · search ${answer.search_ms.toFixed(2)} ms`;
  if (timings.net !== undefined) text += ` · net ${timings.net.toFixed(1)} ms`;
  text += ` · total ${elapsed.toFixed(0)} ms`;
  if (answer.query_label >= 0) {
    text += ` · label ${answer.query_label}` +
            (answer.query_class ? ` ${answer.query_class}` : "");
  }
  facts.textContent = text;
  facts.id = "query-facts";
  meta.append(name, facts);
  show($("query"), true);

  const grid = $("results");
  grid.replaceChildren();
  for (const hit of answer.results) {
    const fig = document.createElement("figure");
    fig.className = "result";
    if (answer.query_label >= 0 && hit.label >= 0) {
      fig.classList.add(hit.label === answer.query_label ? "same" : "other");
    }
    fig.dataset.id = hit.id;
    fig.dataset.rank = hit.rank;
    fig.title = `${hit.path}\nclick to search with this image`;
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = `result ${hit.rank}: image ${hit.id}`;
    img.src = thumbnailUrl(hit.id);
    fig.append(img, caption([["", `#${hit.rank}`], ["id", String(hit.id)],
                             ["label", hit.class_name ? `${hit.label} ${hit.class_name}`
                                                      : String(hit.label)],
                             ["H", String(hit.hamming)],
                             ["L2", hit.l2.toFixed(2)]]));
    fig.addEventListener("click", () => searchId(hit.id));
    grid.append(fig);
  }
  setStatus(answer.results.length ? "" : "no results");
  show($("more"), answer.results.length >= state.topK);
}

function searchFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setError(`${file.name || "that"} is not an image (${file.type})`); return;
  }
  state.kind = "upload"; state.file = file; state.name = file.name || "pasted image";
  state.topK = parseInt($("top-k").value, 10); state.step = state.topK;
  const img = $("query-image");
  if (img.dataset.objectUrl) URL.revokeObjectURL(img.dataset.objectUrl);
  img.dataset.objectUrl = URL.createObjectURL(file);
  img.src = img.dataset.objectUrl;
  run();
}

function searchId(id) {
  state.kind = "id"; state.id = id; state.file = null;
  state.topK = parseInt($("top-k").value, 10); state.step = state.topK;
  $("query-image").src = thumbnailUrl(id, 256);
  window.scrollTo({ top: 0, behavior: "smooth" });
  run();
}

function setUp() {
  $("file-input").addEventListener("change", (e) => searchFile(e.target.files[0]));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault(); zone.classList.remove("over");
    searchFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    for (const item of e.clipboardData.items) {
      if (item.kind === "file" && item.type.startsWith("image/")) {
        searchFile(item.getAsFile()); e.preventDefault(); return;
      }
    }
  });
  $("top-k").addEventListener("change", () => {
    state.topK = parseInt($("top-k").value, 10); state.step = state.topK; run();
  });
  $("more").addEventListener("click", () => { state.topK += state.step; run(); });
  loadInfo();
}

setUp();
