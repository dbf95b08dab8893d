// The Kolors web page: a form that posts AUTOMATIC1111-style requests to this server's /sdapi/v1 API,
// polls its progress while a request runs, and keeps this session's images in a gallery.
// Plain browser JavaScript, no build step and nothing fetched from elsewhere, so it works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "kolors.apiKey";
const POLL_MS = 400;

let busy = false;
let interrupted = false; // the user pressed Interrupt during the current request
let run = 0; // counts requests, so a poller left over from the last one stops
let taskId = ""; // A1111's force_task_id of the running request: its progress and interrupt are its own
let initImage = null; // data: URL of the image-to-image start image, sent as A1111's init_images[0]
let controlImage = null; // data: URL of the ControlNet's image, sent as sd-webui-controlnet's unit image
let ipImage = null; // data: URL of the reference image, sent as sd-webui-controlnet's IP-Adapter unit
let faceImage = null; // data: URL of the face photo, sent as sd-webui-controlnet's FaceID unit

// ---- talking to the server ----

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

// Relative paths, so a server mounted under a prefix still works.
async function api(path, { method = "GET", body } = {}) {
  let res;
  try {
    res = await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new Error(`Cannot reach the server (${e.message}). Is it still running?`);
  }
  if (!res.ok) {
    const error = new Error(await errorText(res));
    error.status = res.status;
    throw error;
  }
  return res.json();
}

// FastAPI answers a string `detail` for its own checks and a list of {loc, msg} for schema errors.
async function errorText(res) {
  let detail = "";
  try {
    const body = await res.json();
    detail = body.detail ?? body.error?.message ?? body.error ?? "";
  } catch {
    /* not JSON: fall back to the status line */
  }
  if (Array.isArray(detail)) {
    detail = detail
      .map((d) => {
        const field = (d.loc || []).filter((p) => p !== "body").join(".");
        return field ? `${field}: ${d.msg}` : d.msg;
      })
      .join("; ");
  } else if (typeof detail !== "string") {
    detail = JSON.stringify(detail);
  }
  let text = detail || `${res.status} ${res.statusText}`;
  if (res.status === 401 || res.status === 403) {
    text += " (enter this server's API key at the top of the page)";
    $("key-box").open = true;
  }
  if (res.status === 429) {
    const after = res.headers.get("Retry-After");
    text = `The queue is full${after ? `; try again in ${after} s` : ", try again shortly"}. ${detail}`.trim();
  }
  return text;
}

// ---- form ----

function snapToEight(input) {
  const v = Number(input.value);
  if (!Number.isFinite(v) || input.value === "") return;
  input.value = Math.max(8, Math.round(v / 8) * 8);
}

function setSize(width, height) {
  $("width").value = width;
  $("height").value = height;
  const preset = `${width}x${height}`;
  const known = [...$("size-preset").options].some((o) => o.value === preset);
  $("size-preset").value = known ? preset : "custom";
}

function intField(id) {
  const v = Number($(id).value);
  return Number.isFinite(v) ? Math.trunc(v) : $(id).value; // a non-number goes through: the server names the field
}

