// ddlp studio: the page. Plain JavaScript, no libraries.
// Positions are (y, x) in [-1, 1] (row, column), as everywhere in ddlp; the server does the
// model work, this page keeps the edit state and draws.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  info: null,        // /api/info
  clip: null,        // /api/clip response for the loaded clip
  preview: null,     // /api/preview response (edited conditioning particles), or null
  per: [],           // per particle: {dx, dy, scale, transparency (null = unchanged)}
  featureOps: [],    // ordered appearance operations: {attribute, op, particles, source}
  selected: new Set(),
  frame: 0,
  drag: null,        // {kind: "move"|"box", x0, y0, x, y}
  play: null,        // /api/play response
  playIndex: 0,
  timer: null,
  busy: 0,
};
window.studio = { state };   // for debugging and the browser test

// ----------------------------------------------------------------------------- errors
function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}
function clearError() { $("error").hidden = true; $("error-text").textContent = ""; }
$("error-close").addEventListener("click", clearError);
window.addEventListener("error", (e) => showError("page error: " + e.message));
window.addEventListener("unhandledrejection", (e) => showError(String(e.reason && e.reason.message || e.reason)));

function setStatus(text) { $("status").textContent = text; }

async function api(path, body) {
  state.busy += 1;
  document.body.dataset.busy = String(state.busy);
  try {
    const res = await fetch(path, body === undefined ? {} : {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    let data;
    try { data = await res.json(); } catch (e) { throw new Error(`${path}: the server sent no JSON (HTTP ${res.status})`); }
    if (!res.ok || data.error) throw new Error(data.error || `${path}: HTTP ${res.status}`);
    return data;
  } catch (e) {
    if (e instanceof TypeError) throw new Error(`cannot reach the studio server (${e.message}); is it still running?`);
    throw e;
  } finally {
    state.busy -= 1;
    document.body.dataset.busy = String(state.busy);
  }
}

// ----------------------------------------------------------------------------- geometry
const canvas = $("editor");
const ctx = canvas.getContext("2d");
function toCanvas(c) {   // normalised coordinate -> canvas pixel (pixel centres, align_corners)
  const S = state.info.model.image_size, z = canvas.width / S;
  return ((c + 1) / 2 * (S - 1) + 0.5) * z;
}
function fromCanvas(px) {
  const S = state.info.model.image_size, z = canvas.width / S;
  return (px / z - 0.5) / (S - 1) * 2 - 1;
}
function units(dpx) { const S = state.info.model.image_size; return dpx / (canvas.width / S) / (S - 1) * 2; }
function eventXY(e) {
  const r = canvas.getBoundingClientRect();
  return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
}

// Positions shown: the original particles plus the pending (and in-progress drag) offsets.
function shownParticles() {
  const p = state.clip.particles, t = state.frame;
  const [lo, hi] = editFrames();
  const inRange = t >= lo && t < hi;
  const base = state.preview ? state.preview.particles : p;
  const K = p.position[t].length;
  const out = [];
  for (let k = 0; k < K; k++) {
    let [y, x] = p.position[t][k];
    const e = state.per[k];
    if (inRange) { y += e.dy; x += e.dx; }
    if (state.drag && state.drag.kind === "move" && inRange && state.selected.has(k)) {
      x += units(state.drag.x - state.drag.x0); y += units(state.drag.y - state.drag.y0);
    }
    out.push({ k, y, x, size: base.size[t][k], on: base.transparency[t][k] });
  }
  return out;
}

function hit(px, py) {
  let best = null, bestD = 12;
  for (const q of shownParticles()) {
    const d = Math.hypot(toCanvas(q.x) - px, toCanvas(q.y) - py);
    if (d < bestD) { best = q.k; bestD = d; }
  }
  return best;
}

// ----------------------------------------------------------------------------- drawing
const frameImage = new Image();
frameImage.onload = draw;

function draw() {
  if (!state.clip) return;
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (frameImage.complete && frameImage.naturalWidth) ctx.drawImage(frameImage, 0, 0, canvas.width, canvas.height);
  if (!$("hide-particles").checked) drawParticles();
  const d = state.drag;
  if (d && d.kind === "box") {
    ctx.strokeStyle = "#4aa3ff"; ctx.lineWidth = 1; ctx.setLineDash([4, 3]);
    ctx.strokeRect(Math.min(d.x0, d.x), Math.min(d.y0, d.y), Math.abs(d.x - d.x0), Math.abs(d.y - d.y0));
    ctx.setLineDash([]);
  }
}

function drawParticles() {
  const colours = state.info.colours, p = state.clip.particles;
  const shown = shownParticles().sort((a, b) => a.on - b.on);
  // the original track over the conditioning frames, faint
  ctx.lineWidth = 1;
  for (let k = 0; k < colours.length; k++) {
    ctx.strokeStyle = colours[k]; ctx.globalAlpha = 0.45; ctx.beginPath();
    p.position.forEach((f, t) => { const [y, x] = f[k]; t ? ctx.lineTo(toCanvas(x), toCanvas(y)) : ctx.moveTo(toCanvas(x), toCanvas(y)); });
    ctx.stroke();
  }
  for (const q of shown) {
    const cx = toCanvas(q.x), cy = toCanvas(q.y), sel = state.selected.has(q.k);
    ctx.globalAlpha = q.on < 0.1 ? 0.35 : 1;
    const hy = q.size[0] * canvas.height / 2, hx = q.size[1] * canvas.width / 2;
    ctx.strokeStyle = colours[q.k]; ctx.lineWidth = sel ? 2 : 1; ctx.setLineDash(sel ? [] : [3, 3]);
    ctx.strokeRect(cx - hx, cy - hy, 2 * hx, 2 * hy);
    ctx.setLineDash([]);
    ctx.beginPath(); ctx.arc(cx, cy, 6, 0, 2 * Math.PI);
    ctx.fillStyle = colours[q.k]; ctx.fill();
    ctx.lineWidth = sel ? 3 : 1.5; ctx.strokeStyle = sel ? "#ffffff" : "#000000"; ctx.stroke();
    ctx.fillStyle = "#ffffff"; ctx.font = "bold 12px sans-serif";
    ctx.fillText(String(q.k), cx + 8, cy - 8);
  }
  ctx.globalAlpha = 1;
}

function showFrame() {
  if (!state.clip) return;
  const t = state.frame;
  frameImage.src = ($("show-recon").checked ? state.clip.recon : state.clip.frames)[t];
  const [lo, hi] = editFrames();
  $("frame-label").textContent = `frame ${t}` + (t >= lo && t < hi ? " (edited)" : " (not edited)");
  const rec = state.preview ? state.preview.recon : state.clip.recon;
  $("preview").src = rec[t];
  draw();
}

// ----------------------------------------------------------------------------- edits
function editFrames() {
  return [parseInt($("edit-start").value, 10) || 0, parseInt($("edit-stop").value, 10) || 0];
}

function freshEdit() { return { dx: 0, dy: 0, scale: 1, transparency: null }; }

function buildEdits() {
  const edits = state.featureOps.map((o) => ({ ...o }));
  state.per.forEach((e, k) => {
    if (e.scale !== 1) edits.push({ attribute: "scale", op: "mul", particles: [k], value: [e.scale, e.scale] });
    if (e.transparency !== null) edits.push({ attribute: "transparency", op: "set", particles: [k], value: [e.transparency] });
    if (e.dx !== 0 || e.dy !== 0) edits.push({ attribute: "position", op: "add", particles: [k], value: [e.dy, e.dx] });
  });
  return edits;
}

let previewTimer = null;
function editsChanged() {
  const n = buildEdits().length;
  $("edit-summary").textContent = n ? `${n} edit(s) pending` : "no edits";
  renderFeatureOps();
  syncControls();
  showFrame();
  clearTimeout(previewTimer);
  previewTimer = setTimeout(refreshPreview, 150);
}

async function refreshPreview() {
  if (!state.clip) return;
  const clip = state.clip.clip;
  try {
    const r = await api("/api/preview", { clip, edits: buildEdits(), edit_frames: editFrames() });
    if (!state.clip || state.clip.clip !== clip) return;
    state.preview = r;
    clearError();
  } catch (e) {
    state.preview = null;
    showError(e.message);
  }
  showFrame();
  syncControls();
}

function renderFeatureOps() {
  const ol = $("feature-ops");
  ol.innerHTML = "";
  for (const o of state.featureOps) {
    const li = document.createElement("li");
    li.textContent = o.op === "swap" ? `swap appearance of ${o.particles[0]} and ${o.source}`
      : `${o.particles.join(", ")} take the appearance of ${o.source}`;
    ol.appendChild(li);
  }
  if (!state.featureOps.length) ol.innerHTML = "<li>none</li>";
}

function syncControls() {
  const sel = [...state.selected].sort((a, b) => a - b);
  $("edit-controls").disabled = sel.length === 0;
  $("selection-label").textContent = sel.length ? `selected: ${sel.map((k) => "#" + k).join(", ")}` : "nothing selected";
  if (!sel.length) { $("glimpse").hidden = true; $("glimpse-label").textContent = ""; return; }
  const e = state.per[sel[0]];
  const put = (id, v) => { if (document.activeElement !== $(id)) $(id).value = v; };  // never under the cursor
  put("dx", e.dx.toFixed(3)); put("dy", e.dy.toFixed(3));
  put("scale", e.scale); $("scale-value").textContent = e.scale.toFixed(2);
  const on = e.transparency;
  put("transparency", on === null ? state.clip.particles.transparency[0][sel[0]] : on);
  $("transparency-value").textContent = on === null ? "unchanged" : on.toFixed(2);
  const g = (state.preview || state.clip).glimpses[sel[0]];
  $("glimpse").src = g; $("glimpse").hidden = false;
  $("glimpse-label").textContent = `decoded glimpse of #${sel[0]} (frame 0)`;
}

function forSelected(fn) { for (const k of state.selected) fn(state.per[k], k); editsChanged(); }

$("dx").addEventListener("change", () => forSelected((e) => { e.dx = parseFloat($("dx").value) || 0; }));
$("dy").addEventListener("change", () => forSelected((e) => { e.dy = parseFloat($("dy").value) || 0; }));
$("scale").addEventListener("input", () => forSelected((e) => { e.scale = parseFloat($("scale").value); }));
$("transparency").addEventListener("input", () => forSelected((e) => { e.transparency = parseFloat($("transparency").value); }));
$("copy-features").addEventListener("click", () => {
  const src = parseInt($("feature-source").value, 10);
  const dst = [...state.selected].filter((k) => k !== src).sort((a, b) => a - b);
  if (!dst.length) return showError("select particles other than the source to copy its appearance onto");
  state.featureOps.push({ attribute: "features", op: "copy", particles: dst, source: src });
  editsChanged();
});
$("swap-features").addEventListener("click", () => {
  const src = parseInt($("feature-source").value, 10);
  const sel = [...state.selected];
  if (sel.length !== 1 || sel[0] === src) return showError("swap needs exactly one selected particle and a different partner");
  state.featureOps.push({ attribute: "features", op: "swap", particles: [sel[0]], source: src });
  editsChanged();
});
$("reset-selected").addEventListener("click", () => forSelected((e, k) => { state.per[k] = freshEdit(); }));
$("reset-all").addEventListener("click", () => {
  state.per = state.per.map(freshEdit); state.featureOps = []; editsChanged();
});
for (const id of ["edit-start", "edit-stop"]) $(id).addEventListener("change", editsChanged);

// ----------------------------------------------------------------------------- canvas interaction
canvas.addEventListener("pointerdown", (e) => {
  if (!state.clip) return;
  canvas.setPointerCapture(e.pointerId);
  const [x, y] = eventXY(e);
  const k = hit(x, y);
  if (k === null) {
    if (!e.shiftKey) state.selected.clear();
    state.drag = { kind: "box", x0: x, y0: y, x, y };
  } else {
    if (e.shiftKey) { state.selected.has(k) ? state.selected.delete(k) : state.selected.add(k); }
    else if (!state.selected.has(k)) { state.selected.clear(); state.selected.add(k); }
    state.drag = { kind: "move", x0: x, y0: y, x, y };
  }
  syncControls();
  draw();
});
canvas.addEventListener("pointermove", (e) => {
  if (!state.drag) return;
  [state.drag.x, state.drag.y] = eventXY(e);
  draw();
});
function endDrag() {
  const d = state.drag;
  if (!d) return;
  state.drag = null;
  if (d.kind === "box") {
    const [x0, x1] = [Math.min(d.x0, d.x), Math.max(d.x0, d.x)], [y0, y1] = [Math.min(d.y0, d.y), Math.max(d.y0, d.y)];
    if (x1 - x0 > 2 || y1 - y0 > 2) {
      for (const q of shownParticles()) {
        const cx = toCanvas(q.x), cy = toCanvas(q.y);
        if (cx >= x0 && cx <= x1 && cy >= y0 && cy <= y1) state.selected.add(q.k);
      }
    }
    syncControls(); draw();
    return;
  }
  const ddx = units(d.x - d.x0), ddy = units(d.y - d.y0);
  if (Math.abs(ddx) + Math.abs(ddy) < 1e-6) { draw(); return; }
  forSelected((e) => { e.dx = Math.round((e.dx + ddx) * 1e4) / 1e4; e.dy = Math.round((e.dy + ddy) * 1e4) / 1e4; });
}
canvas.addEventListener("pointerup", endDrag);
canvas.addEventListener("pointercancel", endDrag);
canvas.addEventListener("keydown", (e) => {
  if (e.key === "Escape") { state.selected.clear(); syncControls(); draw(); }
});

$("frame-slider").addEventListener("input", () => { state.frame = parseInt($("frame-slider").value, 10); showFrame(); });
$("show-recon").addEventListener("change", showFrame);
$("hide-particles").addEventListener("change", draw);

// ----------------------------------------------------------------------------- play
function stopAnimation() { clearInterval(state.timer); state.timer = null; $("pause").textContent = "resume"; }
function startAnimation() {
  stopAnimation();
  const fps = parseInt($("speed").value, 10) || 10;
  state.timer = setInterval(() => showPlayFrame((state.playIndex + 1) % state.play.original.length), 1000 / fps);
  $("pause").textContent = "pause";
}
function showPlayFrame(i) {
  const p = state.play;
  state.playIndex = i;
  $("play-original").src = p.original[i];
  $("play-edited").src = p.edited[i];
  $("play-frame").value = i;
  $("play-label").textContent = `t = ${i} ` + (i < p.cond_steps ? "(conditioning)" : "(predicted)");
}

$("play").addEventListener("click", async () => {
  if (!state.clip) return;
  const horizon = parseInt($("horizon").value, 10);
  $("play").disabled = true;
  setStatus("rolling out...");
  try {
    const r = await api("/api/play", { clip: state.clip.clip, edits: buildEdits(), horizon, edit_frames: editFrames() });
    clearError();
    state.play = r;
    $("players").hidden = false;
    $("play-frame").max = r.original.length - 1;
    $("pause").disabled = false;
    $("play-info").textContent = `${r.cond_steps} conditioning + ${r.original.length - r.cond_steps} predicted frames ` +
      `in ${r.seconds}s; the what-if rollout differs in ${r.changed_frames} of ${r.original.length} frames`;
    showPlayFrame(0);
    startAnimation();
    setStatus("");
    document.body.dataset.played = String((parseInt(document.body.dataset.played || "0", 10)) + 1);
  } catch (e) {
    showError(e.message);
    setStatus("");
  } finally {
    $("play").disabled = false;
  }
});
$("pause").addEventListener("click", () => (state.timer ? stopAnimation() : startAnimation()));
$("speed").addEventListener("change", () => { if (state.timer) startAnimation(); });
$("play-frame").addEventListener("input", () => { stopAnimation(); showPlayFrame(parseInt($("play-frame").value, 10)); });

// ----------------------------------------------------------------------------- loading
function forgetClip() {   // nothing of a previous clip stays on screen
  clearInterval(state.timer); state.timer = null; clearTimeout(previewTimer);
  state.clip = null; state.preview = null; state.play = null; state.selected.clear();
  $("players").hidden = true; $("pause").disabled = true;
  $("preview").removeAttribute("src");
  $("frame-label").textContent = "";
  $("edit-summary").textContent = "";
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  syncControls();
}

async function loadClip(name) {
  setStatus(`loading ${name}...`);
  $("play").disabled = true;
  forgetClip();
  try {
    const r = await api("/api/clip", { clip: name });
    clearError();
    state.clip = r; state.preview = null; state.selected.clear(); state.featureOps = [];
    state.per = r.particles.position[0].map(freshEdit);
    state.frame = Math.min(state.frame, r.cond_steps - 1);
    $("frame-slider").max = r.cond_steps - 1;
    $("frame-slider").value = state.frame;
    $("play").disabled = false;
    setStatus(`${name}: ${r.cond_steps} conditioning frames`);
    editsChanged();
  } catch (e) {
    forgetClip();
    showError(e.message);
    setStatus("");
  }
}

async function init() {
  try {
    const info = await api("/api/info");
    state.info = info;
    const m = info.model;
    $("model-info").textContent = `${m.name || m.type}: ${m.particles} particles, ${m.image_size}px` +
      (m.dataset ? `, trained for ${m.dataset}` : "");
    $("horizon").value = info.horizon; $("horizon").max = info.max_horizon;
    [$("edit-start").value, $("edit-stop").value] = info.edit_frames;
    const sel = $("clip-select");
    sel.innerHTML = "";
    for (const name of info.clips) sel.add(new Option(name, name));
    const fs = $("feature-source");
    info.colours.forEach((c, k) => fs.add(new Option(`#${k}`, String(k))));
    sel.disabled = false;
    sel.addEventListener("change", () => loadClip(sel.value));
    if (!info.clips.length) return showError("no clips: start the studio with --clips DIR or --balls N");
    await loadClip(info.clips[0]);
  } catch (e) {
    showError(e.message);
  }
}
init();
