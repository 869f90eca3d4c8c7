// The whisperd page: token, upload with progress, live status (server-sent events, polling as
// a fallback), cancel, and the transcript with copy and download in every format.
import { FORMATS, MIME_TYPES, render } from "./formats.js";
import { ResumableUpload } from "./tus.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "whisperd.token";
const POLL_MS = 1000;
// Larger files go up resumably (tus, /uploads): a dropped connection costs one chunk, not the file.
const RESUMABLE_FROM = 8 * 1024 * 1024;
const JOBS_MS = 3000; // "Your jobs" refreshes this often while the tab is visible

const state = { jobId: null, xhr: null, upload: null, stream: null, polling: null, finished: false, fileName: "" };

// -- messages ---------------------------------------------------------------------------------

const HINTS = {
  400: "The server refused the request",
  401: "The server refused the token",
  404: "Not found",
  409: "Not possible now",
  410: "Gone",
  413: "The file is too large",
  415: "Not an upload the server accepts",
  422: "The transcription failed",
  429: "Refused for now",
  503: "The server is shutting down",
  507: "The server is out of disk space",
};

function showMessage(text, kind = "error") {
  const box = $("messages");
  box.className = kind === "info" ? "info" : "";
  box.textContent = text;
}

function clearMessage() {
  showMessage("");
}

async function errorText(status, bodyText) {
  let detail = "";
  try {
    detail = JSON.parse(bodyText).error || "";
  } catch {
    detail = bodyText ? bodyText.slice(0, 300) : "";
  }
  const hint = HINTS[status] || (status >= 500 ? "The server had a problem" : "The request failed");
  return `${hint} (HTTP ${status})${detail ? ": " + detail : "."}`;
}

// -- the API ----------------------------------------------------------------------------------

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;
  }
}

async function api(method, path) {
  let response;
  try {
    response = await fetch(path, { method, headers: authHeaders(), cache: "no-store" });
  } catch {
    throw new ApiError("Cannot reach the server: check your connection and try again.");
  }
  const text = await response.text();
  if (!response.ok) throw new ApiError(await errorText(response.status, text), response.status);
  try {
    return JSON.parse(text);
  } catch {
    throw new ApiError(`The server sent something that is not JSON (HTTP ${response.status}).`);
  }
}

// -- token and options ------------------------------------------------------------------------

function fillSelect(select, values, chosen, label = (v) => v) {
  select.replaceChildren(...values.map((value) => {
    const option = new Option(label(value), value, false, value === chosen);
    return option;
  }));
}

// What the chosen model can do: its own languages only, and translation only when it is multilingual.
// A model the server would download by name (not installed) is offered every language.
function showModelAbilities(info) {
  const chosen = $("model").value;
  const model = (info.model_info || []).find((m) => m.name === chosen);
  const languages = model ? (model.multilingual ? ["auto", ...model.languages] : model.languages) : info.languages;
  const previous = $("language").value || info.defaults.language;
  const language = languages.includes(previous) ? previous : languages[0];
  fillSelect($("language"), languages, language, (v) => (v === "auto" ? "auto (detect)" : v));
  const translate = $("task").querySelector('option[value="translate"]');
  translate.disabled = Boolean(model && !model.tasks.includes("translate"));
  if (translate.disabled && $("task").value === "translate") $("task").value = "transcribe";
  $("task").title = translate.disabled ? `${chosen} is English-only: it cannot translate` : "";
}

async function loadOptions() {
  try {
    const info = await api("GET", "/models");
    const models = info.models.length ? [...info.models] : [info.defaults.model];
    if (!models.includes(info.defaults.model)) models.unshift(info.defaults.model);
    fillSelect($("model"), models, info.defaults.model);
    $("language").replaceChildren();
    showModelAbilities(info);
    $("model").onchange = () => showModelAbilities(info);
    fillSelect($("response_format"), info.formats, info.defaults.response_format);
    $("diarize").checked = info.defaults.diarize;
    startJobsList();
    $("token-state").textContent = token() ? "Token accepted. It stays in this tab only." : "The server needs no token.";
    clearMessage();
    return true;
  } catch (error) {
    if (error.status === 401 && !token()) {
      $("token-state").textContent = "This server needs a token: paste it above, then press “Use token”.";
    } else {
      showMessage(error.message);
    }
    return false;
  }
}

