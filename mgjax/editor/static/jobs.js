// The running half of the page: queue an edit or a generation, follow its events (server-sent
// events: every event of the job so far, then live ones, so a reloaded page picks the run up
// again), cancel it, and show the result.
"use strict";

const J = { id: null, source: null, events: null, showingSource: false, result: null };

function follow(id, kind) {
  if (J.events) J.events.close();
  J.id = id;
  if (kind === "edit") localStorage.setItem("mgjax-editor-job", id);
  $("cancel").disabled = false;
  $("run").disabled = kind === "edit";
  $("bar").value = 0;
  $("figures").textContent = "";
  const es = new EventSource(`/api/jobs/${id}/events`);
  J.events = es;
  es.onmessage = (m) => onEvent(id, kind, JSON.parse(m.data));
  es.addEventListener("end", () => { es.close(); finish(); });
  es.onerror = () => { // the server went away, or the job is unknown to it
    if (es.readyState === EventSource.CLOSED) { finish(); }
  };
}

function finish() {
  $("cancel").disabled = true;
  $("run").disabled = false;
  if (J.events) { J.events.close(); J.events = null; }
}

const fmt = (v, d = 2) => (v === null || v === undefined ? "--" : Number(v).toFixed(d));
function duration(s) {
  if (s === null || s === undefined) return "--";
  return `${Math.floor(s / 60)}m${(s % 60).toFixed(0).padStart(2, "0")}s`;
}

function onEvent(id, kind, e) {
  const status = $("status");
  if (e.type === "queued" || e.type === "place") {
    status.textContent = e.place > 1 ? `queued: place ${e.place} (${e.place - 1} ahead)` : "queued: next";
  } else if (e.type === "started") {
    status.textContent = kind === "edit" ? "running" : "generating the source";
  } else if (e.type === "phase") {
    status.textContent = e.text;
  } else if (e.type === "progress") {
    $("bar").max = e.total;
    $("bar").value = e.done;
    status.textContent = `step ${e.done}/${e.total}`;
    $("figures").textContent = `${e.done}/${e.total} steps, ${fmt(e.evals_per_s)} evals/s, ` +
      `ETA ${duration(e.eta_s)}, energy ${fmt(e.energy, 4)}`;
  } else if (e.type === "x0") {
    $("x0").hidden = false;
    $("x0").src = `/api/jobs/${id}/files/${e.file}`;
    $("x0-label").textContent = `x0 estimate at step ${e.step}`;
  } else if (e.type === "cancelling") {
    status.textContent = e.message;
  } else if (e.type === "cancelled") {
    status.textContent = e.step !== undefined ? `cancelled at step ${e.step}` : "cancelled";
  } else if (e.type === "failed") {
    status.textContent = "failed";
    showError(e.message);
  } else if (e.type === "done") {
    status.textContent = "done";
    if (kind === "edit") showResult(id, e);
    else sourceGenerated(e);
  }
}

function sourceGenerated(e) {
  S.sceneMask = null;
  $("seed").value = e.seed;
  setSource({ image: null, url: `/api/images/${e.image}`, width: e.width, height: e.height,
    note: `generated from the prompt, seed ${e.seed}` });
}

function showResult(id, e) {
  J.result = { id, ...e };
  $("result").hidden = false;
  $("result-name").textContent = e.folder.split("/").pop();
  $("folder").textContent = e.folder;
  $("zip").href = `/api/jobs/${id}/zip`;
  const sel = $("sample");
  sel.innerHTML = "";
  e.samples.forEach((s, n) => sel.add(new Option(`${s} (seed ${e.metrics[n].seed})`, n)));
  sel.hidden = e.samples.length < 2;
  showSample();
}

function showSample() {
  const r = J.result;
  const n = Number($("sample").value || 0);
  const base = `/api/jobs/${r.id}/files/${r.samples[n]}`;
  J.showingSource = false;
  $("result-image").src = `${base}/edited.png`;
  $("result-caption").textContent = "edit";
  $("toggle").textContent = "Show source";
  $("achieved").src = `${base}/achieved_flow.png`;
  $("target").src = `${base}/target_flow.png`;
  $("panel").src = `${base}/panel.png`;
  $("losses").src = `${base}/losses.png`;
  const table = $("metrics");
  table.innerHTML = "";
  for (const [k, v] of Object.entries(r.metrics[n])) {
    if (typeof v !== "number") continue;
    const row = table.insertRow();
    row.insertCell().textContent = k;
    row.insertCell().textContent = Number.isInteger(v) ? v : v.toPrecision(4);
  }
}

function toggleSource() {
  const r = J.result;
  if (!r) return;
  const n = Number($("sample").value || 0);
  J.showingSource = !J.showingSource;
  const which = J.showingSource ? "source" : "edited";
  $("result-image").src = `/api/jobs/${r.id}/files/${r.samples[n]}/${which}.png`;
  $("result-caption").textContent = J.showingSource ? "source" : "edit";
  $("toggle").textContent = J.showingSource ? "Show edit" : "Show source";
}

async function runEdit() {
  showError("");
  $("result").hidden = true;
  $("x0").hidden = true;
  $("x0-label").textContent = "";
  const r = await postJSON("/api/run", spec());
  follow(r.id, "edit");
}

async function generateSource() {
  showError("");
  const r = await postJSON("/api/generate", spec());
  follow(r.id, "generate");
}

async function resume() { // a reload during a run: follow it again, from its first event
  const id = localStorage.getItem("mgjax-editor-job");
  if (!id) return;
  try {
    const job = await api(`/api/jobs/${id}`);
    follow(job.id, job.kind);
  } catch (e) {
    localStorage.removeItem("mgjax-editor-job"); // the server was restarted
  }
}

window.addEventListener("editor-ready", () => {
  const guard = (fn) => async () => { try { await fn(); } catch (e) { showError(e.message); } };
  $("run").onclick = guard(runEdit);
  $("generate").onclick = guard(generateSource);
  $("cancel").onclick = guard(async () => { if (J.id) await postJSON(`/api/jobs/${J.id}/cancel`, {}); });
  $("toggle").onclick = toggleSource;
  $("sample").onchange = showSample;
  resume();
});
