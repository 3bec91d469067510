// The authoring half of the page: source, object mask, motion tools and the live preview.
// Everything the server computes (flows, frozen masks) is drawn as it is returned; the page
// only builds the strings launch.py takes (--motion, --drag, --object_box).
"use strict";

const $ = (id) => document.getElementById(id);
const S = {
  info: null,
  source: null, // {image: id | null, url, width, height}
  img: new Image(),
  sceneMask: null, // data URL of the chosen scene's object
  mask: document.createElement("canvas"), // W x H, opaque white = object
  hasMask: false,
  box: null, // [x0, y0, x1, y1] in pixels (x1, y1 exclusive)
  terms: [], // --motion terms, composed left to right
  pairs: [], // drag points [[x, y, X, Y], ...]
  tool: "brush",
  gesture: null,
  flowImg: null,
  frozenImg: null,
  center: null,
  scale: 8,
};

async function api(path, options = {}) {
  const r = await fetch(path, options);
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) throw new Error((body && body.error) || `${r.status} ${r.statusText}`);
  return body;
}
const postJSON = (path, obj) => api(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(obj),
});

function showError(message) {
  const e = $("error");
  e.textContent = message ? `error: ${message}` : "";
  e.hidden = !message;
}

const round = (v, d = 1) => Number(v.toFixed(d));
const num = (v) => String(round(v, 2));

// ----------------------------------------------------------------- the source

function setSource(src) {
  S.source = src;
  S.mask.width = src.width;
  S.mask.height = src.height;
  S.hasMask = false;
  S.box = null;
  S.terms = [];
  S.pairs = [];
  S.flowImg = S.frozenImg = null;
  const fit = 512 / Math.max(src.width, src.height); // shown at most 512 px a side
  S.scale = fit >= 1 ? Math.min(8, Math.floor(fit)) : fit;
  const view = $("view");
  view.width = src.width * S.scale;
  view.height = src.height * S.scale;
  S.img = new Image();
  S.img.onload = () => { draw(); preview(); };
  S.img.src = src.url;
  $("source-info").textContent = `${src.width}x${src.height}${src.note ? ", " + src.note : ""}`;
  $("motion").value = "";
  $("drag").value = "";
  $("scene-mask").hidden = !S.sceneMask;
}

async function uploadSource(file) {
  const limit = S.info.limits.max_upload_bytes;
  if (file.size > limit) {
    throw new Error(`the file is ${(file.size / 2 ** 20).toFixed(1)} MB, more than the ` +
      `${(limit / 2 ** 20).toFixed(0)} MB allowed`);
  }
  const r = await api("/api/upload", { method: "POST", body: file });
  S.sceneMask = null;
  setSource({ image: r.id, url: `/api/images/${r.id}`, width: r.width, height: r.height, note: r.note });
}

async function useScene() {
  const seed = $("scenes").value === "" ? null : Number($("scenes").value);
  const r = await postJSON("/api/scene", { seed });
  $("prompt").value = r.prompt;
  S.sceneMask = r.mask;
  setSource({ image: r.id, url: `/api/images/${r.id}`, width: r.width, height: r.height });
}

// ----------------------------------------------------------------- the object

function maskContext() { return S.mask.getContext("2d", { willReadFrequently: true }); }

function thresholdMask() { // crisp 0/255: the mask written is the mask shown
  const ctx = maskContext();
  const d = ctx.getImageData(0, 0, S.mask.width, S.mask.height);
  let any = false;
  for (let i = 0; i < d.data.length; i += 4) {
    const on = d.data[i + 3] > 127 && d.data[i] > 127;
    d.data[i] = d.data[i + 1] = d.data[i + 2] = 255;
    d.data[i + 3] = on ? 255 : 0;
    any = any || on;
  }
  ctx.putImageData(d, 0, 0);
  S.hasMask = any;
}

