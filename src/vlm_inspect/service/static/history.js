// History, review and labelling page of the inspection station. Plain JS, no build step, no CDN.
// Boxes are kept in photo pixels; the canvas over the photo draws them at the shown scale.
"use strict";

const PAGE = 50;
const state = {
  label: new URLSearchParams(location.search).has("label"),
  offset: 0, total: 0, ids: [], record: null, verdict: null, boxes: [], modelBoxes: [], drag: null, photoUrl: null,
  golden: null, // {product, golden: {photos: [{record_id, file}], operator, time} | null}; null: no golden routes here
};
const $ = (id) => document.getElementById(id);

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: "Bearer " + key } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    const message = body.error?.message || `HTTP ${response.status}`;
    throw new Error(response.status === 401 ? "This server needs an API key: enter it at the top right." : message);
  }
  return response;
}

function showNotice(text) { $("notice").textContent = text; $("notice").hidden = !text; }

function filterQuery() {
  const params = new URLSearchParams();
  for (const [name, value] of new FormData($("filters"))) if (value) params.set(name, value);
  if (state.label && params.get("order") !== "disagreements") { params.set("review", "unreviewed"); }
  return params;
}

async function loadList() {
  const params = filterQuery();
  params.set("limit", PAGE);
  params.set("offset", state.offset);
  try {
    const body = await (await api("/v1/station/records?" + params)).json();
    state.total = body.total;
    state.ids = body.records.map((r) => r.id);
    renderList(body.records);
    fillModels(body.models);
    const last = Math.min(state.offset + body.records.length, body.total);
    $("summary").textContent = state.label
      ? `${body.total} photo(s) left to label`
      : `${body.total} record(s); showing ${body.total ? state.offset + 1 : 0}–${last}`;
    $("prev").disabled = state.offset === 0;
    $("next").disabled = last >= body.total;
    showNotice("");
    return body.records;
  } catch (err) {
    showNotice(String(err.message || err));
    return [];
  }
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  if (cls) td.className = cls;
  row.appendChild(td);
}

function renderList(records) {
  const body = $("records").tBodies[0];
  body.textContent = "";
  for (const r of records) {
    const row = document.createElement("tr");
    row.dataset.id = r.id;
    row.className = "rec " + (r.final_verdict || "none").toLowerCase() + (state.record?.id === r.id ? " open" : "");
    cell(row, r.id);
    cell(row, r.time.replace("T", " ").replace("Z", ""));
    cell(row, r.file, "file");
    cell(row, r.line || r.source); // the line: a --line name, the hot folder's name, or the source
    cell(row, r.model);
    cell(row, r.p_ng === null ? "" : r.p_ng.toFixed(3), "num");
    const shown = { unreviewed: r.verdict || "—", confirmed: `${r.verdict} ✓`, corrected: `${r.verdict} → ${r.final_verdict}` };
    cell(row, shown[r.review] ?? `${r.final_verdict} (label)`, "state");
    row.title = `${r.source}, ${r.review}${r.latest_review ? " by " + r.latest_review.operator : ""}`;
    row.addEventListener("click", () => openRecord(r.id));
    body.appendChild(row);
  }
}

function fillModels(models) {
  const select = $("filters").elements.model;
  const chosen = select.value;
  select.length = 1;
  for (const m of models) select.add(new Option(m, m, false, m === chosen));
}

async function openRecord(id) {
  try {
    const record = await (await api(`/v1/station/records/${id}`)).json();
    const blob = await (await api(`/v1/station/records/${id}/photo`)).blob();
    if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
    state.photoUrl = URL.createObjectURL(blob);
    state.record = record;
    const latest = record.latest_review;
    state.verdict = latest ? latest.verdict : record.verdict;
    // The model's boxes stay in view (dashed); an unreviewed NG record's review starts from them, to accept,
    // move (drag one), delete (click one) or add to (drag on the photo).
    state.modelBoxes = (record.defects || []).map((d) => d.box.slice());
    const start = latest ? latest.boxes : record.verdict === "NG" ? state.modelBoxes : [];
    state.boxes = start.map((b) => b.map((v) => Math.round(v)));
    $("defect-type").value = latest?.defect_type || (latest ? "" : record.defects?.[0]?.type || "");
    $("description").value = latest?.description || "";
    $("saved").textContent = "";
    renderDetail();
    $("photo").src = state.photoUrl;
    $("d-full").href = state.photoUrl;
    document.querySelectorAll("#records tr.rec").forEach((tr) => tr.classList.toggle("open", Number(tr.dataset.id) === id));
    history.replaceState(null, "", `${location.pathname}${location.search}#${id}`);
  } catch (err) {
    showNotice(String(err.message || err));
  }
}

