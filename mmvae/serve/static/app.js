// mmvae review page: plain JavaScript over the JSON API (no build step).
"use strict";

const state = { info: null, session: null, marks: {} };   // marks: case id -> "relevant" | "nonrelevant"
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options = {}) {
  const resp = await fetch(path, options);
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) {
    let msg = body && (body.error || (body.detail && JSON.stringify(body.detail)));
    throw new Error(msg || `${resp.status} ${resp.statusText}`);
  }
  return body;
}

function chosenModalities() {
  return [...document.querySelectorAll("#mods input[name=mod]:checked")].map((x) => x.value);
}

async function run(fn) {
  showError("");
  $("busy").hidden = false;
  document.body.dataset.busy = "1";
  try {
    await fn();
  } catch (e) {
    showError(e.message);
  } finally {
    $("busy").hidden = true;
    delete document.body.dataset.busy;
  }
}

async function init() {
  const info = await api("/api/info");
  state.info = info;
  $("model-info").textContent = `${info.index_size} indexed cases · modalities ${info.modalities.join(", ")}`;
  const mods = $("mods");
  for (const m of info.modalities) {
    mods.append(el("label", {}, el("input", { type: "checkbox", name: "mod", value: m, checked: true, id: `mod-${m}` }), ` ${m}`));
  }
  const files = $("file-fields");
  for (const m of info.image_modalities) {
    files.append(el("label", {}, `${m}`, el("input", { type: "file", name: `file_${m}`, id: `file-${m}`, multiple: true,
      accept: ".nii,.gz,.png,.zip" })));
  }
  const cases = await api("/api/cases?limit=10000");
  const list = $("case-list");
  for (const c of cases.cases) list.append(el("option", { value: c }));
  $("query-case").addEventListener("click", () => run(queryCase));
  $("query-upload").addEventListener("click", () => run(queryUpload));
  if (info.pacs) {
    $("pacs-tab").hidden = false;
    $("pacs-url").textContent = `archive: ${info.pacs}`;
    $("query-pacs").addEventListener("click", () => run(queryPacs));
  }
  $("search-again").addEventListener("click", () => run(searchAgain));
  document.body.dataset.ready = "1";
}

async function queryCase() {
  const caseId = $("case-search").value.trim();
  if (!caseId) throw new Error("type or pick a case id");
  const body = { case_id: caseId, modalities: chosenModalities() };
  show(await api("/api/query", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) }));
}

async function queryPacs() {
  const uid = $("study-uid").value.trim();
  if (!uid) throw new Error("type a StudyInstanceUID");
  const body = { study_uid: uid, modalities: chosenModalities() };
  show(await api("/api/query/pacs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) }));
}

async function queryUpload() {
  const form = new FormData();
  for (const input of document.querySelectorAll("#file-fields input[type=file]")) {
    for (const f of input.files) form.append(input.name, f, f.name);
  }
  const report = $("report").value;
  if (report.trim()) form.append("report", report);
  form.append("modalities", chosenModalities().join(","));
  show(await api("/api/query/upload", { method: "POST", body: form }));
}

async function searchAgain() {
  const relevant = Object.keys(state.marks).filter((c) => state.marks[c] === "relevant");
  const nonrelevant = Object.keys(state.marks).filter((c) => state.marks[c] === "nonrelevant");
  show(await api("/api/feedback", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ session: state.session.session, relevant, nonrelevant }) }));
}

function fmt(x, n = 3) { return Number(x).toFixed(n); }

function labelsOf(labels) {
  const span = el("span");
  for (const [k, v] of Object.entries(labels || {})) span.append(el("span", { class: "label" }, `${k}: ${v}`));
  return span;
}

