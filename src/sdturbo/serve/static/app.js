"use strict";
// sdturbo live page. One WebSocket to /ws; every change sends the current settings and the server generates only
// the newest request, so typing never builds a backlog. Each result is a JSON message followed by a binary frame.

const $ = (id) => document.getElementById(id);
const DEBOUNCE_MS = 60;
const MAX_SEED = 4294967295;
const SIZES = ["512x512", "768x512", "512x768", "768x768", "1024x1024", "1024x576", "576x1024", "256x256"];
const KEY_STORAGE = "sdturbo-api-key";
const PREVIEW_AFTER_MS = 300; // a model slower than this (a CPU) also sends a thumbnail after every step

const state = {
  ws: null,
  ready: false, // connected and, where needed, authenticated
  nextId: 1,
  shownId: 0, // results older than the one on screen are not shown (the server may finish them late)
  waiting: 0, // requests sent and not yet answered
  meta: null, // the JSON that announced the binary frame to come
  sentAt: new Map(), // id -> performance.now() when sent, for the round-trip time
  sentWidth: new Map(), // id -> requested width: a preview is shown at the final image's size
  shown: null, // metadata of the image on screen
  previewId: 0, // the request whose preview is on screen, if any
  lastInferenceMs: 0,
  source: "none",
  webcam: null, // MediaStream
  timer: 0,
  backoffMs: 500,
};

// -- connection ------------------------------------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/ws`);
  ws.binaryType = "blob";
  state.ws = ws;
  state.ready = false;
  setStatus("connecting", "connecting…");
  ws.onopen = () => { state.backoffMs = 500; };
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onMessage(JSON.parse(ev.data)) : onBinary(ev.data));
  ws.onclose = () => {
    state.ready = false;
    state.waiting = 0;
    state.meta = null;
    setStatus("closed", "disconnected, retrying…");
    setTimeout(connect, state.backoffMs);
    state.backoffMs = Math.min(state.backoffMs * 2, 8000);
  };
}

function send(message) {
  state.ws.send(JSON.stringify(message));
}

function onMessage(msg) {
  switch (msg.type) {
    case "hello":
      applyLimits(msg.limits);
      if (!msg.auth_required) return onReady();
      $("auth").hidden = false;
      if (sessionStorage.getItem(KEY_STORAGE)) sendKey(sessionStorage.getItem(KEY_STORAGE));
      else setStatus("closed", "API key needed");
      return;
    case "auth":
      $("auth").hidden = true;
      return onReady();
    case "image":
    case "preview":
    case "download":
      state.meta = msg; // the binary frame follows
      return;
    case "dropped":
      state.sentAt.delete(msg.id);
      state.sentWidth.delete(msg.id);
      return answered();
    case "error":
      if (msg.error.code === 401) {
        sessionStorage.removeItem(KEY_STORAGE);
        $("auth").hidden = false;
      }
      showError(msg.error.message);
      if (msg.id !== null && msg.id !== undefined) answered();
      return;
  }
}

function onReady() {
  state.ready = true;
  setStatus("open", "connected");
  schedule();
}

function sendKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
  send({ type: "auth", api_key: key });
}

function onBinary(blob) {
  const meta = state.meta;
  state.meta = null;
  if (!meta) return;
  if (meta.type === "download") return saveBlob(blob, `sdturbo-${meta.seed}.png`);
  if (meta.type === "preview") return showPreview(meta, blob);
  const roundTripMs = performance.now() - (state.sentAt.get(meta.id) ?? performance.now());
  state.sentAt.delete(meta.id);
  if (meta.id > state.shownId) show(meta, blob, roundTripMs);
  answered();
}

function answered() {
  state.waiting = Math.max(0, state.waiting - 1);
  if (state.waiting === 0) setStatus("open", "connected");
  if (state.source === "webcam" && state.waiting === 0) request(); // webcam: next frame as soon as one is back
}

// -- requests --------------------------------------------------------------------------------------------------

function schedule() {
  clearTimeout(state.timer);
  state.timer = setTimeout(request, DEBOUNCE_MS);
}

function requestIfIdle() {
  if (state.waiting === 0) request();
  else schedule();
}

