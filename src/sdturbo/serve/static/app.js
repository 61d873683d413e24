"use strict";
// sdturbo live page. One WebSocket to /ws; every change sends the current settings and the server generates only
// the newest request, so typing never builds a backlog. Each result is a JSON message followed by a binary frame.

const $ = (id) => document.getElementById(id);
const DEBOUNCE_MS = 60;
const MAX_SEED = 4294967295;
const SIZES = ["512x512", "768x512", "512x768", "768x768", "1024x1024", "1024x576", "576x1024", "256x256"];
const KEY_STORAGE = "sdturbo-api-key";
const PREVIEW_AFTER_MS = 300; // a model slower than this (a CPU) also sends a thumbnail after every step
const ERROR_DELAY_MS = [1000, 10000]; // the webcam loop's wait after an error: first, then doubling up to the last
const BRUSH_BASE_PX = 512; // the brush slider's pixels are those of a 512 px canvas: the same share of any size

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
  shownBlob: null, // and its bytes, put back when a preview's request fails
  previewId: 0, // the request whose preview is on screen, if any
  downloadId: 0, // the result on screen if this connection made it (the server keeps results per connection)
  lastKey: "", // the last request sent, less its id and random seed: an identical one is not sent again
  lastId: 0,
  errorDelayMs: 0, // after an error the webcam loop waits this long (0: no error since the last result)
  keySent: false, // this connection sent an API key
  source: "none",
  sourceError: "", // "webcam unavailable", an unreadable file: shown until the source changes, not wiped by results
  original: null, // the source image at its own size (an upload's bitmap, a drawing as drawn): every size re-fits it
  drawn: false, // the canvas was drawn on (or filmed) since it was last fitted from `original`
  uploaded: false, // a file was loaded: upload mode sends nothing before
  webcam: null, // MediaStream
  webcamTicket: 0, // bumped by every start and stop: a camera that opens after the user left is closed at once
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
  state.keySent = false;
  setStatus("connecting", "connecting…");
  ws.onopen = () => { state.backoffMs = 500; };
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onMessage(JSON.parse(ev.data)) : onBinary(ev.data));
  ws.onclose = () => {
    state.ready = false;
    state.waiting = 0;
    state.meta = null;
    state.sentAt.clear();
    state.sentWidth.clear();
    state.lastKey = ""; // send it again on reconnect: it may never have been answered
    state.downloadId = 0;
    $("download").disabled = true;
    dropPreview();
    setStatus("closed", "disconnected, retrying…");
    setTimeout(connect, state.backoffMs);
    state.backoffMs = Math.min(state.backoffMs * 2, 8000);
  };
}

function send(message) {
  // A click while the socket is (re)connecting must not throw; what matters is sent again once it is open.
  if (state.ws?.readyState !== WebSocket.OPEN) return false;
  state.ws.send(JSON.stringify(message));
  return true;
}

function onMessage(msg) {
  switch (msg.type) {
    case "hello":
      applyLimits(msg.limits);
      if (!msg.auth_required) return onReady();
      $("auth").hidden = false;
      if (sessionStorage.getItem(KEY_STORAGE)) sendKey(sessionStorage.getItem(KEY_STORAGE));
      else askForKey("");
      return;
    case "auth":
      $("auth").hidden = true;
      $("auth-message").textContent = "";
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
      // A 401 closes the connection, and its text is protocol ({"type": "auth"...}): say what to do instead.
      if (msg.error.code === 401) return askForKey(state.keySent ? "wrong API key" : "");
      showError(msg.error.message);
      if (state.sentAt.delete(msg.id)) failed(msg.id); // a generate request's; a download's id answers nothing
      return;
  }
}

function failed(id) {
  state.sentWidth.delete(id);
  if (id === state.lastId) state.lastKey = ""; // the same request may be tried again
  if (id === state.previewId) dropPreview();
  state.errorDelayMs = Math.min(Math.max(state.errorDelayMs * 2, ERROR_DELAY_MS[0]), ERROR_DELAY_MS[1]);
  answered();
}

function askForKey(text) {
  sessionStorage.removeItem(KEY_STORAGE);
  $("auth").hidden = false;
  // No news (a reconnect, the server's wait for the key ran out) keeps what was said, e.g. "wrong API key".
  const message = $("auth-message");
  if (text || !message.textContent) message.textContent = text || "enter the API key to connect";
  setStatus("closed", "API key needed");
}