function renderDetail() {
  const r = state.record;
  $("detail").hidden = false;
  const badge = $("d-verdict");
  badge.textContent = r.verdict || "to label";
  badge.className = "badge-inline " + (r.verdict || "none").toLowerCase();
  $("d-file").textContent = `#${r.id} ${r.file}`;
  const where = r.line && r.line !== r.source ? `${r.source}, line ${r.line}` : r.source;
  const parts = [r.time.replace("T", " "), where, r.model && `${r.model} (${r.model_hash || "?"})`];
  if (r.p_ng !== null) parts.push(`p(NG) ${r.p_ng.toFixed(3)} at threshold ${r.threshold}`);
  if (r.latency_ms !== null) parts.push(`${Math.round(r.latency_ms)} ms`);
  parts.push(`${r.width}×${r.height} px`);
  $("d-meta").textContent = parts.filter(Boolean).join(" · ");
  $("d-desc").textContent = r.description || "";
  const found = r.defects || [];
  $("d-model-boxes").textContent = found.length
    ? `model's boxes (dashed): ${found.map((d) => d.type || "defect").join(", ")}${r.boxes_dropped ? ` · ${r.boxes_dropped} unusable dropped` : ""}`
    : "";
  $("d-reference").textContent = !r.reference_known ? ""
    : r.reference ? `judged against ${r.reference.name}: ${r.reference.photos.map((p) => p.file).join(", ")}`
    : "judged against the photo alone";
  // Only a photo an operator confirmed OK (its latest review) can become a golden sample.
  $("golden-add").hidden = !state.golden || r.latest_review?.verdict !== "OK" || goldenIds().includes(r.id);
  const list = $("d-reviews");
  list.textContent = "";
  for (const rv of r.reviews) {
    const li = document.createElement("li");
    const what = [rv.verdict, rv.defect_type, rv.boxes.length ? `${rv.boxes.length} box(es)` : null, rv.description];
    li.textContent = `${rv.time.replace("T", " ")} ${rv.operator}: ${what.filter(Boolean).join(" · ")}`;
    list.appendChild(li);
  }
  renderChoice();
}

function renderChoice() {
  document.querySelectorAll(".choose").forEach((b) => b.classList.toggle("chosen", b.dataset.verdict === state.verdict));
  $("box-count").textContent = `${state.boxes.length} box${state.boxes.length === 1 ? "" : "es"}`;
  draw();
}

// ---------------------------------------------------------------- the product's golden sample

async function loadGolden() {
  try {
    state.golden = await (await api("/v1/station/golden")).json();
    renderGolden();
  } catch (err) {
    state.golden = null; // the labeller without a model names no product: no golden sample here
    $("golden").hidden = true;
  }
}

function goldenIds() { return (state.golden?.golden?.photos || []).map((p) => p.record_id); }

async function putGolden(ids) {
  const operator = $("operator").value.trim();
  if (!operator) { showNotice("Enter your name as operator first: the golden sample records who chose it."); return; }
  try {
    const body = JSON.stringify({ record_ids: ids, operator, product: state.golden.product });
    const options = { method: "PUT", headers: { "Content-Type": "application/json" }, body };
    state.golden = await (await api("/v1/station/golden", options)).json();
    renderGolden();
    if (state.record) renderDetail();
    showNotice("");
  } catch (err) {
    showNotice(String(err.message || err));
  }
}

function renderGolden() {
  const photos = state.golden.golden?.photos || [];
  $("golden").hidden = false;
  $("golden-product").textContent = state.golden.product;
  $("golden-state").textContent = photos.length
    ? `${photos.length} photo(s), chosen by ${state.golden.golden.operator} at ${state.golden.golden.time.replace("T", " ")}`
    : "none chosen: the model's own references are used";
  const list = $("golden-photos");
  list.textContent = "";
  for (const p of photos) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = p.file;
    img.title = `#${p.record_id} ${p.file}`;
    api(`/v1/station/records/${p.record_id}/photo`).then((r) => r.blob()).then((b) => { img.src = URL.createObjectURL(b); })
      .catch(() => { img.alt = `${p.file} (photo unreadable)`; });
    const drop = document.createElement("button");
    drop.type = "button";
    drop.textContent = "×";
    drop.title = "take it out of the golden sample";
    drop.addEventListener("click", () => putGolden(goldenIds().filter((id) => id !== p.record_id)));
    fig.append(img, drop);
    list.appendChild(fig);
  }
  $("golden-clear").hidden = !photos.length;
}