function request() {
  const prompt = $("prompt").value.trim();
  if (!state.ready || !prompt) return;
  if (!$("seed-lock").checked) $("seed").value = randomSeed();
  const seed = Number($("seed").value);
  if (!Number.isInteger(seed) || seed < 0 || seed > MAX_SEED) return showError(`seed must be a whole number from 0 to ${MAX_SEED}`);
  const [width, height] = $("size").value.split("x").map(Number);
  const msg = {
    type: "generate",
    id: state.nextId++,
    prompt,
    seed,
    steps: Number($("steps").value),
    width,
    height,
    guidance_scale: Number($("guidance").value) || 0,
    format: "jpeg",
  };
  // Until a first result shows the model's speed, ask for previews too: on a CPU that first image takes seconds.
  if (!state.shown || state.lastInferenceMs > PREVIEW_AFTER_MS) msg.preview = true;
  const negative = $("negative").value.trim();
  if (negative && msg.guidance_scale > 1) msg.negative_prompt = negative;
  if (state.source !== "none") {
    if (state.source === "webcam") captureWebcam();
    msg.image = $("canvas").toDataURL("image/jpeg", 0.9);
    msg.strength = Number($("strength").value);
  }
  state.sentAt.set(msg.id, performance.now());
  state.sentWidth.set(msg.id, width);
  state.waiting += 1;
  setStatus("busy", "generating…");
  send(msg);
}

function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0];
}

// -- showing results -------------------------------------------------------------------------------------------

function setResult(blob) {
  const img = $("result");
  const old = img.src;
  img.src = URL.createObjectURL(blob);
  if (old) URL.revokeObjectURL(old);
  return img;
}

function displayWidth(width) {
  return width < 256 ? width * 4 : width; // small models' images (sdturbo-mini: 64 px) are shown enlarged
}

function cssWidth(width) {
  // Natural size where that is the display size, so the stylesheet's max-height keeps the aspect ratio.
  return displayWidth(width) === width ? "" : `${displayWidth(width)}px`;
}

function showPreview(meta, blob) {
  // Newer than the image on screen and than any preview shown; the final image replaces it.
  if (meta.id <= state.shownId || meta.id < state.previewId) return;
  state.previewId = meta.id;
  const img = setResult(blob);
  img.classList.add("preview");
  img.style.width = `${displayWidth(state.sentWidth.get(meta.id) ?? meta.width * 8)}px`;
  setStatus("busy", `generating… (preview after step ${meta.step + 1})`);
}

function show(meta, blob, roundTripMs) {
  const img = setResult(blob);
  img.classList.remove("preview");
  img.style.width = cssWidth(meta.width);
  state.sentWidth.delete(meta.id);
  state.lastInferenceMs = meta.inference_ms;
  img.dataset.id = String(meta.id);
  state.shownId = meta.id;
  state.shown = meta;
  $("latency").textContent =
    `${Math.round(meta.latency_ms)} ms on the server (queue ${Math.round(meta.queue_ms)} ms, ` +
    `model ${Math.round(meta.inference_ms)} ms for a batch of ${meta.batch_images}) · ` +
    `${Math.round(roundTripMs)} ms round trip`;
  $("params").textContent = meta.parameters;
  $("download").disabled = false;
  showError("");
}

function showError(text) {
  $("error").textContent = text;
}

function setStatus(kind, text) {
  const el = $("status");
  el.dataset.state = kind;
  el.textContent = text;
}

function saveBlob(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

function applyLimits(limits) {
  const steps = $("steps");
  const chosenSteps = steps.value;
  steps.replaceChildren(...range(1, Math.min(4, limits.max_steps)).map((n) => new Option(String(n))));
  steps.value = chosenSteps <= limits.max_steps ? chosenSteps : "1";

  const size = $("size");
  const chosen = size.value || `${limits.default_side_px}x${limits.default_side_px}`;
  const fits = (s) => s.split("x").every((v) => Number(v) <= limits.max_side_px);
  const options = [...new Set([`${limits.default_side_px}x${limits.default_side_px}`, ...SIZES])].filter(fits);
  size.replaceChildren(...options.map((s) => new Option(s.replace("x", " × "), s)));
  size.value = options.includes(chosen) ? chosen : options[0];
  resizeCanvas();
}

function range(lo, hi) {
  return Array.from({ length: hi - lo + 1 }, (_, i) => lo + i);
}

// -- the source image: upload, drawing and webcam share one canvas -------------------------------------------

function setSource(source) {
  state.source = source;
  $("source-panel").hidden = source === "none";
  $("upload-row").hidden = source !== "upload";
  $("draw-row").hidden = source !== "draw" && source !== "upload";
  if (source === "webcam") startWebcam();
  else stopWebcam();
  schedule();
}

function clearCanvas() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
}

