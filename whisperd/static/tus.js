// A small tus 1.0.0 client (creation, core, termination) for large files: the file goes up in
// PATCHes of CHUNK bytes; after a network error, a 5xx, a 423 or a 409 it asks the server (HEAD)
// where to go on and carries on from there by itself, waiting longer each time. The upload's URL
// is kept in localStorage for its file, so a reloaded page resumes it too.

const VERSION = "1.0.0";
export const CHUNK = 8 * 1024 * 1024;
const DELAYS_MS = [1000, 2000, 4000, 8000, 15000, 30000];
const MAX_FAILURES = 40; // in a row, without a byte of progress: then give up and say why
const KEPT = "whisperd.upload.";

export class UploadError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;
  }
}

function encodeName(name) {
  const bytes = new TextEncoder().encode(name);
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary);
}

function errorOf(xhr) {
  try {
    return JSON.parse(xhr.responseText).error || "";
  } catch {
    return "";
  }
}

export class ResumableUpload {
  // onProgress(sentBytes, totalBytes); onRetry(message, delayMs) while it waits to resume.
  constructor(file, { headers = {}, onProgress = () => {}, onRetry = () => {} } = {}) {
    Object.assign(this, { file, headers, onProgress, onRetry });
    this.url = null;
    this.xhr = null;
    this.aborted = false;
    this.key = `${KEPT}${file.name}:${file.size}:${file.lastModified}`;
  }

  // Resolves with the upload's id once every byte is on the server.
  async start() {
    this.url = localStorage.getItem(this.key);
    let offset = this.url ? await this.offsetOrNull() : null;
    if (offset === null) {
      this.url = await this.create();
      localStorage.setItem(this.key, this.url);
      offset = 0;
    }
    let failures = 0;
    while (offset < this.file.size) {
      if (this.aborted) throw new UploadError("canceled");
      const answer = await this.patch(offset);
      if (answer.status === 204) {
        offset = Number(answer.getResponseHeader("Upload-Offset"));
        failures = 0;
        continue;
      }
      const retryable = answer.status === 0 || answer.status === 409 || answer.status === 423 || answer.status >= 500;
      if (!retryable || ++failures > MAX_FAILURES) {
        if (answer.status === 404 || answer.status === 410) localStorage.removeItem(this.key);
        throw new UploadError(errorOf(answer) || "the upload could not be finished", answer.status);
      }
      const delay = DELAYS_MS[Math.min(failures - 1, DELAYS_MS.length - 1)];
      const why = answer.status === 0 ? "the connection was lost" : `the server answered ${answer.status}`;
      this.onRetry(`Upload interrupted (${why}); resuming in ${Math.round(delay / 1000)} s…`, delay);
      await new Promise((resolve) => setTimeout(resolve, delay));
      const known = await this.offsetOrNull();
      if (known === null && !this.aborted) {
        localStorage.removeItem(this.key);
        throw new UploadError("the server no longer has this upload (it expired or was deleted); start again", 404);
      }
      offset = known ?? offset;
    }
    this.onProgress(this.file.size, this.file.size);
    return this.url.split("/").pop();
  }

  // The upload was used by a job: forget it here.
  done() {
    localStorage.removeItem(this.key);
  }

  // Stop now, and delete what the server has of it (termination).
  abort() {
    this.aborted = true;
    if (this.xhr) this.xhr.abort();
    localStorage.removeItem(this.key);
    if (this.url) this.request("DELETE", this.url, {}).catch(() => {});
  }

  async create() {
    const answer = await this.request("POST", "/uploads", {
      "Upload-Length": String(this.file.size),
      "Upload-Metadata": `filename ${encodeName(this.file.name)}`,
    });
    if (answer.status !== 201) {
      throw new UploadError(errorOf(answer) || "the server did not create the upload", answer.status);
    }
    return answer.getResponseHeader("Location");
  }

  // The server's offset, or null when it does not know this upload (any more); network errors retry.
  async offsetOrNull() {
    for (let failures = 0; ; failures++) {
      if (this.aborted) return null;
      const answer = await this.request("HEAD", this.url, {});
      if (answer.status === 200) return Number(answer.getResponseHeader("Upload-Offset"));
      if (answer.status !== 0 && answer.status < 500) return null;
      if (failures >= MAX_FAILURES) throw new UploadError("the server cannot be reached", answer.status);
      const delay = DELAYS_MS[Math.min(failures, DELAYS_MS.length - 1)];
      this.onRetry(`The server cannot be reached; trying again in ${Math.round(delay / 1000)} s…`, delay);
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }

  patch(offset) {
    const chunk = this.file.slice(offset, Math.min(offset + CHUNK, this.file.size));
    return this.request("PATCH", this.url, {
      "Upload-Offset": String(offset),
      "Content-Type": "application/offset+octet-stream",
    }, chunk, (sent) => this.onProgress(offset + sent, this.file.size));
  }

  // XMLHttpRequest, not fetch(): fetch() reports no upload progress. Resolves with the xhr,
  // status 0 for a network error or an abort.
  request(method, url, headers, body = null, onSent = null) {
    return new Promise((resolve) => {
      const xhr = new XMLHttpRequest();
      this.xhr = xhr;
      xhr.open(method, url);
      xhr.setRequestHeader("Tus-Resumable", VERSION);
      for (const [name, value] of Object.entries({ ...this.headers, ...headers })) xhr.setRequestHeader(name, value);
      if (onSent) xhr.upload.addEventListener("progress", (e) => onSent(e.loaded));
      const settle = () => {
        if (this.xhr === xhr) this.xhr = null;
        resolve(xhr);
      };
      xhr.addEventListener("load", settle);
      xhr.addEventListener("error", settle);
      xhr.addEventListener("abort", settle);
      xhr.addEventListener("timeout", settle);
      xhr.send(body);
    });
  }
}