function loadMaskImage(url) {
  const im = new Image();
  im.onload = () => {
    const ctx = maskContext();
    ctx.clearRect(0, 0, S.mask.width, S.mask.height);
    ctx.drawImage(im, 0, 0, S.mask.width, S.mask.height);
    const d = ctx.getImageData(0, 0, S.mask.width, S.mask.height);
    const level = (i) => (d.data[i + 3] > 127 ? Math.max(d.data[i], d.data[i + 1], d.data[i + 2]) : 0);
    let top = 0;
    for (let i = 0; i < d.data.length; i += 4) top = Math.max(top, level(i));
    for (let i = 0; i < d.data.length; i += 4) { // the rule launch.py reads masks by:
      const on = top > 0 && level(i) > top / 2; // largest channel above half the mask's largest
      d.data[i + 3] = on ? 255 : 0;
      d.data[i] = d.data[i + 1] = d.data[i + 2] = 255;
    }
    ctx.putImageData(d, 0, 0);
    S.box = null;
    thresholdMask();
    changed();
  };
  im.src = url;
}

function paint(from, to, erase) { // a round-capped segment: fast strokes leave no gaps
  const ctx = maskContext();
  ctx.globalCompositeOperation = erase ? "destination-out" : "source-over";
  ctx.strokeStyle = ctx.fillStyle = "#fff";
  ctx.lineWidth = Number($("brush-size").value);
  ctx.lineCap = "round";
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x + 1e-3, to.y);
  ctx.stroke();
  ctx.globalCompositeOperation = "source-over";
}

function clearMask() {
  maskContext().clearRect(0, 0, S.mask.width, S.mask.height);
  S.hasMask = false;
  S.box = null;
}

// ----------------------------------------------------------------- the motion tools

function motionTerm(tool, p0, p) {
  const c = S.center;
  if (tool === "translate") return `translate:${num(p.x - p0.x)},${num(p.y - p0.y)}`;
  const a = { x: p0.x - c[0], y: p0.y - c[1] };
  const b = { x: p.x - c[0], y: p.y - c[1] };
  const ra = Math.hypot(a.x, a.y);
  if (ra < 1) return null; // too close to the centre to give an angle or a ratio
  if (tool === "rotate") { // counter-clockwise on screen is positive (mgjax.edit.motion.rotation)
    let deg = (Math.atan2(-b.y, b.x) - Math.atan2(-a.y, a.x)) * 180 / Math.PI;
    deg = ((deg + 540) % 360) - 180;
    return `rotate:${num(deg)}`;
  }
  if (tool === "scale") return `scale:${num(Math.max(0.05, Math.hypot(b.x, b.y) / ra))}`;
  if (tool === "stretch") { // along the direction from the centre to where the drag began
    const deg = Math.atan2(-a.y, a.x) * 180 / Math.PI;
    const s = (b.x * a.x + b.y * a.y) / (ra * ra);
    return `stretch:${num(Math.max(0.05, s))},${num(deg)}`;
  }
  return null;
}

function syncMotionFields() {
  $("motion").value = S.terms.join("+");
  $("drag").value = S.pairs.map((q) => `${num(q[0])},${num(q[1])}>${num(q[2])},${num(q[3])}`).join("; ");
}

// ----------------------------------------------------------------- pointer handling

function imagePoint(ev) {
  const r = $("view").getBoundingClientRect();
  const sx = S.source.width / r.width;
  const sy = S.source.height / r.height;
  return { x: (ev.clientX - r.left) * sx, y: (ev.clientY - r.top) * sy };
}

function onDown(ev) {
  if (!S.source) return;
  const p = imagePoint(ev);
  $("view").setPointerCapture(ev.pointerId);
  const tool = S.tool;
  S.gesture = { tool, p0: p, p };
  if (tool === "brush" || tool === "eraser") {
    S.box = null;
    paint(p, p, tool === "eraser");
  } else if (["translate", "rotate", "scale", "stretch"].includes(tool)) {
    S.pairs = [];
    S.terms.push(null);
  } else if (tool === "points") {
    S.terms = [];
    S.pairs.push([p.x, p.y, p.x, p.y]);
  }
  draw();
}