function setupToken() {
  $("token").value = token();
  $("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
    await loadOptions();
  });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("token").value = "";
    $("token-state").textContent = "Token forgotten.";
  });
}

// -- choosing a file --------------------------------------------------------------------------

function size(bytes) {
  return bytes >= 1048576 ? `${(bytes / 1048576).toFixed(1)} MB` : `${Math.max(1, Math.round(bytes / 1024))} KB`;
}

function setupDrop() {
  const drop = $("drop");
  const input = $("file");
  const show = () => {
    const file = input.files[0];
    $("file-name").textContent = file ? `${file.name} (${size(file.size)})` : "No file chosen";
  };
  input.addEventListener("change", show);
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      show();
    }
  });
}

// -- a job ------------------------------------------------------------------------------------

function setBar(bar, text, percent, label) {
  if (percent === null) {
    bar.removeAttribute("value"); // indeterminate
  } else {
    bar.value = percent;
  }
  text.textContent = label;
}

function setStatus(text) {
  $("job-status").textContent = text;
}

function startJob(event) {
  event.preventDefault();
  clearMessage();
  const file = $("file").files[0];
  if (!file) {
    showMessage("Choose an audio file first (drop it on the box or press it to choose).");
    $("file").focus();
    return;
  }
  const form = new FormData();
  form.append("language", $("language").value);
  form.append("model", $("model").value);
  form.append("task", $("task").value);
  form.append("response_format", $("response_format").value);
  form.append("diarize", $("diarize").checked ? "true" : "false");
  if ($("prompt").value) form.append("prompt", $("prompt").value);

  Object.assign(state, { jobId: null, finished: false, fileName: file.name });
  $("result").hidden = true;
  $("job").hidden = false;
  $("start").disabled = true;
  $("cancel").disabled = false;
  $("cancel").hidden = false;
  $("job-id").textContent = "";
  setBar($("upload-bar"), $("upload-text"), 0, "0%");
  setBar($("engine-bar"), $("engine-text"), 0, "—");
  setStatus(`Uploading ${file.name}…`);
  if (file.size > RESUMABLE_FROM) {
    uploadResumably(file, form);
  } else {
    form.append("file", file, file.name);
    sendForm(form, true);
  }
}

function showUploaded(sent, total) {
  const percent = Math.round((100 * sent) / total);
  setBar($("upload-bar"), $("upload-text"), percent, `${percent}%`);
}

async function uploadResumably(file, form) {
  const upload = new ResumableUpload(file, {
    headers: authHeaders(),
    onProgress: (sent, total) => {
      showUploaded(sent, total);
      setStatus(`Uploading ${file.name} (resumable)…`);
    },
    onRetry: (message) => setStatus(message),
  });
  state.upload = upload;
  let uploadId;
  try {
    uploadId = await upload.start();
  } catch (error) {
    state.upload = null;
    endJob();
    if (upload.aborted) {
      setStatus("Upload canceled.");
      return;
    }
    setStatus("Upload failed.");
    showMessage(await errorText(error.status, JSON.stringify({ error: error.message })));
    return;
  }
  state.upload = null;
  setStatus(`Uploaded ${file.name}. Starting the job…`);
  form.append("upload", uploadId);
  sendForm(form, false, () => upload.done());
}

