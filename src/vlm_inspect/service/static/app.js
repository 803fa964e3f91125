// Operator page: send each photo to POST /v1/inspect and show its verdict. No build step, no CDN.
"use strict";

const TEXT = {
  en: {
    title: "Visual inspection", describe: "Describe defects", locate: "Box defects", apiKey: "API key",
    drop: "Drop photos here, or click to choose", dropHint: "One or many photos; each gets an OK/NG verdict.",
    total: "Total", ok: "OK", ng: "NG", ngRate: "NG rate", errors: "Errors", export: "Export CSV", clear: "Clear",
    png: "p(NG)", pass: "Pass", fail: "Reject", error: "Error", waiting: "Inspecting…",
    needKey: "This server needs an API key: enter it at the top right, then drop the photos again.",
    nothing: "Nothing to export yet.", threshold: "threshold", lang: "中文", history: "History",
    useReference: "Compare with reference", judgedAgainst: "Judged against",
    ownReference: "Use another reference photo", modelReference: "Model's reference",
    noReference: "no reference: each photo is judged alone", alone: "judged alone", vs: "vs",
  },
  zh: {
    title: "外观检测", describe: "描述缺陷", locate: "框出缺陷", apiKey: "API 密钥",
    drop: "将照片拖放到此处，或点击选择", dropHint: "可一次选择多张照片，每张给出 OK/NG 判定。",
    total: "总数", ok: "合格 OK", ng: "不合格 NG", ngRate: "不良率", errors: "错误", export: "导出 CSV", clear: "清空",
    png: "NG 概率", pass: "合格", fail: "不合格", error: "错误", waiting: "检测中…",
    needKey: "此服务器需要 API 密钥：请在右上角输入后重新拖放照片。",
    nothing: "还没有可导出的结果。", threshold: "阈值", lang: "English", history: "历史记录",
    useReference: "与参考样品对比", judgedAgainst: "对比参考",
    ownReference: "使用其他参考照片", modelReference: "模型的参考样品",
    noReference: "无参考样品：每张照片单独判定", alone: "单独判定", vs: "对比",
  },
};
const PARALLEL = 4; // requests in flight; the server batches them for the model

const state = { lang: "en", rows: [], queue: [], running: 0, reference: null, ownReference: null };
const $ = (id) => document.getElementById(id);

function t(key) {
  return TEXT[state.lang][key] ?? TEXT.en[key] ?? key;
}

function setLang(lang) {
  state.lang = lang;
  localStorage.setItem("vlm-inspect-lang", lang);
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  $("lang").textContent = t("lang");
  showReference();
  state.rows.forEach(render);
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

// The model's known-good reference photos (GET /v1/reference), shown above the results: what each verdict is
// judged against unless the operator unticks the box or picks another reference photo.
async function loadReference() {
  try {
    const response = await fetch("/v1/reference", { headers: authHeaders() });
    if (!response.ok) return;
    state.reference = (await response.json()).reference;
    const thumbs = $("reference-photos");
    thumbs.textContent = "";
    for (const [i, photo] of (state.reference?.photos || []).entries()) {
      const image = await fetch(`/v1/reference/${i}`, { headers: authHeaders() });
      if (!image.ok) continue;
      const img = document.createElement("img");
      img.src = URL.createObjectURL(await image.blob());
      img.alt = img.title = photo.file;
      thumbs.append(img);
    }
  } catch (err) { /* the page still inspects; it shows no reference */ }
  showReference();
}

function showReference() {
  const own = state.ownReference;
  const used = $("use-reference").checked;
  const known = own ? { name: "upload", photos: [{ file: own.name }] } : state.reference;
  $("reference").classList.toggle("off", !used);
  $("reference-name").textContent = known && used ? referenceLabel(known) : t("noReference");
  $("reference-clear").hidden = !own;
  if (own) {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(own);
    img.alt = img.title = own.name;
    $("reference-photos").replaceChildren(img);
  }
}

function referenceLabel(record) {
  return record ? `${record.name}: ${record.photos.map((p) => p.file).join(", ")}` : t("alone");
}

function addFiles(files) {
  hideNotice();
  for (const file of files) {
    const row = { file, name: file.name, status: "pending", card: makeCard(file) };
    state.rows.push(row);
    state.queue.push(row);
  }
  updateTally();
  pump();
}

function makeCard(file) {
  const card = $("card").content.firstElementChild.cloneNode(true);
  card.querySelector("img").src = URL.createObjectURL(file);
  card.querySelector(".file").textContent = file.name;
  card.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  $("results").prepend(card);
  return card;
}

function pump() {
  while (state.running < PARALLEL && state.queue.length) {
    const row = state.queue.shift();
    state.running += 1;
    inspect(row).finally(() => { state.running -= 1; pump(); });
  }
}

async function inspect(row) {
  const form = new FormData();
  form.append("file", row.file, row.name);
  form.append("describe", $("describe").checked ? "true" : "false");
  form.append("locate", $("locate").checked ? "true" : "false");
  // Unticked: the photo alone; another reference photo picked: judged against it; else the model's own.
  if (!$("use-reference").checked) form.append("reference", "none");
  else if (state.ownReference) form.append("reference", state.ownReference, state.ownReference.name);
  // A station server records where the photo came from and its name.
  const headers = { "X-Inspect-Source": "page", "X-Inspect-File": encodeURIComponent(row.name) };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  try {
    const response = await fetch("/v1/inspect", { method: "POST", body: form, headers });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      if (response.status === 401) showNotice(t("needKey"));
      throw new Error(body.error?.message || `HTTP ${response.status}`);
    }
    Object.assign(row, body, { status: "done", time: new Date().toISOString() });
  } catch (err) {
    Object.assign(row, { status: "error", error: String(err.message || err), time: new Date().toISOString() });
  }
  render(row);
  updateTally();
}

