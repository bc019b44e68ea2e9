// The operator screen: polls /api/status (2 s) and /api/trajectories (15 s); signs through the API.
// Every POST carries the session's CSRF token (the page's <meta name="csrf-token">) in X-CSRF-Token.
"use strict";

const CSRF_TOKEN = document.querySelector('meta[name="csrf-token"]').content;

const PLOTS = [
  ["viable_cells", "viable cells [1e6/mL]"], ["viability", "viability [%]"], ["glucose", "glucose [g/L]"], ["lactate", "lactate [g/L]"],
  ["ammonia", "ammonia [mM]"], ["osmolality", "osmolality [mOsm/kg]"], ["titer", "titer [g/L]"], ["volume", "volume [L]"],
];
const LABELS = { viable_cells: "viable cells", glucose: "glucose", lactate: "lactate", ammonia: "ammonia", titer: "titer", volume: "volume", glutamine: "glutamine", temperature: "temperature" };
const TRUST_SOURCES = {
  calibration_envelope: "what the model's calibration data covered, plus a margin",
  recipe_band: "a band around the platform recipe (no calibration), widened as lab results confirm the model",
  off: "off: the equipment's range",
};
let current = null;

function fmt(value, digits = 2) { return value === null || value === undefined ? "—" : Number(value).toFixed(digits); }

function text(id, value) { document.getElementById(id).textContent = value; }

function list(id, entries, empty) {
  const ul = document.getElementById(id);
  ul.replaceChildren();
  if (!entries.length) { const li = document.createElement("li"); li.className = "muted"; li.textContent = empty; ul.append(li); return; }
  for (const [code, message] of entries) { const li = document.createElement("li"); li.textContent = `${code}: ${message}`; ul.append(li); }
}

function rows(tableId, pairs) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren();
  for (const [label, value] of pairs) {
    const tr = document.createElement("tr");
    const a = document.createElement("td"); a.textContent = label;
    const b = document.createElement("td"); b.className = "num"; b.textContent = value;
    tr.append(a, b); body.append(tr);
  }
}

async function getJson(url) {
  const response = await fetch(url, { credentials: "same-origin", headers: { "X-Background-Refresh": "1" } });
  if (response.status === 401) { window.location = "/login"; throw new Error("logged out"); }
  return response.json();
}

async function refreshStatus() {
  const s = await getJson("/api/status");
  text("clock", s.process_time_h === null ? "not started" : `day ${fmt(s.process_time_h / 24)} (${fmt(s.process_time_h, 1)} h)`);
  const state = document.getElementById("state");
  state.textContent = `${s.state} (requested ${s.requested_mode})`;
  state.className = "pill " + ({ closed_loop: "ok", advisory: "ok", held: "warn", fault: "bad", off: "" }[s.state] || "");
  const link = document.getElementById("link");
  link.textContent = s.link_up ? "PLC link up" : "PLC link DOWN";
  link.className = "pill " + (s.link_up ? "ok" : "bad");
  text("reason", s.reason);
  list("alarms", Object.entries(s.alarms), "none");
  list("quality", Object.entries(s.data_quality), "all signals good");
  if (s.estimate) {
    rows("estimate-table", Object.keys(LABELS).map((k) => [LABELS[k], `${fmt(s.estimate.state[k])} ± ${fmt(s.estimate.sd[k])}`])
      .concat(Object.entries(s.estimate.multipliers).map(([k, v]) => [`× ${k.split(".").pop()}`, fmt(v, 3)]))
      .concat(widenedNoise(s.estimate.inflation)));
  }
  showTrust(s.trust);
  current = s.recommendation;
  const r = s.recommendation;
  if (r) {
    rows("rec-table", [
      ["made at", `${fmt(r.made_at_h, 1)} h (valid until ${fmt(r.expires_at_h, 1)} h)`],
      ["id", `${r.recommendation_id.slice(0, 8)} (digest ${r.digest.slice(0, 12)})`],
      ["status", r.status + (r.signature ? ` by ${r.signature.printed_name}: ${r.signature.reason}` : "")],
      ["nutrient feed", `${fmt(r.feed_rate_lph)} L/h`], ["glucose feed", `${fmt(r.glucose_rate_lph)} L/h`],
      ["temperature", `${fmt(r.temperature_degc, 1)} °C`],
      ["harvest", r.harvest_now ? "NOW" : `${fmt(r.harvest_time_h, 0)} h (day ${fmt(r.harvest_time_h / 24, 1)})`],
      ["predicted titer at harvest", `${fmt(r.predicted_titer_g_per_l)} g/L (recipe: ${fmt(r.recipe_titer_g_per_l)})`],
      ["predicted score", `${fmt(r.predicted_score_g_per_day, 0)} g/day (recipe: ${fmt(r.recipe_score_g_per_day, 0)})`],
    ]);
  }
}