// POST /transcription; withProgress: the form carries the file (upload progress from this request).
function sendForm(form, withProgress, onAccepted = () => {}) {
  const xhr = new XMLHttpRequest();
  state.xhr = xhr;
  xhr.open("POST", "/transcription");
  for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
  if (withProgress) {
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) showUploaded(e.loaded, e.total);
    });
  }
  xhr.addEventListener("load", async () => {
    state.xhr = null;
    if (xhr.status === 202) {
      onAccepted();
      setBar($("upload-bar"), $("upload-text"), 100, "100%");
      const body = JSON.parse(xhr.responseText);
      state.jobId = body.job_id;
      $("job-id").textContent = `Job ${body.job_id}`;
      setStatus("Uploaded. Waiting for the server…");
      watch(body.job_id);
      refreshJobs();
    } else {
      endJob();
      setStatus("Upload refused.");
      showMessage(await errorText(xhr.status, xhr.responseText));
    }
  });
  xhr.addEventListener("error", () => {
    state.xhr = null;
    endJob();
    setStatus("Upload failed.");
    showMessage("The upload did not reach the server (network error or the server closed the connection).");
  });
  xhr.addEventListener("abort", () => {
    state.xhr = null;
    endJob();
    setStatus("Upload canceled.");
  });
  xhr.send(form);
}

function endJob() {
  $("start").disabled = false;
  $("cancel").disabled = true;
  $("cancel").hidden = true; // nothing left to cancel
  if (state.stream) state.stream.abort();
  state.stream = null;
  clearTimeout(state.polling);
  state.polling = null;
}

function showStatus(body) {
  if (state.finished) return;
  switch (body.status) {
    case "Queued":
      setStatus(`Queued: position ${body.queue_position} in the queue.`);
      setBar($("engine-bar"), $("engine-text"), 0, `#${body.queue_position}`);
      break;
    case "Processing": {
      const percent = typeof body.progress === "number" ? body.progress : null;
      const stage = body.stage ? ` (${body.stage})` : "";
      setStatus(`Processing${stage}${percent === null ? "" : `: ${percent.toFixed(0)}%`}`);
      setBar($("engine-bar"), $("engine-text"), percent, percent === null ? "…" : `${percent.toFixed(0)}%`);
      break;
    }
    case "Completed":
      state.finished = true;
      setBar($("engine-bar"), $("engine-text"), 100, "100%");
      setStatus("Completed. Fetching the transcript…");
      endJob();
      fetchResult();
      break;
    case "Failed":
      state.finished = true;
      setStatus("Failed.");
      endJob();
      showMessage(`The transcription failed: ${body.data || "no reason given"}`);
      break;
    case "Canceled":
      state.finished = true;
      setStatus("Canceled.");
      endJob();
      break;
    default:
      state.finished = true;
      setStatus(body.data || body.status);
      endJob();
  }
}

// Server-sent events through fetch(), not EventSource: EventSource cannot send the Bearer header.
async function watch(jobId) {
  const controller = new AbortController();
  state.stream = controller;
  try {
    const response = await fetch(`/transcription/${jobId}/events`, {
      headers: { ...authHeaders(), Accept: "text/event-stream" }, signal: controller.signal, cache: "no-store",
    });
    if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (data) showStatus(JSON.parse(data));
      }
    }
  } catch (error) {
    if (controller.signal.aborted) return;
  }
  if (!state.finished && state.jobId === jobId) poll(jobId); // the stream broke: poll instead
}

async function poll(jobId) {
  if (state.finished || state.jobId !== jobId) return;
  try {
    showStatus(await api("GET", `/transcription/${jobId}`));
  } catch (error) {
    state.finished = true;
    endJob();
    setStatus("Lost track of the job.");
    showMessage(error.message);
    return;
  }
  if (!state.finished) state.polling = setTimeout(() => poll(jobId), POLL_MS);
}

