// The quality engineer's line view: p-charts with run rules, drift, latency and the audit estimates.
// Plain JS, no build step, no CDN. The charts arrive as SVG text drawn by the server (station/charts.py).
"use strict";

const $ = (id) => document.getElementById(id);
const seen = { line: new Set(), model: new Set() };

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

async function api(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    const message = body.error?.message || `HTTP ${response.status}`;
    throw new Error(response.status === 401 ? "This server needs an API key: enter it at the top right." : message);
  }
  return response.json();
}

function showNotice(text) { $("notice").textContent = text; $("notice").hidden = !text; }

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

const pct = (v, digits = 1) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(digits)}%`);
const interval = (e) => (e.low === null ? "" : ` [${pct(e.low)}–${pct(e.high)}]`);

function query() {
  const params = new URLSearchParams();
  for (const [name, value] of new FormData($("line-filters"))) if (value) params.set(name, value);
  return params;
}

function fillOptions(name, values) {
  const select = $("line-filters").elements[name];
  const chosen = select.value;
  values.forEach((v) => seen[name].add(v));
  select.length = 1;
  for (const v of [...seen[name]].sort()) select.add(new Option(v, v, false, v === chosen));
}

async function load() {
  const params = query();
  history.replaceState(null, "", `${location.pathname}?${params}`);
  try {
    const [view, health] = await Promise.all([api("/v1/station/line?" + params), api("/v1/station/health")]);
    renderAlarm(health);
    renderGroups(view);
    renderAudit(view.audit);
    fillOptions("line", view.groups.map((g) => g.line));
    fillOptions("model", view.groups.map((g) => g.model));
    const form = $("line-filters").elements;
    if (!form.since.value) form.since.value = view.since;
    if (!form.until.value) form.until.value = view.until;
    $("zone").textContent = `${view.timezone}; shifts start ${view.shift_hours.map((h) => String(h).padStart(2, "0") + ":00").join(", ")}`;
    $("summary").textContent = `${view.groups.length} line/model pair(s), ${view.since} to ${view.until}, per ${view.period}; drift checked ${health.checked || "–"}`;
    showNotice("");
  } catch (err) {
    showNotice(String(err.message || err));
  }
}

function renderAlarm(health) {
  const box = $("alarm");
  box.textContent = "";
  const raised = health.lines.filter((l) => l.status === "alarm" || l.status === "warn");
  box.hidden = raised.length === 0;
  box.className = "alarm " + (raised.some((l) => l.status === "alarm") ? "raised" : "warned");
  for (const l of raised) {
    const p = el("p");
    p.appendChild(el("b", null, l.status === "alarm" ? "Drift alarm" : "Drift warning"));
    p.appendChild(document.createTextNode(` — line ${l.line}, model ${l.model}: ${l.reasons.join("; ")}`));
    box.appendChild(p);
  }
}

function svgInto(node, text) {
  // Server-drawn SVG (every name in it escaped there); nothing else on this page is inserted as markup.
  if (text) node.innerHTML = text;
  else node.appendChild(el("p", "hint", "no data"));
}

function renderGroups(view) {
  const box = $("groups");
  box.textContent = "";
  if (!view.groups.length) box.appendChild(el("p", "hint", "No inspection in these days."));
  for (const g of view.groups) {
    const card = el("article", "group");
    const head = el("h2", null, `${g.line} · ${g.model} `);
    head.appendChild(el("small", null, g.model_hash.slice(0, 8)));
    const status = g.drift ? g.drift.status : "collecting";
    head.appendChild(el("span", "status " + status, status));
    card.appendChild(head);
    const chart = el("div", "pchart");
    svgInto(chart, g.charts.p_chart);
    card.appendChild(chart);
    card.appendChild(rulesTable(g.breaks));
    const row = el("div", "row");
    const hist = el("div", "hist");
    svgInto(hist, g.charts.histogram);
    hist.appendChild(el("p", "hint", driftText(g.drift)));
    const lat = el("div", "lat");
    svgInto(lat, g.charts.latency);
    const l = g.latency;
    lat.appendChild(el("p", "hint", `latency p50 ${ms(l.p50_ms)}, p95 ${ms(l.p95_ms)}, p99 ${ms(l.p99_ms)} over ${l.n || 0} inspections`));
    row.append(hist, lat);
    card.appendChild(row);
    box.appendChild(card);
  }
}

const ms = (v) => (v === null || v === undefined ? "–" : `${Math.round(v)} ms`);

function rulesTable(breaks) {
  if (!breaks.length) return el("p", "rules none", "No run rule broken.");
  const table = el("table", "rules");
  const head = table.createTHead().insertRow();
  ["Run rule", "Periods that broke it"].forEach((t) => head.appendChild(el("th", null, t)));
  const body = table.createTBody();
  for (const b of breaks) {
    const tr = body.insertRow();
    tr.appendChild(el("td", null, `${b.rule}: ${b.name}`));
    tr.appendChild(el("td", null, b.points.join(", ")));
  }
  return table;
}

function driftText(d) {
  if (!d) return "";
  if (d.status === "collecting") return `drift: ${d.reasons.join("; ")}`;
  const ref = d.reference ? `${d.reference.kind} baseline of ${d.reference.n}` : "no reference";
  const parts = [`PSI ${d.psi.toFixed(3)} over the last ${d.n} against the ${ref}`];
  if (d.ng_limits) parts.push(`NG rate ${pct(d.ng_rate)} (limits ${pct(d.ng_limits[0])}–${pct(d.ng_limits[1])})`);
  if (d.mixed_ng_share !== null) parts.push(`evaluation mixed at ${pct(d.mixed_ng_share)} NG`);
  return parts.join("; ");
}

function renderAudit(audit) {
  $("audit-about").textContent =
    `A seeded random ${pct(audit.rate, 1)} of inspections (seed ${audit.seed}), reviewed by operators, is the truth these ` +
    `rates come from; 95% Wilson intervals. Targets: escape ≤ ${pct(audit.escape_target)}, overkill ≤ ${pct(audit.overkill_target)} (95% upper bound).`;
  const box = $("audit-tables");
  box.textContent = "";
  for (const m of audit.models) {
    box.appendChild(el("h3", null, `${m.model} `)).appendChild(el("small", null, m.model_hash.slice(0, 8)));
    const table = el("table", "estimates");
    const head = table.createTHead().insertRow();
    ["Period", "Inspected", "Audit reviewed", "Escape (NG passed)", "Overkill (OK rejected)", "NG parts passed (est.)", "Reviews to show escape ≤ target", "… overkill ≤ target"]
      .forEach((t) => head.appendChild(el("th", null, t)));
    const body = table.createTBody();
    for (const row of m.periods) {
      const tr = body.insertRow();
      tr.className = row.period === "all" ? "all" : "";
      const cells = [
        row.period === "all" ? "all days shown" : row.period,
        row.inspected.toLocaleString(),
        `${row.reviewed} of ${row.sampled}`,
        row.escape.value === null ? "–" : `${pct(row.escape.value)}${interval(row.escape)} (${row.escape.k}/${row.escape.n})`,
        row.overkill.value === null ? "–" : `${pct(row.overkill.value)}${interval(row.overkill)} (${row.overkill.k}/${row.overkill.n})`,
        row.escaped ? `${Math.round(row.escaped[0])} [${Math.round(row.escaped[1])}–${Math.round(row.escaped[2])}] of ${row.passed.toLocaleString()}` : "–",
        needed(row.needed.escape, "NG"),
        needed(row.needed.overkill, "OK"),
      ];
      cells.forEach((c, i) => tr.appendChild(el("td", i > 0 ? "num" : null, c)));
    }
    box.appendChild(table);
  }
  if (!audit.models.length) box.appendChild(el("p", "hint", "No inspection in these days."));
}

function needed(n, cls) {
  if (n.of_class === null) return n.reason;
  const audits = n.of_audit === null ? "" : ` ≈ ${n.of_audit.toLocaleString()} audited parts`;
  return `${n.of_class} ${cls} (${n.more} more)${audits}`;
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = sessionStorage.getItem("vlm-inspect-key") || ""; // the same key as the other pages
  $("api-key").addEventListener("change", (ev) => { sessionStorage.setItem("vlm-inspect-key", ev.target.value); load(); });
  const given = new URLSearchParams(location.search);
  const form = $("line-filters").elements;
  for (const name of ["line", "model"]) if (given.get(name)) fillOptions(name, [given.get(name)]);
  for (const name of ["line", "model", "period", "since", "until"]) if (given.get(name)) form[name].value = given.get(name);
  $("line-filters").addEventListener("submit", (ev) => { ev.preventDefault(); load(); });
  load();
});