function onMove(ev) {
  const g = S.gesture;
  if (!g) return;
  const p = imagePoint(ev);
  const last = g.p;
  g.p = p;
  if (g.tool === "brush" || g.tool === "eraser") paint(last, p, g.tool === "eraser");
  else if (g.tool === "box") { /* drawn from the gesture */ }
  else if (g.tool === "points") { const q = S.pairs[S.pairs.length - 1]; q[2] = p.x; q[3] = p.y; }
  else { S.terms[S.terms.length - 1] = motionTerm(g.tool, g.p0, p); }
  if (!["brush", "eraser", "box"].includes(g.tool)) { syncMotionFields(); preview(); }
  draw();
}

function onUp(ev) {
  const g = S.gesture;
  if (!g) return;
  S.gesture = null;
  if (g.tool === "brush" || g.tool === "eraser") thresholdMask();
  if (g.tool === "box") {
    const W = S.source.width, H = S.source.height;
    const x0 = Math.max(0, Math.floor(Math.min(g.p0.x, g.p.x)));
    const y0 = Math.max(0, Math.floor(Math.min(g.p0.y, g.p.y)));
    const x1 = Math.min(W, Math.ceil(Math.max(g.p0.x, g.p.x)));
    const y1 = Math.min(H, Math.ceil(Math.max(g.p0.y, g.p.y)));
    if (x1 > x0 && y1 > y0) { clearMask(); S.box = [x0, y0, x1, y1]; }
  }
  if (S.terms.length && S.terms[S.terms.length - 1] === null) S.terms.pop();
  syncMotionFields();
  changed();
}

// ----------------------------------------------------------------- drawing

function draw() {
  const view = $("view");
  const ctx = view.getContext("2d");
  const k = view.width / (S.source ? S.source.width : 1);
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, view.width, view.height);
  if (!S.source) return;
  if (S.img.complete) ctx.drawImage(S.img, 0, 0, view.width, view.height);
  if ($("show-frozen").checked && S.frozenImg) ctx.drawImage(S.frozenImg, 0, 0, view.width, view.height);
  const flowShown = $("show-flow").checked && S.flowImg;
  if ($("show-mask").checked && !flowShown) ctx.drawImage(tinted(S.mask, "rgba(230, 30, 60, 0.45)"), 0, 0, view.width, view.height);
  if (flowShown) { // the colour wheel where something moves (transparent elsewhere)
    ctx.globalAlpha = 0.7;
    ctx.drawImage(S.flowImg, 0, 0, view.width, view.height);
    ctx.globalAlpha = 1;
  }
  if ($("show-mask").checked && S.hasMask) outline(ctx, k);
  ctx.lineWidth = 2;
  const g = S.gesture;
  const box = g && g.tool === "box" ? [g.p0.x, g.p0.y, g.p.x, g.p.y] : S.box;
  if (box) {
    ctx.strokeStyle = "#e11d48";
    ctx.strokeRect(box[0] * k, box[1] * k, (box[2] - box[0]) * k, (box[3] - box[1]) * k);
  }
  ctx.strokeStyle = "#111";
  ctx.fillStyle = "#111";
  for (const q of S.pairs) arrow(ctx, q[0] * k, q[1] * k, q[2] * k, q[3] * k);
  if (S.center && ["rotate", "scale", "stretch"].includes(S.tool)) {
    const [cx, cy] = [S.center[0] * k, S.center[1] * k];
    ctx.beginPath(); ctx.moveTo(cx - 8, cy); ctx.lineTo(cx + 8, cy);
    ctx.moveTo(cx, cy - 8); ctx.lineTo(cx, cy + 8); ctx.stroke();
  }
}

function tinted(source, colour) {
  const c = document.createElement("canvas");
  c.width = source.width; c.height = source.height;
  const t = c.getContext("2d");
  t.drawImage(source, 0, 0);
  t.globalCompositeOperation = "source-in";
  t.fillStyle = colour;
  t.fillRect(0, 0, c.width, c.height);
  return c;
}