async function cancelJob() {
  clearMessage();
  if (state.upload) {
    state.upload.abort(); // the server deletes what it had of it
    return;
  }
  if (state.xhr) {
    state.xhr.abort();
    return;
  }
  if (!state.jobId) return;
  $("cancel").disabled = true;
  setStatus("Canceling…");
  try {
    const body = await api("DELETE", `/transcription/${state.jobId}`);
    state.finished = true;
    endJob();
    setStatus("Canceled.");
    showMessage(body.message || "Job canceled.", "info");
    refreshJobs();
  } catch (error) {
    $("cancel").disabled = false;
    showMessage(error.message);
  }
}

// -- the result -------------------------------------------------------------------------------

function clock(seconds) {
  const whole = Math.floor(seconds);
  const tenths = Math.floor((seconds - whole) * 10);
  const h = Math.floor(whole / 3600);
  const m = Math.floor((whole % 3600) / 60);
  const s = String(whole % 60).padStart(2, "0");
  return `${h ? `${h}:${String(m).padStart(2, "0")}` : m}:${s}.${tenths}`;
}

function baseName() {
  return (state.fileName.replace(/\.[^.]*$/, "") || "transcript").replace(/[^\w.-]+/g, "_");
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Clipboard API is for secure origins only; plain http on a LAN falls back to this.
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  const label = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = label; }, 1500);
}