function onReady() {
  state.ready = true;
  setStatus("open", "connected");
  schedule();
}

function sendKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key); // not connected now: the next hello sends it
  state.keySent = send({ type: "auth", api_key: key });
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
  if (state.waiting > 0) return;
  setStatus("open", "connected");
  if (state.source !== "webcam") return;
  // Webcam: the next frame as soon as one is back; after an error only after a wait, or a request the server
  // refuses (422, 429, 503) would be repeated in a tight loop.
  clearTimeout(state.timer);
  if (state.errorDelayMs) state.timer = setTimeout(request, state.errorDelayMs);
  else request();
}

// -- requests --------------------------------------------------------------------------------------------------

function schedule() {
  clearTimeout(state.timer);
  state.timer = setTimeout(request, DEBOUNCE_MS);
}

function requestIfIdle() {
  if (state.waiting === 0 && !state.errorDelayMs) request();
  else schedule();
}

function request() {
  const prompt = $("prompt").value.trim();
  if (!state.ready || !prompt) return;
  // No source image yet (the camera has not delivered a frame, no file was chosen): a blank canvas is not meant.
  const video = $("webcam");
  if (state.source === "webcam" && !(state.webcam && video.readyState >= HTMLMediaElement.HAVE_CURRENT_DATA)) return;
  if (state.source === "upload" && !state.uploaded) return;
  const seedField = $("seed");
  const seedText = seedField.value.trim();
  // An empty field draws a random seed, as the unlocked seed does; anything but digits ("1e3", "1.5") is refused.
  const randomize = !$("seed-lock").checked || (seedText === "" && !seedField.validity.badInput);
  if (!randomize && !(/^\d+$/.test(seedText) && Number(seedText) <= MAX_SEED)) {
    return showError(`seed must be a whole number from 0 to ${MAX_SEED}`);
  }
  const [width, height] = $("size").value.split("x").map(Number);
  const msg = {
    type: "generate",
    prompt,
    seed: randomize ? null : Number(seedText),
    steps: Number($("steps").value),
    width,
    height,
    guidance_scale: Number($("guidance").value) || 0,
    format: "jpeg",
  };
  const negative = $("negative").value.trim();
  if (negative && msg.guidance_scale > 1) msg.negative_prompt = negative;
  if (state.source !== "none") {
    if (state.source === "webcam") captureWebcam();
    msg.image = $("canvas").toDataURL("image/jpeg", 0.9);
    msg.strength = Number($("strength").value);
  }
  // A keystroke that changes no field (a trailing space, a negative prompt unused at guidance <= 1) would cost a
  // whole generation for the same image. Webcam frames are always new.
  const key = JSON.stringify(msg);
  if (key === state.lastKey && state.source !== "webcam") return;
  if (randomize) msg.seed = randomSeed();
  if (!$("seed-lock").checked) seedField.value = msg.seed;
  msg.id = state.nextId++;
  // Previews while the model's speed is unknown, and when this request should take over 300 ms: the last result's
  // model time scaled by pixels x steps (a 64 px 1-step result says little about 1024 px 4 steps).
  const last = state.shown;
  const work = (m) => m.width * m.height * m.steps;
  if (!last || (last.inference_ms * work(msg)) / work(last) > PREVIEW_AFTER_MS) msg.preview = true;
  if (!send(msg)) return;
  state.lastKey = key;
  state.lastId = msg.id;
  state.sentAt.set(msg.id, performance.now());
  state.sentWidth.set(msg.id, width);
  state.waiting += 1;
  setStatus("busy", "generating…");
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
  state.errorDelayMs = 0;
  img.dataset.id = String(meta.id);
  state.shownId = meta.id;
  state.shown = meta;
  state.shownBlob = blob;
  state.downloadId = meta.id;
  $("latency").textContent =
    `${Math.round(meta.latency_ms)} ms on the server (queue ${Math.round(meta.queue_ms)} ms, ` +
    `model ${Math.round(meta.inference_ms)} ms for a batch of ${meta.batch_images}) · ` +
    `${Math.round(roundTripMs)} ms round trip`;
  $("params").textContent = meta.parameters;
  $("download").disabled = false;
  showError(state.sourceError);
}