function outline(ctx, k) { // the mask's boundary, one image pixel wide
  const w = S.mask.width, h = S.mask.height;
  const a = maskContext().getImageData(0, 0, w, h).data;
  const on = (x, y) => x >= 0 && y >= 0 && x < w && y < h && a[4 * (y * w + x) + 3] > 127;
  ctx.strokeStyle = "rgba(255, 230, 0, 0.95)";
  ctx.lineWidth = 2;
  ctx.beginPath();
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      if (!on(x, y)) continue; // a side of an object pixel that faces the outside
      if (!on(x - 1, y)) { ctx.moveTo(x * k, y * k); ctx.lineTo(x * k, (y + 1) * k); }
      if (!on(x + 1, y)) { ctx.moveTo((x + 1) * k, y * k); ctx.lineTo((x + 1) * k, (y + 1) * k); }
      if (!on(x, y - 1)) { ctx.moveTo(x * k, y * k); ctx.lineTo((x + 1) * k, y * k); }
      if (!on(x, y + 1)) { ctx.moveTo(x * k, (y + 1) * k); ctx.lineTo((x + 1) * k, (y + 1) * k); }
    }
  }
  ctx.stroke();
}

function arrow(ctx, x0, y0, x1, y1) {
  ctx.beginPath(); ctx.arc(x0, y0, 4, 0, 2 * Math.PI); ctx.fill();
  ctx.beginPath(); ctx.moveTo(x0, y0); ctx.lineTo(x1, y1); ctx.stroke();
  const a = Math.atan2(y1 - y0, x1 - x0);
  ctx.beginPath(); ctx.moveTo(x1, y1);
  ctx.lineTo(x1 - 10 * Math.cos(a - 0.4), y1 - 10 * Math.sin(a - 0.4));
  ctx.lineTo(x1 - 10 * Math.cos(a + 0.4), y1 - 10 * Math.sin(a + 0.4));
  ctx.closePath(); ctx.fill();
}

// ----------------------------------------------------------------- the preview

// the settings the page sends with an edit (authoring.PAGE_SETTINGS); each preset fills them
const PAGE_SETTINGS = ["steps", "recursive_steps", "guidance_weight", "seed", "num_samples", "mask_grow"];

function spec() {
  const s = {
    image: S.source ? S.source.image : null,
    prompt: $("prompt").value,
    mask: S.hasMask ? S.mask.toDataURL("image/png") : null,
    box: S.box ? S.box.join(",") : null,
    motion: $("motion").value || null,
    drag: $("drag").value || null,
    preset: $("preset").value,
  };
  for (const k of PAGE_SETTINGS) {
    const v = $(k).value;
    if (v !== "") s[k] = k === "guidance_weight" ? Number(v) : Math.round(Number(v));
  }
  return s;
}

let inFlight = false, pending = false;
async function preview() {
  if (!S.source) return;
  if (inFlight) { pending = true; return; }
  inFlight = true;
  try {
    const r = await postJSON("/api/preview", spec());
    S.center = r.center;
    S.flowImg = r.flow ? await loadImage(r.flow) : null;
    S.frozenImg = r.frozen ? shade(await loadImage(r.frozen)) : null;
    $("flow-info").textContent = r.flow ?
      `moves ${r.moving_pixels} px, up to ${r.max_displacement.toFixed(1)} px` : "";
    showError("");
  } catch (e) {
    S.flowImg = S.frozenImg = null;
    showError(e.message);
  } finally {
    inFlight = false;
    draw();
    if (pending) { pending = false; preview(); }
  }
}

function shade(im) { // the frozen mask (white = kept from the source) as a grey veil
  const c = document.createElement("canvas");
  c.width = im.width; c.height = im.height;
  const ctx = c.getContext("2d");
  ctx.drawImage(im, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height);
  for (let i = 0; i < d.data.length; i += 4) {
    d.data[i + 3] = d.data[i] > 127 ? 110 : 0;
    d.data[i] = d.data[i + 1] = d.data[i + 2] = 20;
  }
  ctx.putImageData(d, 0, 0);
  return c;
}