function range(pair, digits, unit) { return pair ? `${fmt(pair[0], digits)} – ${fmt(pair[1], digits)} ${unit}` : "—"; }

function showTrust(trust) {
  const banner = document.getElementById("stood-down");
  if (!trust) { banner.hidden = true; rows("trust-table", [["region", "no cycle yet"]]); return; }
  const down = trust.stood_down && !trust.reenabled;
  banner.hidden = !down;
  if (down) text("stood-down-why", `${labResults(trust.misses)} in a row missed what the plans predicted (${labResults(trust.misses_to_recipe)} missed in a row stand it down). ${sinceStoodDown(trust)}`);
  const harvest = trust.harvest_h ? `${range(trust.harvest_h, 0, "h")} (day ${fmt(trust.harvest_h[0] / 24, 1)} – ${fmt(trust.harvest_h[1] / 24, 1)})` : "—";
  rows("trust-table", [
    ["status", down ? "STOOD DOWN: the platform recipe runs" : trust.reenabled ? "re-enabled: the NMPC plans again from the next cycle" : "the NMPC plans inside the region"],
    ["source", TRUST_SOURCES[trust.source] || trust.source],
    ["width", `${fmt(100 * trust.width, 0)} %` + (trust.widens === false ? " (held: a calibrated model its records did not show to rank their outcomes right; results narrow it, none widen it)" : "")
      + (trust.feed_width !== undefined && trust.feed_width < trust.width ? `; nutrient feed ${fmt(100 * trust.feed_width, 0)} % (only results of the fed culture widen it)` : "")],
    ["reach earned", trust.reach_scale === undefined ? "—" : `× ${fmt(trust.reach_scale, 2)} (results the plans predicted days ahead)`],
    ["temperature", range(trust.temperature_degc, 1, "°C") + endgame(trust)],
    ["nutrient feed", range(trust.feed_rate_lph, 2, "L/h") + endgame(trust)],
    ["lowest glucose planned", trust.glucose_min_g_per_l === undefined ? "—" : `${fmt(trust.glucose_min_g_per_l)} g/L` + glucoseError(trust.glucose_error_g_per_l)],
    ["highest glucose planned", trust.glucose_max_g_per_l === undefined ? "—" : `${fmt(trust.glucose_max_g_per_l)} g/L`],
    ["glucose feed at most", trust.glucose_feed_max_lph === undefined ? "— (no lab consumption yet, or no limit)" : `${fmt(trust.glucose_feed_max_lph, 3)} L/h (the recipe's lab-driven rate plus a headroom scaled by the width)`],
    ["harvest", harvest],
    ["misses in a row", `${trust.misses} of ${trust.misses_to_recipe}`],
    ...(down ? [["since the stand-down", sinceStoodDown(trust)]] : []),
    ["last lab check", trust.last_check || "none yet"],
  ]);
}

function labResults(n) { return n === 1 ? "1 lab result" : `${n} lab results`; }

// Stood down, the monitor still holds each lab result against the model run with what the recipe gave: the evidence to re-enable on.
function sinceStoodDown(trust) {
  const n = trust.shadow_confirmations || 0, held = trust.shadow_checks || 0;
  const shown = !held ? "no lab result has been held against the model yet"
    : n ? `the model run with what the recipe gave predicted the last ${labResults(n)} in a row within tolerance, a day and three days ahead`
    : `${labResults(held)} held against the model run with what the recipe gave, and 0 of the last in a row within tolerance a day and three days ahead`;
  return `Since then ${shown}; an engineer decides whether to re-enable it (a model that predicts the recipe's course may still lose with its own moves).`;
}

// In the last days before the harvest the plan holds to what the batch has run: a move then is one no lab result checks in time.
function endgame(trust) { return trust.endgame ? " (end-game: within what the batch has run since the shift)" : ""; }

// Why the floor is where it is: the day-ahead glucose error it keeps two of above the limit (the tolerance's, or the batch's own shortfalls).
function glucoseError(error) {
  return error === undefined || error === null ? "" : ` (keeps two day-ahead glucose errors of ${fmt(error)} g/L above the limit)`;
}