function download(text, format) {
  const blob = new Blob([text], { type: `${MIME_TYPES[format]};charset=utf-8` });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${baseName()}.${format}`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// The server deletes a job's files after the first fetch, so the result is fetched once, as
// WhisperX's JSON, and every format is rendered from it here.
async function fetchResult() {
  let body;
  try {
    body = await api("GET", `/transcription/${state.jobId}/result?response_format=json`);
  } catch (error) {
    setStatus("Completed, but the transcript could not be fetched.");
    showMessage(error.message);
    return;
  }
  const result = JSON.parse(body.text);
  setStatus("Completed.");
  // Diarized: who was found, in order of first appearance; each keeps one colour in the transcript.
  const speakers = result.speakers || [...new Set(result.segments.map((s) => s.speaker).filter((s) => s != null))];
  $("result-meta").textContent =
    `${state.fileName}: ${result.segments.length} segment(s), language ${body.language || "unknown"}` +
    (speakers.length ? `, ${speakers.length} speaker(s): ${speakers.join(", ")}.` : ".");
  $("warnings").replaceChildren(...(body.warnings || []).map((w) => {
    const item = document.createElement("li");
    item.textContent = w;
    return item;
  }));
  $("downloads").replaceChildren(...FORMATS.map((format) => {
    const text = render(result, format, body.text);
    const box = document.createElement("div");
    box.className = "format";
    const name = document.createElement("span");
    name.textContent = format;
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "secondary";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", `Copy as ${format}`);
    copy.addEventListener("click", () => copyText(text, copy));
    const save = document.createElement("button");
    save.type = "button";
    save.textContent = "Download";
    save.setAttribute("aria-label", `Download ${format}`);
    save.dataset.format = format;
    save.addEventListener("click", () => download(text, format));
    box.append(name, copy, save);
    return box;
  }));
  $("transcript").replaceChildren(...result.segments.map((segment) => {
    const item = document.createElement("li");
    const time = document.createElement("time");
    time.textContent = `${clock(segment.start)} – ${clock(segment.end)}`;
    const text = document.createElement("p");
    text.style.margin = "0";
    if (segment.speaker != null) {
      const who = document.createElement("span");
      who.className = "speaker";
      who.textContent = segment.speaker;
      who.dataset.speaker = String(Math.max(0, speakers.indexOf(segment.speaker)) % 6);
      text.append(who);
    }
    text.append(segment.text.trim());
    item.append(time, text);
    return item;
  }));
  if (!result.segments.length) {
    const item = document.createElement("li");
    item.textContent = "No speech was found in this audio.";
    $("transcript").append(item);
  }
  $("result").hidden = false;
  $("result-title").focus(); // screen readers and keyboard users land on the transcript
}

function again() {
  $("result").hidden = true;
  $("job").hidden = true;
  $("file").value = "";
  $("file-name").textContent = "No file chosen";
  clearMessage();
  $("file").focus();
}

// -- your jobs --------------------------------------------------------------------------------

const jobs = { timer: null, busy: false };

function cell(...children) {
  const td = document.createElement("td");
  td.append(...children);
  return td;
}

function jobStatusText(job) {
  let text = job.status;
  if (job.status === "Processing" && job.progress != null) text += ` ${Math.round(job.progress)}%`;
  if (job.status === "Completed" && !job.result_available) {
    text += job.delivered_at ? " (result fetched)" : " (result expired)";
  }
  if (job.error && job.status === "Failed") text += `: ${job.error}`;
  return text;
}

function jobButton(label, ariaLabel, kind, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = kind;
  button.textContent = label;
  button.setAttribute("aria-label", ariaLabel);
  button.addEventListener("click", onClick);
  return button;
}

function jobRow(job) {
  const row = document.createElement("tr");
  row.dataset.jobId = job.job_id;
  const name = job.filename + (job.owner ? ` (${job.owner})` : "");
  const length = job.audio_seconds != null ? ` · ${clock(job.audio_seconds)}` : "";
  const status = document.createElement("span");
  status.className = `job-status status-${job.status.toLowerCase()}`;
  status.textContent = jobStatusText(job);
  const sent = document.createElement("time");
  sent.dateTime = job.created_at;
  sent.textContent = new Date(job.created_at).toLocaleString();
  const actions = cell();
  actions.className = "actions";
  if (job.result_available) {
    actions.append(jobButton("Get result", `Get the result of ${job.filename}`, "", () => openResult(job)));
  }
  if (job.status === "Queued" || job.status === "Processing") {
    actions.append(jobButton("Cancel", `Cancel ${job.filename}`, "danger", () => cancelListed(job)));
  }
  row.append(cell(name + length), cell(status), cell(sent), actions);
  return row;
}

async function refreshJobs() {
  if (jobs.busy) return;
  jobs.busy = true;
  try {
    const body = await api("GET", "/transcription?limit=20");
    $("jobs-body").replaceChildren(...body.jobs.map(jobRow));
    $("jobs-table").hidden = body.jobs.length === 0;
    $("jobs-state").textContent = body.jobs.length
      ? `Your ${body.jobs.length} most recent job(s); this list refreshes every few seconds.`
      : "No jobs yet.";
  } catch (error) {
    $("jobs-state").textContent = `The job list could not be loaded. ${error.message}`;
    if (error.status === 401) stopJobsList();
  } finally {
    jobs.busy = false;
  }
}

function stopJobsList() {
  clearInterval(jobs.timer);
  jobs.timer = null;
}

function startJobsList() {
  stopJobsList();
  refreshJobs();
  jobs.timer = setInterval(() => { if (!document.hidden) refreshJobs(); }, JOBS_MS);
}

// A listed job's result is fetched like the one this page just sent: once, then shown below.
async function openResult(job) {
  if (job.job_id === state.jobId && !state.finished) return; // its own flow fetches it
  clearMessage();
  state.jobId = job.job_id;
  state.fileName = job.filename;
  state.finished = true;
  await fetchResult();
  refreshJobs();
}

async function cancelListed(job) {
  if (job.job_id === state.jobId && !state.finished) {
    await cancelJob();
    return;
  }
  clearMessage();
  try {
    const body = await api("DELETE", `/transcription/${job.job_id}`);
    showMessage(body.message || "Job canceled.", "info");
  } catch (error) {
    showMessage(error.message);
  }
  refreshJobs();
}

setupToken();
setupDrop();
$("job-form").addEventListener("submit", startJob);
$("cancel").addEventListener("click", cancelJob);
$("again").addEventListener("click", again);
loadOptions();