function loadImage(url) {
  return new Promise((ok, fail) => {
    const im = new Image();
    im.onload = () => ok(im);
    im.onerror = () => fail(new Error("the preview image did not load"));
    im.src = url;
  });
}

function changed() {
  $("mask-info").textContent = S.box ? `box ${S.box.join(",")}` : (S.hasMask ? "painted mask" : "no object (the motion moves the whole image)");
  draw();
  preview();
}

// ----------------------------------------------------------------- settings

function fillPreset() {
  const p = S.info.presets[$("preset").value];
  for (const k of PAGE_SETTINGS) $(k).value = p[k];
  $("preset-values").textContent = `${p.resolved}: steps ${p.steps}, K ${p.recursive_steps}, ` +
    `guidance ${p.guidance_weight}, CFG ${p.cfg_scale}`;
}

function selectTool(tool) {
  S.tool = tool;
  for (const b of document.querySelectorAll("[data-tool]")) b.classList.toggle("active", b.dataset.tool === tool);
  draw();
}

async function init() {
  S.info = await api("/api/info");
  $("model").textContent = `model: ${S.info.model}, runs in ${S.info.out_root}`;
  for (const name of Object.keys(S.info.presets)) $("preset").add(new Option(name, name));
  $("preset").value = S.info.preset;
  fillPreset();
  if (S.info.scenes.length) {
    for (const sc of S.info.scenes) $("scenes").add(new Option(`${sc.name}: ${sc.prompt}`, sc.seed === null ? "" : sc.seed));
    $("scenes").hidden = $("use-scene").hidden = false;
  }
  const view = $("view");
  view.addEventListener("pointerdown", onDown);
  view.addEventListener("pointermove", onMove);
  view.addEventListener("pointerup", onUp);
  view.addEventListener("pointercancel", onUp);
  for (const b of document.querySelectorAll("[data-tool]")) b.onclick = () => selectTool(b.dataset.tool);
  const guard = (fn) => async (...a) => { try { showError(""); await fn(...a); } catch (e) { showError(e.message); } };
  $("upload").onchange = guard(async (ev) => { if (ev.target.files[0]) await uploadSource(ev.target.files[0]); ev.target.value = ""; });
  $("use-scene").onclick = guard(useScene);
  $("mask-upload").onchange = (ev) => {
    const f = ev.target.files[0];
    if (f && S.source) loadMaskImage(URL.createObjectURL(f));
    ev.target.value = "";
  };
  $("scene-mask").onclick = () => S.sceneMask && loadMaskImage(S.sceneMask);
  $("clear-mask").onclick = () => { clearMask(); changed(); };
  $("brush-size").oninput = () => { $("brush-value").textContent = `${$("brush-size").value} px`; };
  $("undo-motion").onclick = () => { if (S.pairs.length) S.pairs.pop(); else S.terms.pop(); syncMotionFields(); changed(); };
  $("clear-motion").onclick = () => { S.terms = []; S.pairs = []; syncMotionFields(); changed(); };
  $("motion").onchange = () => { S.terms = $("motion").value.split("+").filter((t) => t.trim()); S.pairs = []; $("drag").value = ""; changed(); };
  $("drag").onchange = () => {
    S.pairs = $("drag").value.split(";").filter((t) => t.trim()).map((t) => t.split(">").flatMap((e) => e.split(",").map(Number)));
    S.terms = []; $("motion").value = ""; changed();
  };
  $("preset").onchange = () => { fillPreset(); preview(); };
  $("mask_grow").onchange = preview;
  for (const id of ["show-mask", "show-flow", "show-frozen"]) $(id).onchange = draw;
  selectTool("brush");
  window.dispatchEvent(new Event("editor-ready"));
}

window.addEventListener("DOMContentLoaded", () => init().catch((e) => showError(e.message)));