// The consistency monitor's factors: a signal the model explains worse than it assumed widens the process noise of what it observes.
// Records made before the estimate carried them have no mapping: none widened.
function widenedNoise(inflation) {
  const widened = Object.entries(inflation || {}).filter(([, factor]) => factor !== 1).sort(([, a], [, b]) => b - a);
  if (!widened.length) return [["process noise widened: none", "every signal within the uncertainty the model assumed"]];
  return widened.map(([signal, factor]) => [
    `process noise widened: ${signal}`,
    `× ${fmt(factor, factor < 1.1 ? 2 : 1)} (the model explains this signal worse than it assumed: the ± of what it observes is widened)`,
  ]);
}

async function refreshPlots() {
  const data = await getJson("/api/trajectories");
  const container = document.getElementById("plots");
  for (const [name, title] of PLOTS) {
    let div = document.getElementById(`plot-${name}`);
    if (!div) { div = document.createElement("div"); div.id = `plot-${name}`; container.append(div); }
    const traces = [];
    const band = (series, colour, label, dash) => {
      const t = series.t.map((v) => v / 24);
      traces.push({ x: t, y: series.mean.map((m, i) => m + 2 * series.sd[i]), mode: "lines", line: { width: 0 }, showlegend: false, hoverinfo: "skip" });
      traces.push({ x: t, y: series.mean.map((m, i) => m - 2 * series.sd[i]), mode: "lines", fill: "tonexty", fillcolor: colour.replace("1)", "0.15)"), line: { width: 0 }, name: `${label} ± 2 sd` });
      traces.push({ x: t, y: series.mean, mode: "lines", line: { color: colour, dash }, name: label });
    };
    if (data.estimates[name]) band(data.estimates[name], "rgba(31,95,191,1)", "estimate", "solid");
    if (data.forecast && data.forecast[name]) band(data.forecast[name], "rgba(120,60,170,1)", "forecast to harvest", "dash");
    const lab = data.lab[name];
    if (lab) traces.push({ x: lab.t.map((t) => t / 24), y: lab.value, mode: "markers", marker: { color: "#d9822b" }, name: "lab (at draw)" });
    if (name === "volume") traces.push({ x: data.online.volume.t.map((t) => t / 24), y: data.online.volume.value, mode: "lines", line: { color: "#999", width: 1 }, name: "load cell" });
    Plotly.react(div, traces, { title: { text: title, font: { size: 13 } }, margin: { l: 45, r: 10, t: 30, b: 35 }, xaxis: { title: "day" }, showlegend: name === "viable_cells", legend: { orientation: "h", y: -0.25 } }, { displayModeBar: false, responsive: true });
  }
}

async function post(url, body) {
  const response = await fetch(url, { method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json", "X-CSRF-Token": CSRF_TOKEN }, body: JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.detail || response.statusText);
  return data;
}

function wire() {
  const sign = document.getElementById("sign-form");
  if (sign) sign.addEventListener("submit", async (event) => {
    event.preventDefault();
    const result = document.getElementById("sign-result");
    const meaning = event.submitter ? event.submitter.value : "approve";
    if (!current) { result.textContent = "no recommendation"; result.className = "result error"; return; }
    const form = new FormData(sign);
    try {
      // The signature names the recommendation shown (its id and content digest): if another is current by now, the runtime refuses it.
      const url = `/api/recommendations/${encodeURIComponent(current.recommendation_id)}/${meaning}`;
      const signed = await post(url, { digest: current.digest, password: form.get("password"), reason: form.get("reason") });
      result.textContent = `${signed.status} (recommendation of ${fmt(signed.made_at_h, 1)} h)`; result.className = "result ok";
      sign.reset();
    } catch (error) { result.textContent = error.message; result.className = "result error"; }
    refreshStatus();
  });
  const reenable = document.getElementById("reenable-form");
  if (reenable) reenable.addEventListener("submit", async (event) => {
    event.preventDefault();
    const result = document.getElementById("reenable-result");
    const form = new FormData(reenable);
    try {
      await post("/api/nmpc/reenable", { password: form.get("password"), reason: form.get("reason") });
      result.textContent = "re-enabled; the NMPC plans again from the next cycle"; result.className = "result ok";
      reenable.reset();
    } catch (error) { result.textContent = error.message; result.className = "result error"; }
    refreshStatus();
  });
  const mode = document.getElementById("mode-form");
  if (mode) mode.addEventListener("submit", async (event) => {
    event.preventDefault();
    const result = document.getElementById("mode-result");
    const form = new FormData(mode);
    try {
      await post("/api/mode", { mode: form.get("mode"), password: form.get("password"), reason: form.get("reason") });
      result.textContent = "requested; takes effect at the next cycle"; result.className = "result ok";
      mode.reset();
    } catch (error) { result.textContent = error.message; result.className = "result error"; }
  });
}

wire();
refreshStatus(); refreshPlots();
setInterval(refreshStatus, 2000);
setInterval(refreshPlots, 15000);