function render(row) {
  const card = row.card;
  card.className = "card " + (row.status === "done" ? row.verdict.toLowerCase() : row.status);
  const badge = card.querySelector(".badge");
  const meta = card.querySelector(".meta");
  if (row.status === "pending") {
    badge.textContent = "…";
    meta.textContent = t("waiting");
  } else if (row.status === "error") {
    badge.textContent = "!";
    meta.textContent = `${t("error")}: ${row.error}`;
  } else {
    badge.textContent = row.verdict;
    badge.title = row.verdict === "NG" ? t("fail") : t("pass");
    card.querySelector(".p").textContent = row.p_ng.toFixed(3);
    card.querySelector(".bar i").style.width = `${Math.round(row.p_ng * 100)}%`;
    card.querySelector(".desc").textContent = row.description || "";
    drawBoxes(card.querySelector(".photo"), row.defects || []);
    meta.textContent = `${row.verdict === "NG" ? t("fail") : t("pass")} · ${t("threshold")} ${row.threshold} · ${Math.round(row.latency_ms)} ms`;
    if (row.record_id) meta.textContent += ` · #${row.record_id}`;
    const vs = document.createElement("span"); // which reference this verdict was judged against
    vs.className = row.reference ? "vs" : "";
    vs.textContent = row.reference ? ` · ${t("vs")} ${referenceLabel(row.reference)}` : ` · ${t("alone")}`;
    meta.append(vs);
  }
}

// Each defect's box over the photo, in % of the photo's own pixels (the server answers in those).
function drawBoxes(photo, defects) {
  photo.querySelectorAll(".box").forEach((el) => el.remove());
  const img = photo.querySelector("img");
  const place = () => {
    const [w, h] = [img.naturalWidth, img.naturalHeight];
    if (!w || !h) return;
    for (const d of defects) {
      const [x0, y0, x1, y1] = d.box;
      const box = document.createElement("span");
      box.className = "box";
      box.title = d.type || "";
      Object.assign(box.style, { left: `${(100 * x0) / w}%`, top: `${(100 * y0) / h}%`,
        width: `${(100 * (x1 - x0)) / w}%`, height: `${(100 * (y1 - y0)) / h}%` });
      photo.append(box);
    }
  };
  if (img.complete) place(); else img.addEventListener("load", place, { once: true });
}

function updateTally() {
  const done = state.rows.filter((r) => r.status === "done");
  const ng = done.filter((r) => r.verdict === "NG").length;
  $("n-total").textContent = state.rows.length;
  $("n-ok").textContent = done.length - ng;
  $("n-ng").textContent = ng;
  $("n-err").textContent = state.rows.filter((r) => r.status === "error").length;
  $("ng-rate").textContent = done.length ? `${((100 * ng) / done.length).toFixed(1)}%` : "–";
}

function csvCell(value) {
  let text = value === undefined || value === null ? "" : typeof value === "object" ? JSON.stringify(value) : String(value);
  if (/^[=+\-@\t\r]/.test(text)) text = "'" + text; // keep spreadsheets from running it as a formula
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function exportCsv() {
  if (!state.rows.length) { showNotice(t("nothing")); return; }
  const head = ["file", "verdict", "p_ng", "threshold", "description", "defects", "reference", "model", "latency_ms", "time", "error"];
  const lines = [head.join(",")].concat(state.rows.map((r) => head.map((k) => csvCell(k === "file" ? r.name : r[k])).join(",")));
  // The byte-order mark makes Excel read the Chinese text as UTF-8.
  const blob = new Blob(["\ufeff" + lines.join("\r\n") + "\r\n"], { type: "text/csv;charset=utf-8" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `inspection-${new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-")}.csv`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function clearSession() {
  state.queue.length = 0;
  state.rows.forEach((r) => URL.revokeObjectURL(r.card.querySelector("img").src));
  state.rows = [];
  $("results").textContent = "";
  hideNotice();
  updateTally();
}

function showNotice(text) { $("notice").textContent = text; $("notice").hidden = false; }
function hideNotice() { $("notice").hidden = true; }

function wireDrop() {
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((e) => drop.addEventListener(e, (ev) => { ev.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((e) => drop.addEventListener(e, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); addFiles(ev.dataTransfer.files); });
  // A photo dropped beside the zone should not make the browser navigate away from the session.
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());
  $("files").addEventListener("change", (ev) => { addFiles(ev.target.files); ev.target.value = ""; });
}

document.addEventListener("DOMContentLoaded", () => {
  wireDrop();
  $("export").addEventListener("click", exportCsv);
  $("clear").addEventListener("click", clearSession);
  $("lang").addEventListener("click", () => setLang(state.lang === "en" ? "zh" : "en"));
  $("api-key").value = sessionStorage.getItem("vlm-inspect-key") || "";
  $("api-key").addEventListener("change", (ev) => { sessionStorage.setItem("vlm-inspect-key", ev.target.value); loadReference(); });
  $("use-reference").addEventListener("change", showReference);
  $("reference-file").addEventListener("change", (ev) => { state.ownReference = ev.target.files[0] || null; showReference(); });
  $("reference-clear").addEventListener("click", () => {
    state.ownReference = null;
    $("reference-file").value = "";
    loadReference();
  });
  const saved = localStorage.getItem("vlm-inspect-lang");
  setLang(saved || (navigator.language.startsWith("zh") ? "zh" : "en"));
  loadReference();
});