function buildRequest() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    seed: $("seed").value === "" ? -1 : intField("seed"),
    steps: intField("steps"),
    cfg_scale: Number($("guidance").value),
    width: intField("width"),
    height: intField("height"),
    batch_size: intField("batch-size"),
    n_iter: 1,
  };
  if ($("sampler").value) body.sampler_name = $("sampler").value;
  if (initImage) {
    body.init_images = [initImage];
    body.denoising_strength = Number($("strength").value);
    if (maskPainted) {
      // A1111's inpaint fields: the whole picture, the original content under the mask, a soft edge.
      Object.assign(body, { mask: maskPNG(), mask_blur: 4, inpainting_fill: 1, inpaint_full_res: false });
    }
  }
  if (controlImage && $("control-model").value) {
    // One unit as sd-webui-controlnet's API takes it; the server resizes the image to the output size.
    const unit = {
      enabled: true,
      model: $("control-model").value,
      module: $("control-module").value,
      weight: Number($("control-scale").value),
      image: controlImage,
      resize_mode: "Just Resize",
      control_mode: $("control-mode").value,
    };
    body.alwayson_scripts = { ControlNet: { args: [unit] } };
  }
  if (ipImage) {
    // The reference image as sd-webui-controlnet's IP-Adapter unit, beside a ControlNet unit if there is one.
    const unit = { module: "ip-adapter", image: ipImage, weight: Number($("ip-scale").value) };
    body.alwayson_scripts = body.alwayson_scripts || { ControlNet: { args: [] } };
    body.alwayson_scripts.ControlNet.args.push(unit);
  }
  if (faceImage) {
    // The face as sd-webui-controlnet's FaceID-Plus unit: the server finds the face and keeps it.
    const unit = { module: "ip-adapter_face_id_plus", image: faceImage, weight: Number($("face-scale").value) };
    body.alwayson_scripts = body.alwayson_scripts || { ControlNet: { args: [] } };
    body.alwayson_scripts.ControlNet.args.push(unit);
  }
  return body;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function setBusy(on) {
  busy = on;
  $("generate").disabled = on;
  $("interrupt").disabled = !on;
  $("generate-form").setAttribute("aria-busy", String(on));
  $("progress-box").hidden = !on;
  if (!on) $("preview").hidden = true;
  if (on) {
    $("progress").value = 0;
    $("progress-text").textContent = "Sending…";
  }
}

async function generate(event) {
  event.preventDefault();
  if (busy) return;
  showError("");
  interrupted = false;
  setBusy(true);
  const endpoint = initImage ? "sdapi/v1/img2img" : "sdapi/v1/txt2img";
  taskId = `task(web-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)})`;
  const body = { ...buildRequest(), force_task_id: taskId };
  pollProgress(++run, taskId);
  try {
    const result = await api(endpoint, { method: "POST", body });
    addResults(result);
  } catch (e) {
    // 409: the server stopped the job before its first image, which is what Interrupt asked for.
    showError(interrupted && e.status === 409 ? "Interrupted before an image was finished." : e.message);
  } finally {
    setBusy(false);
  }
}