// ---------------------------------------------------------------- boxes on a canvas over the photo

function scale() {
  const img = $("photo");
  return img.naturalWidth ? img.clientWidth / img.naturalWidth : 1;
}

function fitCanvas() {
  const img = $("photo");
  const canvas = $("boxes");
  canvas.width = img.clientWidth;
  canvas.height = img.clientHeight;
  canvas.style.width = img.clientWidth + "px";
  canvas.style.height = img.clientHeight + "px";
  draw();
}

function draw() {
  const canvas = $("boxes");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const s = scale();
  ctx.lineWidth = 2;
  ctx.setLineDash([6, 4]);
  ctx.strokeStyle = "#0969da";
  for (const [x0, y0, x1, y1] of state.modelBoxes) ctx.strokeRect(x0 * s, y0 * s, (x1 - x0) * s, (y1 - y0) * s);
  ctx.setLineDash([]);
  const shapes = state.drag?.draw ? [...state.boxes, state.drag.box] : state.boxes;
  ctx.lineWidth = 3;
  for (const [x0, y0, x1, y1] of shapes) {
    ctx.strokeStyle = "#cf222e";
    ctx.fillStyle = "rgba(207, 34, 46, 0.15)";
    ctx.fillRect(x0 * s, y0 * s, (x1 - x0) * s, (y1 - y0) * s);
    ctx.strokeRect(x0 * s, y0 * s, (x1 - x0) * s, (y1 - y0) * s);
  }
}

function boxAt([x, y]) {
  for (let i = state.boxes.length - 1; i >= 0; i -= 1) {
    const [x0, y0, x1, y1] = state.boxes[i];
    if (x >= x0 && x <= x1 && y >= y0 && y <= y1) return i;
  }
  return -1;
}

function photoPoint(ev) {
  const rect = $("boxes").getBoundingClientRect();
  const img = $("photo");
  const s = scale();
  const clamp = (v, max) => Math.min(Math.max(v, 0), max);
  return [clamp((ev.clientX - rect.left) / s, img.naturalWidth), clamp((ev.clientY - rect.top) / s, img.naturalHeight)];
}

function wireCanvas() {
  const canvas = $("boxes");
  canvas.addEventListener("pointerdown", (ev) => {
    if (!state.record) return;
    ev.preventDefault();
    canvas.setPointerCapture(ev.pointerId);
    const start = photoPoint(ev);
    const hit = boxAt(start);
    // On a box: move it (or, with no movement, delete it); elsewhere: draw a new one.
    state.drag = hit >= 0 ? { start, index: hit, from: state.boxes[hit].slice(), moved: false } : { start, draw: true, box: [...start, ...start] };
  });
  canvas.addEventListener("pointermove", (ev) => {
    if (!state.drag) return;
    const [x, y] = photoPoint(ev);
    const [sx, sy] = state.drag.start;
    if (state.drag.draw) {
      state.drag.box = [Math.min(sx, x), Math.min(sy, y), Math.max(sx, x), Math.max(sy, y)];
    } else {
      const img = $("photo");
      const [x0, y0, x1, y1] = state.drag.from;
      const dx = Math.min(Math.max(x - sx, -x0), img.naturalWidth - x1);
      const dy = Math.min(Math.max(y - sy, -y0), img.naturalHeight - y1);
      state.drag.moved = state.drag.moved || Math.abs(dx) + Math.abs(dy) >= 2;
      state.boxes[state.drag.index] = [x0 + dx, y0 + dy, x1 + dx, y1 + dy].map((v) => Math.round(v));
    }
    draw();
  });
  const finish = () => {
    if (!state.drag) return;
    const drag = state.drag;
    state.drag = null;
    if (!drag.draw) {
      if (!drag.moved) state.boxes.splice(drag.index, 1); // a click on a box deletes it
      renderChoice();
      return;
    }
    const [x0, y0, x1, y1] = drag.box.map((v) => Math.round(v));
    if (x1 - x0 >= 2 && y1 - y0 >= 2) {
      state.boxes.push([x0, y0, x1, y1]);
      state.verdict = "NG"; // a boxed defect makes the photo NG
    }
    renderChoice();
  };
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointercancel", () => { state.drag = null; draw(); });
  $("photo").addEventListener("load", fitCanvas);
  window.addEventListener("resize", fitCanvas);
}