function show(s) {
  state.session = s;
  state.marks = {};
  $("query-info").hidden = false;
  $("results-panel").hidden = false;
  const src = s.source.kind === "case" ? `indexed case ${s.source.case_id}` :
    s.source.kind === "pacs" ? `archive study ${s.source.study_instance_uid}` +
      (s.source.accession_number ? ` (accession ${s.source.accession_number})` : "") :
    `uploaded files (${Object.entries(s.source.files).map(([m, f]) => `${m}: ${f.join(", ")}`).join("; ") || "no image"}` +
    `${s.source.report ? "; report text" : ""})`;
  const u = s.uncertainty;
  $("query-summary").replaceChildren(
    el("div", {}, `Query: ${src}`),
    el("div", {}, `Modalities the model used: ${s.modalities.join(", ")}`),
    el("div", { id: "uncertainty" }, `Posterior spread: mean variance ${fmt(u.mean_variance)}, log det Σ ${fmt(u.log_det, 1)}` +
      (u.percentile !== undefined ? ` — less certain than ${fmt(u.percentile, 0)} % of indexed cases` : "")));
  $("query-thumbs").replaceChildren(...s.query_thumbnails.map((m) =>
    el("figure", {}, el("img", { class: "thumb", src: `/api/session/${s.session}/thumbnail/${m}`, alt: m }), el("figcaption", {}, m))));
  if (s.source.kind === "case") {          // the indexed case's own images and labels
    const id = encodeURIComponent(s.source.case_id);
    api(`/api/case/${id}`).then((c) => {
      $("query-summary").append(el("div", { class: "meta" }, "Labels: ", labelsOf(c.labels)));
      $("query-thumbs").replaceChildren(...c.images.filter((m) => s.modalities.includes(m)).map((m) =>
        el("figure", {}, el("img", { class: "thumb", src: `/api/case/${id}/thumbnail/${encodeURIComponent(m)}`, alt: m }),
          el("figcaption", {}, m))));
    }).catch((e) => showError(e.message));
  }
  $("query-notes").replaceChildren(...s.notes.map((n) => el("li", {}, n)));
  $("round-label").textContent = s.round ? `(feedback round ${s.round})` : "";
  $("export-csv").href = `/api/session/${s.session}/export.csv`;
  $("export-json").href = `/api/session/${s.session}/export.json`;
  const ol = $("results");
  ol.replaceChildren(...s.results.map(resultItem));
  $("history").replaceChildren(...s.history.map((h) => el("li", {},
    `round ${h.round}: top ${h.top.slice(0, 5).join(", ")}` +
    (h.relevant.length || h.nonrelevant.length ? ` — marked relevant [${h.relevant.join(", ")}], not relevant [${h.nonrelevant.join(", ")}]` : ""))));
  $("fusion").textContent = s.fusion ? `fused ranking (${s.fusion.method}), leg weights: ` +
    Object.entries(s.fusion.weights).map(([n, w]) => `${n} ${w.toFixed(2)}`).join(", ") : "";
  updateMarks();
  document.body.dataset.round = String(s.round);
  document.body.dataset.session = s.session;
}

function resultItem(r) {
  const thumbs = el("div", { class: "thumbs" });
  const excerpt = el("div", { class: "excerpt" });
  const rel = el("button", { type: "button", class: "mark-relevant" }, "✓ relevant");
  const non = el("button", { type: "button", class: "mark-nonrelevant" }, "✗ not relevant");
  const li = el("li", { class: "result", "data-case-id": r.case_id },
    el("div", {}, el("div", { class: "rank" }, r.rank), el("div", { class: "score" }, fmt(r.score))),
    el("div", {}, el("div", { class: "case-id" }, r.case_id),
      el("div", { class: "meta" }, `modalities: ${r.modalities.join(", ")} `, labelsOf(r.labels)),
      r.matched_on !== undefined ? el("div", { class: "matched-on" }, `matched on: ${r.matched_on || "—"}`) : "",
      thumbs, excerpt),
    el("div", { class: "marks" }, rel, non));
  rel.addEventListener("click", () => mark(r.case_id, "relevant"));
  non.addEventListener("click", () => mark(r.case_id, "nonrelevant"));
  api(`/api/case/${encodeURIComponent(r.case_id)}`).then((c) => {
    for (const m of c.images) {
      thumbs.append(el("figure", {}, el("img", { class: "thumb", alt: `${r.case_id} ${m}`,
        src: `/api/case/${encodeURIComponent(r.case_id)}/thumbnail/${encodeURIComponent(m)}` }), el("figcaption", {}, m)));
    }
    if (c.report_excerpt) excerpt.textContent = c.report_excerpt;
    li.dataset.loaded = "1";
  }).catch((e) => { excerpt.textContent = e.message; li.dataset.loaded = "error"; });
  return li;
}

function mark(caseId, kind) {
  state.marks[caseId] = state.marks[caseId] === kind ? undefined : kind;
  if (!state.marks[caseId]) delete state.marks[caseId];
  updateMarks();
}

function updateMarks() {
  for (const li of document.querySelectorAll("#results .result")) {
    const m = state.marks[li.dataset.caseId];
    li.classList.toggle("relevant", m === "relevant");
    li.classList.toggle("nonrelevant", m === "nonrelevant");
    li.querySelector(".mark-relevant").classList.toggle("on", m === "relevant");
    li.querySelector(".mark-nonrelevant").classList.toggle("on", m === "nonrelevant");
  }
  $("search-again").disabled = Object.keys(state.marks).length === 0;
}

init().catch((e) => showError(e.message));