// A1111 1.6+'s per-task progress: this request's own job, with its place while it waits in the queue (the
// server may run other people's jobs, or several at once), and its preview only when a new one is ready.
async function pollProgress(id, task) {
  let previewId = -1;
  while (busy && id === run) {
    try {
      const p = await api("internal/progress", {
        method: "POST",
        body: { id_task: task, id_live_preview: previewId, live_preview: true },
      });
      if (!busy || id !== run) break;
      if (p.id_live_preview != null) previewId = p.id_live_preview;
      showProgress(p);
    } catch {
      /* a missed poll is harmless; the request itself reports real errors */
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

function showProgress(p) {
  $("progress").value = Math.min(1, Math.max(0, p.progress || 0));
  // The server's cheap preview of this job (sent when it changed; null until the first step, or when previews
  // are off): the last one stays shown.
  if (p.live_preview) {
    $("preview").src = p.live_preview;
    $("preview").hidden = false;
  }
  if (interrupted) {
    $("progress-text").textContent = "Interrupting…";
  } else if (p.active) {
    const eta = p.eta > 0 ? ` · about ${Math.ceil(p.eta)} s left` : "";
    $("progress-text").textContent = `${p.textinfo || "Working…"}${eta}`;
  } else if (p.queued) {
    $("progress-text").textContent = p.textinfo || "Waiting in the queue…";
  } else {
    $("progress-text").textContent = "Waiting for the model…";
  }
}

async function interrupt() {
  interrupted = true;
  $("progress-text").textContent = "Interrupting…";
  try {
    await api(`sdapi/v1/interrupt?id_task=${encodeURIComponent(taskId)}`, { method: "POST" });
  } catch (e) {
    showError(e.message);
  }
}

// ---- image to image ----

function readImage(file) {
  showError("");
  if (!file) return clearImage();
  const reader = new FileReader();
  reader.onload = () => {
    const probe = new Image();
    probe.onload = () => {
      initImage = reader.result;
      $("init-preview").src = initImage;
      $("init-box").hidden = false;
      startMask(probe.naturalWidth, probe.naturalHeight);
      $("strength").disabled = false;
      // A1111 resizes the start image to width x height: start from the image's own size.
      setSize(Math.max(8, probe.naturalWidth - (probe.naturalWidth % 8)), Math.max(8, probe.naturalHeight - (probe.naturalHeight % 8)));
      $("generate").textContent = "Generate from image";
    };
    probe.onerror = () => {
      clearImage();
      showError(`${file.name} is not an image this browser can read; choose a PNG, JPEG or WebP file.`);
    };
    probe.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function clearImage() {
  initImage = null;
  $("init-image").value = "";
  $("init-preview").removeAttribute("src");
  $("init-box").hidden = true;
  $("mask-box").hidden = true;
  $("strength").disabled = true;
  $("generate").textContent = "Generate";
}

// ---- inpainting mask ----
// The mask is painted at the image's own resolution: white strokes on a transparent canvas, sent as a PNG of
// white (redraw) on black (keep).

let maskPainted = false;
let lastPoint = null;

function startMask(width, height) {
  const canvas = $("mask-canvas");
  canvas.width = width;
  canvas.height = height;
  $("mask-image").src = initImage;
  $("mask-box").hidden = false;
  setMaskPainted(false);
}

function setMaskPainted(on) {
  maskPainted = on;
  $("generate").textContent = !initImage ? "Generate" : on ? "Inpaint" : "Generate from image";
}

function canvasPoint(event) {
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  return [
    ((event.clientX - box.left) * canvas.width) / box.width,
    ((event.clientY - box.top) * canvas.height) / box.height,
  ];
}

function paint(event) {
  if (!lastPoint) return;
  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  const point = canvasPoint(event);
  // The brush size is in screen pixels, so it feels the same whatever the image's resolution.
  ctx.lineWidth = (Number($("brush-size").value) * canvas.width) / canvas.getBoundingClientRect().width;
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.strokeStyle = "#fff";
  ctx.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
  ctx.beginPath();
  ctx.moveTo(...lastPoint);
  ctx.lineTo(...point);
  ctx.stroke();
  lastPoint = point;
  if (!$("eraser").checked) setMaskPainted(true);
}

function startStroke(event) {
  event.preventDefault();
  $("mask-canvas").setPointerCapture(event.pointerId);
  lastPoint = canvasPoint(event);
  paint(event); // a click paints a dot
}

function endStroke() {
  lastPoint = null;
  if ($("eraser").checked) setMaskPainted(maskHasPaint());
}

function maskHasPaint() {
  const canvas = $("mask-canvas");
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 3; i < data.length; i += 4) if (data[i] > 0) return true;
  return false;
}

function invertMask() {
  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  const image = ctx.getImageData(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < image.data.length; i += 4) {
    image.data[i] = image.data[i + 1] = image.data[i + 2] = 255;
    image.data[i + 3] = 255 - image.data[i + 3];
  }
  ctx.putImageData(image, 0, 0);
  setMaskPainted(maskHasPaint());
}

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  setMaskPainted(false);
}

function maskPNG() {
  const canvas = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(canvas, 0, 0);
  return out.toDataURL("image/png");
}

// ---- ControlNet ----

function readControlImage(file) {
  showError("");
  if (!file) return clearControl();
  const reader = new FileReader();
  reader.onload = () => {
    controlImage = reader.result;
    $("control-box-images").hidden = false;
    showControlPreview();
  };
  reader.readAsDataURL(file);
}

// ---- reference image (IP-Adapter) ----

// The reference image's ("ip") or the face's ("face") slot: its file, preview box and strength slider.
function readReference(file, kind = "ip") {
  showError("");
  if (!file) return clearReference(kind);
  const reader = new FileReader();
  reader.onload = () => {
    const probe = new Image();
    probe.onload = () => {
      if (kind === "face") faceImage = reader.result;
      else ipImage = reader.result;
      $(`${kind}-preview`).src = reader.result;
      $(`${kind}-box`).hidden = false;
      $(`${kind}-scale`).disabled = false;
    };
    probe.onerror = () => {
      clearReference(kind);
      showError(`${file.name} is not an image this browser can read; choose a PNG, JPEG or WebP file.`);
    };
    probe.src = reader.result;
  };
  reader.readAsDataURL(file);
}

// The preprocessor's map of the control image, from the server's /controlnet/detect.
async function showControlPreview() {
  if (!controlImage) return;
  const module = $("control-module").value;
  if (module === "none") {
    $("control-preview").src = controlImage;
    return;
  }
  try {
    const r = await api("controlnet/detect", {
      method: "POST",
      body: { controlnet_module: module, controlnet_input_images: [controlImage] },
    });
    $("control-preview").src = `data:image/png;base64,${r.images[0]}`;
  } catch (e) {
    showError(e.message);
  }
}

function clearControl() {
  controlImage = null;
  $("control-image").value = "";
  $("control-preview").removeAttribute("src");
  $("control-box-images").hidden = true;
}

async function loadControlNets() {
  const models = (await api("controlnet/model_list")).model_list || [];
  $("control-box").hidden = !models.length;
  $("control-model").replaceChildren(...models.map((m) => new Option(m, m)));
  const modules = (await api("controlnet/module_list")).module_list || ["none"];
  $("control-module").replaceChildren(...modules.map((m) => new Option(m, m)));
}

function clearReference(kind = "ip") {
  if (kind === "face") faceImage = null;
  else ipImage = null;
  $(`${kind}-image`).value = "";
  $(`${kind}-preview`).removeAttribute("src");
  $(`${kind}-box`).hidden = true;
  $(`${kind}-scale`).disabled = true;
}

// The reference and face slots only where the server loaded their adapters (--ip-adapter, --faceid): a
// request with an image prompt the server cannot use is refused.
async function loadImagePrompts() {
  const prompts = await api("controlnet/image_prompts");
  $("ip-fieldset").hidden = !prompts.ip_adapter;
  if (!prompts.ip_adapter) clearReference("ip");
  $("face-fieldset").hidden = !prompts.faceid;
  if (!prompts.faceid) clearReference("face");
}

// ---- gallery ----

// The PNG bytes exactly as the server sent them, so the download keeps the `parameters` text chunk.
function pngBlob(b64) {
  const raw = atob(b64.replace(/^data:[^,]*,/, ""));
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return new Blob([bytes], { type: "image/png" });
}

function addResults(result) {
  let info = result.info || {};
  if (typeof info === "string") {
    try {
      info = JSON.parse(info);
    } catch {
      info = {};
    }
  }
  const seeds = info.all_seeds || [];
  const infotexts = info.infotexts || [];
  const items = (result.images || []).map((b64, i) => ({
    url: URL.createObjectURL(pngBlob(b64)),
    seed: seeds[i] ?? (info.seed != null ? info.seed + i : "?"),
    infotext: infotexts[i] || "",
    prompt: (result.parameters || {}).prompt ?? $("prompt").value,
  }));
  // Newest first, and a batch keeps its own order at the top.
  for (const item of items.reverse()) $("gallery").prepend(galleryItem(item));
  $("gallery-empty").hidden = $("gallery").children.length > 0;
  if (!items.length) {
    showError(interrupted ? "Interrupted before an image was finished." : "The server answered without images.");
  }
}

function galleryItem(item) {
  const li = document.createElement("li");
  li.className = "card";
  li.dataset.seed = item.seed;

  const view = document.createElement("button");
  view.type = "button";
  view.className = "thumb";
  view.setAttribute("aria-label", `View image with seed ${item.seed} large`);
  const img = document.createElement("img");
  img.src = item.url;
  img.alt = item.prompt || "Generated image";
  view.append(img);
  view.addEventListener("click", () => openViewer(item));

  const caption = document.createElement("p");
  caption.className = "seed";
  caption.textContent = `Seed ${item.seed}`;

  const download = document.createElement("a");
  download.href = item.url;
  download.download = `kolors-${item.seed}.png`;
  download.textContent = "Download PNG";
  download.className = "download";

  li.append(view, caption, download);
  return li;
}

function openViewer(item) {
  $("viewer-title").textContent = `Seed ${item.seed}`;
  $("viewer-image").src = item.url;
  $("viewer-image").alt = item.prompt || "Generated image";
  $("viewer-info").textContent = item.infotext;
  $("viewer-download").href = item.url;
  $("viewer-download").download = `kolors-${item.seed}.png`;
  $("viewer-reuse").onclick = () => {
    $("seed").value = item.seed;
    $("viewer").close();
    $("seed").focus();
  };
  $("viewer").showModal();
}

// ---- start ----

async function loadServerInfo() {
  showError("");
  try {
    const health = await api("health");
    let model = "";
    try {
      const options = await api("sdapi/v1/options");
      model = options.sd_model_checkpoint || "";
    } catch {
      /* optional */
    }
    const state = `Server ${health.status || "ready"}`;
    $("server-status").textContent = model ? `${state} · model ${model}` : state;
  } catch (e) {
    $("server-status").textContent = "Server not reachable";
    showError(e.message);
  }
  try {
    fillSamplers(await api("sdapi/v1/samplers"));
    fillLoras(await api("sdapi/v1/loras"));
    await loadControlNets();
    await loadImagePrompts();
  } catch (e) {
    showError(e.message);
  }
}

// The server's --lora-dir, if any: picking one writes A1111's <lora:NAME:SCALE> tag into the prompt.
function fillLoras(loras) {
  $("lora-row").hidden = !loras.length;
  $("lora").replaceChildren(...loras.map((l) => new Option(l.name, l.name)));
}

function addLora() {
  const prompt = $("prompt");
  const tag = `<lora:${$("lora").value}:0.8>`;
  prompt.value = prompt.value.trim() ? `${prompt.value.trim()} ${tag}` : tag;
  prompt.focus();
}

function fillSamplers(samplers) {
  if (!samplers.length) return;
  const select = $("sampler");
  select.replaceChildren(
    ...samplers.map((s) => {
      const option = new Option(s.name, s.name);
      if (s.aliases?.length) option.title = `also: ${s.aliases.join(", ")}`;
      return option;
    }),
  );
  // DPM-Solver++(2M) is the sampler that looks good at the default 25 steps.
  const names = (s) => [s.name, ...(s.aliases || [])].map((n) => n.toLowerCase());
  const preferred = samplers.find((s) => names(s).some((n) => n.includes("dpmpp-2m") || n.includes("dpm++ 2m")));
  if (preferred) select.value = preferred.name;
}

function init() {
  $("add-lora").addEventListener("click", addLora);
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    loadServerInfo();
  });

  $("size-preset").addEventListener("change", () => {
    const v = $("size-preset").value;
    if (v === "custom") return $("width").focus();
    const [w, h] = v.split("x").map(Number);
    setSize(w, h);
  });
  for (const id of ["width", "height"]) {
    $(id).addEventListener("change", () => {
      snapToEight($(id));
      setSize($("width").value, $("height").value);
    });
  }
  $("random-seed").addEventListener("click", () => ($("seed").value = -1));
  $("strength").addEventListener("input", () => ($("strength-value").value = Number($("strength").value).toFixed(2)));
  $("init-image").addEventListener("change", () => readImage($("init-image").files[0]));
  $("clear-image").addEventListener("click", clearImage);
  $("mask-canvas").addEventListener("pointerdown", startStroke);
  $("mask-canvas").addEventListener("pointermove", paint);
  $("mask-canvas").addEventListener("pointerup", endStroke);
  $("mask-canvas").addEventListener("pointercancel", endStroke);
  $("invert-mask").addEventListener("click", invertMask);
  $("clear-mask").addEventListener("click", clearMask);
  $("control-image").addEventListener("change", () => readControlImage($("control-image").files[0]));
  $("control-module").addEventListener("change", showControlPreview);
  $("clear-control").addEventListener("click", clearControl);
  $("control-scale").addEventListener("input", () => ($("control-scale-value").value = Number($("control-scale").value).toFixed(2)));
  $("ip-scale").addEventListener("input", () => ($("ip-scale-value").value = Number($("ip-scale").value).toFixed(2)));
  $("ip-image").addEventListener("change", () => readReference($("ip-image").files[0]));
  $("clear-ip").addEventListener("click", () => clearReference("ip"));
  $("face-scale").addEventListener("input", () => ($("face-scale-value").value = Number($("face-scale").value).toFixed(2)));
  $("face-image").addEventListener("change", () => readReference($("face-image").files[0], "face"));
  $("clear-face").addEventListener("click", () => clearReference("face"));
  $("generate-form").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", interrupt);
  $("viewer-close").addEventListener("click", () => $("viewer").close());
  // Ctrl+Enter (Cmd+Enter) in a prompt generates, as in most image UIs.
  for (const id of ["prompt", "negative-prompt"]) {
    $(id).addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("generate-form").requestSubmit();
    });
  }
  loadServerInfo();
}

init();