// ---------------------------------------------------------------- saving a review

async function saveReview(goNext) {
  if (!state.record) return;
  const operator = $("operator").value.trim();
  if (!operator) { showNotice("Enter the operator's name at the top right first."); $("operator").focus(); return; }
  if (!state.verdict) { showNotice("Choose OK or NG first."); return; }
  const ng = state.verdict === "NG";
  const body = {
    verdict: state.verdict,
    operator,
    defect_type: ng ? $("defect-type").value.trim() || null : null,
    boxes: ng ? state.boxes : [],
    description: $("description").value.trim() || null,
  };
  try {
    const response = await api(`/v1/station/records/${state.record.id}/reviews`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const saved = await response.json();
    state.record = saved.record;
    renderDetail();
    $("saved").textContent = `saved (review ${saved.review_id})`;
    showNotice("");
    const records = await loadList();
    if (goNext) await openNext(records);
  } catch (err) {
    showNotice(String(err.message || err));
  }
}

async function openNext(records) {
  if (state.label) {
    const queue = await (await api(`/v1/station/queue?limit=1&order=${$("order").value || "oldest"}`)).json();
    if (queue.ids.length) await openRecord(queue.ids[0]);
    else { $("detail").hidden = true; state.record = null; showNotice("All photos are labelled. Export them with `vlm-inspect export`."); }
    return;
  }
  const ids = records.map((r) => r.id);
  const at = ids.indexOf(state.record.id); // the next one in the list's order, or its first
  const next = at >= 0 ? ids[at + 1] : ids[0];
  if (next !== undefined) await openRecord(next);
}

async function exportCsv() {
  try {
    const blob = await (await api("/v1/station/records.csv?" + filterQuery())).blob();
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `inspections-${new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-")}.csv`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  } catch (err) {
    showNotice(String(err.message || err));
  }
}

function remember(id, store, name) {
  $(id).value = store.getItem(name) || "";
  $(id).addEventListener("change", (ev) => store.setItem(name, ev.target.value));
}

document.addEventListener("DOMContentLoaded", async () => {
  remember("api-key", sessionStorage, "vlm-inspect-key"); // the same key as the inspection page
  remember("operator", localStorage, "vlm-inspect-operator");
  if (state.label) {
    document.body.classList.add("labeller");
    $("title").textContent = "Label photos";
    document.title = "vlm-inspect · label";
    for (const part of $("filters").children) part.hidden = !part.classList.contains("order"); // the queue's order stays
  }
  const given = new URLSearchParams(location.search).get("order");
  if (given) $("order").value = given;
  $("order").addEventListener("change", async () => {
    state.offset = 0;
    const records = await loadList();
    if (state.label) await openNext(records);
  });
  wireCanvas();
  $("filters").addEventListener("submit", (ev) => { ev.preventDefault(); state.offset = 0; loadList(); });
  $("export-csv").addEventListener("click", exportCsv);
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); loadList(); });
  $("next").addEventListener("click", () => { state.offset += PAGE; loadList(); });
  document.querySelectorAll(".choose").forEach((b) => b.addEventListener("click", () => {
    state.verdict = b.dataset.verdict;
    if (state.verdict === "OK") state.boxes = [];
    renderChoice();
  }));
  $("undo-box").addEventListener("click", () => { state.boxes.pop(); renderChoice(); });
  $("clear-boxes").addEventListener("click", () => { state.boxes = []; renderChoice(); });
  $("review").addEventListener("submit", (ev) => { ev.preventDefault(); saveReview(false); });
  $("save-next").addEventListener("click", () => saveReview(true));
  $("api-key").addEventListener("change", () => { loadList(); loadGolden(); });
  $("golden-add").addEventListener("click", () => putGolden([...goldenIds(), state.record.id]));
  $("golden-clear").addEventListener("click", () => putGolden([]));
  await loadGolden();
  const records = await loadList();
  const wanted = Number(location.hash.slice(1));
  if (wanted) await openRecord(wanted);
  else if (state.label && records.length) await openNext(records);
});