function dropPreview() {
  // A preview is not a result: when its request fails or the connection drops, put the last image back.
  const img = $("result");
  if (!img.classList.contains("preview")) return;
  img.classList.remove("preview");
  if (state.shownBlob) {
    setResult(state.shownBlob);
    img.style.width = cssWidth(state.shown.width);
  } else {
    URL.revokeObjectURL(img.src);
    img.removeAttribute("src");
  }
}

function showError(text) {
  $("error").textContent = text;
}

function setStatus(kind, text) {
  const el = $("status");
  // Announce connection changes, not the generating/connected flicker of each request (many a second with a webcam).
  const connection = [kind, el.dataset.state].some((s) => s === "closed" || s === "connecting");
  el.setAttribute("aria-live", connection ? "polite" : "off");
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
  const area = (s) => s.split("x").reduce((w, h) => w * h);
  options.sort((a, b) => area(a) - area(b) || parseInt(b) - parseInt(a)); // small to large, landscape first
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
  // Webcam results come many times a second: announcing each would drown everything else.
  $("latency").setAttribute("aria-live", source === "webcam" ? "off" : "polite");
  setSourceError("");
  if (source === "webcam") startWebcam();
  else stopWebcam();
  schedule();
}

function setSourceError(text) {
  state.sourceError = text;
  showError(text);
}

function setOriginal(image) {
  if (state.original instanceof ImageBitmap) state.original.close();
  state.original = image;
  state.drawn = false;
}

function fitOriginal() {
  clearCanvas();
  if (state.original) drawCover(state.original, state.original.width, state.original.height);
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
  // Re-fit the original each time: re-cropping the last crop loses resolution and, across aspect ratios, the
  // picture. What was drawn since the last fit becomes the original, at the size it was drawn at.
  if (state.drawn) {
    const copy = document.createElement("canvas");
    copy.width = canvas.width;
    copy.height = canvas.height;
    copy.getContext("2d").drawImage(canvas, 0, 0);
    setOriginal(copy);
  }
  canvas.width = width;
  canvas.height = height;
  fitOriginal();
}

async function loadUpload(file) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    return setSourceError("that file is not an image this browser can read");
  }
  setOriginal(bitmap); // kept at full size for later size changes
  fitOriginal();
  state.uploaded = true;
  setSourceError("");
  schedule();
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
    ctx.lineWidth = (Number($("brush-size").value) * Math.min(canvas.width, canvas.height)) / BRUSH_BASE_PX;
    ctx.lineCap = "round";
    ctx.beginPath();
    ctx.moveTo(...last);
    ctx.lineTo(...next);
    ctx.stroke();
    state.drawn = true;
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
  const ticket = ++state.webcamTicket;
  setSourceError("webcam: waiting for the camera (allow it if the browser asks)");
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  } catch (err) {
    if (ticket === state.webcamTicket) setSourceError(`webcam unavailable: ${err.message}`);
    return;
  }
  if (ticket !== state.webcamTicket) return stream.getTracks().forEach((t) => t.stop()); // the user left meanwhile
  state.webcam = stream;
  const video = $("webcam");
  video.srcObject = stream;
  try {
    await video.play();
  } catch {
    return; // interrupted: the source changed again
  }
  if (ticket !== state.webcamTicket) return;
  setSourceError("");
  requestIfIdle();
}

function stopWebcam() {
  state.webcamTicket++;
  if (!state.webcam) return;
  state.webcam.getTracks().forEach((t) => t.stop());
  state.webcam = null;
  $("webcam").srcObject = null;
}

function captureWebcam() {
  const video = $("webcam");
  if (!video.videoWidth) return;
  drawCover(video, video.videoWidth, video.videoHeight);
  state.drawn = true;
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
  $("seed-random").addEventListener("click", () => {
    $("seed").value = randomSeed();
    state.lastKey = ""; // asked for: sent even where the seed is random anyway
    schedule();
  });
  $("upload").addEventListener("change", () => { if ($("upload").files[0]) loadUpload($("upload").files[0]); });
  $("canvas-clear").addEventListener("click", () => { setOriginal(null); clearCanvas(); schedule(); });
  for (const radio of document.querySelectorAll("input[name=source]")) {
    radio.addEventListener("change", () => setSource(radio.value));
  }
  $("download").addEventListener("click", () => send({ type: "download", id: state.downloadId })); // enabled: shown
  $("auth").addEventListener("submit", (ev) => {
    ev.preventDefault(); // a form so that Enter submits, without the page reloading
    sendKey($("api-key").value);
  });
  connect();
}

init();