function drawCover(source, sourceWidth, sourceHeight) {
  // Scale to cover the canvas and centre-crop, as the server does.
  const canvas = $("canvas");
  const scale = Math.max(canvas.width / sourceWidth, canvas.height / sourceHeight);
  const w = sourceWidth * scale;
  const h = sourceHeight * scale;
  canvas.getContext("2d").drawImage(source, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
}

function resizeCanvas() {
  const canvas = $("canvas");
  const [width, height] = $("size").value.split("x").map(Number);
  if (canvas.width === width && canvas.height === height) return;
  const copy = document.createElement("canvas");
  copy.width = canvas.width;
  copy.height = canvas.height;
  copy.getContext("2d").drawImage(canvas, 0, 0);
  canvas.width = width;
  canvas.height = height;
  clearCanvas();
  drawCover(copy, copy.width, copy.height);
}

async function loadUpload(file) {
  try {
    const bitmap = await createImageBitmap(file);
    clearCanvas();
    drawCover(bitmap, bitmap.width, bitmap.height);
    bitmap.close();
    showError("");
    schedule();
  } catch {
    showError("that file is not an image this browser can read");
  }
}

function enableDrawing() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  let last = null;
  const point = (ev) => {
    const rect = canvas.getBoundingClientRect();
    return [(ev.clientX - rect.left) * (canvas.width / rect.width), (ev.clientY - rect.top) * (canvas.height / rect.height)];
  };
  canvas.addEventListener("pointerdown", (ev) => {
    if (state.source === "webcam") return;
    canvas.setPointerCapture(ev.pointerId);
    last = point(ev);
  });
  canvas.addEventListener("pointermove", (ev) => {
    if (!last) return;
    const next = point(ev);
    ctx.strokeStyle = $("brush-color").value;
    ctx.lineWidth = Number($("brush-size").value);
    ctx.lineCap = "round";
    ctx.beginPath();
    ctx.moveTo(...last);
    ctx.lineTo(...next);
    ctx.stroke();
    last = next;
    requestIfIdle();
  });
  const end = () => {
    if (last) schedule();
    last = null;
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

async function startWebcam() {
  try {
    state.webcam = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  } catch (err) {
    showError(`webcam unavailable: ${err.message}`);
    return;
  }
  const video = $("webcam");
  video.srcObject = state.webcam;
  await video.play();
  requestIfIdle();
}

function stopWebcam() {
  if (!state.webcam) return;
  state.webcam.getTracks().forEach((t) => t.stop());
  state.webcam = null;
  $("webcam").srcObject = null;
}

function captureWebcam() {
  const video = $("webcam");
  if (video.videoWidth) drawCover(video, video.videoWidth, video.videoHeight);
}

// -- wiring ----------------------------------------------------------------------------------------------------

function init() {
  clearCanvas();
  enableDrawing();
  for (const id of ["prompt", "negative", "seed", "guidance"]) $(id).addEventListener("input", schedule);
  for (const id of ["steps", "seed-lock"]) $(id).addEventListener("change", schedule);
  $("size").addEventListener("change", () => { resizeCanvas(); schedule(); });
  $("strength").addEventListener("input", () => {
    $("strength-value").textContent = Number($("strength").value).toFixed(2);
    schedule();
  });
  $("seed-random").addEventListener("click", () => { $("seed").value = randomSeed(); schedule(); });
  $("upload").addEventListener("change", () => { if ($("upload").files[0]) loadUpload($("upload").files[0]); });
  $("canvas-clear").addEventListener("click", () => { clearCanvas(); schedule(); });
  for (const radio of document.querySelectorAll("input[name=source]")) {
    radio.addEventListener("change", () => setSource(radio.value));
  }
  $("download").addEventListener("click", () => { if (state.shown) send({ type: "download", id: state.shown.id }); });
  $("api-key-send").addEventListener("click", () => sendKey($("api-key").value));
  connect();
}

init();
