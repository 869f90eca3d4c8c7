"""The one server launcher tests and benchmarks share: a real whisperd (its real entry point, in
its own process group) with its own directories, ledger and engine log, on a free port.

It imports nothing of whisperd and nothing of pytest, so bench/ uses it as it is (bench/common.py):
whatever a test server is configured with, a benchmark server is too, and the two cannot drift.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
FAKE_ENGINE = REPO / "tests" / "fake_whisperx.py"
SHARED = REPO.parent / "shared"
JFK = SHARED / "fixtures" / "jfk.flac"
JFK_TEXT = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
TOKEN = "test-token-123"


def make_wav(path: Path, seconds: float = 1.0, rate: int = 16000, freq: float = 440.0) -> Path:
    """A short mono tone: real audio that ffmpeg and ffprobe accept."""
    frames = int(seconds * rate)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join(
            struct.pack("<h", int(8000 * math.sin(2 * math.pi * freq * i / rate))) for i in range(frames)
        ))
    return path


def long_tone(path: Path, seconds: int) -> bytes:
    """A WAV of `seconds` quickly made: one second of make_wav's tone (440 whole periods) repeated."""
    with wave.open(str(make_wav(path)), "rb") as one:
        frames = one.readframes(one.getnframes())
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(frames * seconds)
    return path.read_bytes()


class OutageFeeder:
    """Submissions to `node` on a thread while something it leans on goes away and comes back:
    `count` of them, 0.2 s apart (spread over the outage, not a wait). accepted: the job ids;
    refused: (status or None, text) of each submission that was not accepted."""

    def __init__(self, node, count: int) -> None:
        self.node, self.count = node, count
        self.accepted: list[str] = []
        self.refused: list[tuple[int | None, str, dict]] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        for _ in range(self.count):
            try:
                response = self.node.submit(diarize="false", prompt="fake:slow", timeout=60)
            except requests.RequestException as exc:
                self.refused.append((None, repr(exc), {}))
                continue
            if response.status_code == 202:
                self.accepted.append(response.json()["job_id"])
            else:
                self.refused.append((response.status_code, response.text, dict(response.headers)))
            time.sleep(0.2)

    def __enter__(self) -> "OutageFeeder":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.thread.join(120)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One whisperd process with its own directories, ledger and fake-engine log."""

    def __init__(self, root: Path, env: dict[str, str], wrap: list[str] | None = None,
                 db_url: str | None = None) -> None:
        self.root = root
        self.wrap = wrap or []  # interpreter options before whisperd.py (a profiler, for one)
        self.port = free_port()
        models = root / "models"
        root.mkdir(parents=True, exist_ok=True)
        (models / "tiny.en").mkdir(parents=True, exist_ok=True)
        (models / "tiny.en" / "model.bin").write_bytes(b"fake")
        conf = root / "whisper_api.conf"
        if not conf.exists():
            conf.write_text("# test configuration: everything comes from the environment\n")
        self.engine_log = root / "engine-runs.jsonl"
        self.default_audio = make_wav(root / "tone.wav")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("WHISPER", "HF_", "FAKE_WHISPERX"))}
        base.update({
            "WHISPER_API_CONF": str(conf),
            "WHISPER_API_HOST": "127.0.0.1",
            "WHISPER_API_PORT": str(self.port),
            "WHISPER_CMD": str(FAKE_ENGINE),
            "WHISPER_ENGINE": "cli",  # the worker's own tests ask for it (test_worker.py)
            "WHISPER_MODELS_DIR": str(models),
            "WHISPER_TMP_FILES": str(root / "tmp"),
            "WHISPER_OUTPUT_DIR": str(root / "output"),
            "WHISPER_DB_PATH": str(root / "whisperd.db"),
            "WHISPER_HF_TOKEN_FILE": str(root / "hf_token.txt"),
            "WHISPER_DEFAULT_MODEL": "tiny.en",
            "WHISPER_DEFAULT_LANGUAGE": "en",
            "WHISPER_DEVICE": "cpu",
            "WHISPER_OFFLINE": "true",
            "HTTP_WORKER_NUMBER": "1",
            "WHISPER_KILL_GRACE_SECONDS": "1",
            "WHISPER_SHUTDOWN_GRACE_SECONDS": "2",
            "FAKE_WHISPERX_LOG": str(self.engine_log),
            "FAKE_WHISPERX_SLOW_SECONDS": "3",
            "RUST_LOG": "debug",
            # The spec's any-token check keeps the API tests short; tests/test_security.py
            # turns it off and uses real tokens.
            "WHISPER_API_ALLOW_ANY_TOKEN": "true",
            # Files go the moment a result is delivered, as the spec says; the grace window for
            # a download cut short has its own tests (test_nothing_lost.py).
            "WHISPER_RESULT_GRACE_SECONDS": "0",
            "PYTHONUNBUFFERED": "1",
            # pass_time() moves the server's clocks through this file (whisperd/clock.py).
            "WHISPERD_CLOCK_OFFSET_FILE": str(root / "clock-offset"),
        })
        if db_url:  # the ledger on PostgreSQL (the cluster's); unset: SQLite at WHISPER_DB_PATH
            base["WHISPER_DB_URL"] = db_url
        base.update(env)
        self.env = base
        self.db_url = self.env.get("WHISPER_DB_URL") or None
        self.log_path = root / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def pass_time(self, seconds: float) -> None:
        """Let `seconds` pass for the server and its command line at once, instead of waiting:
        both its clocks (wall and monotonic) move forward, as time does (clock.py)."""
        path = Path(self.env["WHISPERD_CLOCK_OFFSET_FILE"])
        moved = [float(n) for n in path.read_text().split()] if path.exists() else []
        wall, mono = (moved + [0.0, 0.0])[:2]
        path.write_text(f"{wall + seconds} {mono + seconds}\n")

    # -- life cycle

    def start(self, wait: bool = True) -> "Server":
        self._log_handle = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, *self.wrap, str(REPO / "whisperd.py")], cwd=REPO, env=self.env,
            stdout=self._log_handle, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                requests.options(self.url("/status"), timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.05)
        raise AssertionError(f"server did not start:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log_handle.close()

    def kill9(self) -> None:
        """SIGKILL the server's whole process group (its workers too; engines have their own)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log_handle.close()

    def restart(self) -> "Server":
        self.port = self.port
        return self.start()

    # -- the command line

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """`python whisperd.py ARGS` with this server's configuration."""
        return subprocess.run([sys.executable, str(REPO / "whisperd.py"), *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=60)

    def create_token(self, name: str, *options: str) -> str:
        done = self.cli("token", "create", "--name", name, *options)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    # -- HTTP

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def api(self, method: str, path: str, token: str | None = TOKEN, **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers.setdefault("Authorization", f"Bearer {token}")
        kwargs.setdefault("timeout", 30)
        return requests.request(method, self.url(path), headers=headers, **kwargs)

    def submit(self, audio: Path | None = None, token: str | None = TOKEN, timeout: float = 60,
               **fields) -> requests.Response:
        audio = audio or self.default_audio
        files = {"file": (audio.name, audio.read_bytes(), "application/octet-stream")}
        data = {k: str(v) for k, v in fields.items()}
        return self.api("POST", "/transcription", token=token, files=files, data=data, timeout=timeout)

    def submit_ok(self, audio: Path | None = None, **fields) -> str:
        response = self.submit(audio, **fields)
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    def status(self, job_id: str, token: str | None = TOKEN) -> requests.Response:
        return self.api("GET", f"/transcription/{job_id}", token=token)

    def wait_status(self, job_id: str, wanted=("Completed", "Failed"), timeout: float = 30.0,
                    token: str | None = TOKEN) -> dict:
        deadline = time.monotonic() + timeout
        body = None
        while time.monotonic() < deadline:
            response = self.status(job_id, token)
            body = response.json()
            if response.status_code == 200 and body.get("status") in wanted:
                return body
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} never reached {wanted}: last {body}\n{self.log()[-3000:]}")

    def wait_drained(self, timeout: float, poll: float = 0.2) -> bool:
        """Wait until no job is Queued or Processing; False if the time ran out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.rows("SELECT count(*) AS n FROM jobs WHERE status IN ('Queued', 'Processing')")[0]["n"] == 0:
                return True
            time.sleep(poll)
        return False

    # -- looking inside

    def engine_runs(self) -> list[dict]:
        if not self.engine_log.exists():
            return []
        return [json.loads(line) for line in self.engine_log.read_text().splitlines() if line.strip()]

    def db(self) -> sqlite3.Connection:
        assert not self.db_url, "db() is the SQLite ledger's file; use rows() on either backend"
        conn = sqlite3.connect(self.env["WHISPER_DB_PATH"], timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def rows(self, sql: str, params: tuple = ()) -> list:
        """Rows of a query on whichever ledger this server uses (`?` placeholders on both)."""
        if self.db_url:
            from pg import fetch  # tests/pg.py
            return fetch(self.db_url, sql, params)
        with self.db() as conn:
            return conn.execute(sql, params).fetchall()

    def job_files(self, stored: bool = True) -> list[str]:
        """Everything on disk under the upload and output roots (the empty staging dir, resumable
        uploads and the quarantine of start-up's unknown directories aside), and the job objects
        on the S3 backend unless stored=False."""
        for _ in range(20):  # a directory the server removes while we walk it: look again
            try:
                found = []
                for root in (Path(self.env["WHISPER_TMP_FILES"]), Path(self.env["WHISPER_OUTPUT_DIR"])):
                    if root.exists():
                        found += [str(p) for p in root.rglob("*") if p.name not in (".incoming", ".uploads")
                                  and _job_file(p.relative_to(root).parts)]
                return found + (self.stored_objects() if stored else [])
            except FileNotFoundError:
                time.sleep(0.01)
        raise AssertionError("the job directories kept changing while being listed")

    def stored_objects(self) -> list[str]:
        """On the S3 backend (WHISPER_STORAGE_URL): the job objects under this server's prefix, as
        s3:// names (the job files that matter there; the directories are scratch); [] otherwise."""
        if not self.env.get("WHISPER_STORAGE_URL"):
            return []
        client, bucket, jobs = self._store()
        uploads = jobs[:-len("jobs/")] + "uploads/"  # tus uploads' objects and multipart uploads
        found = []
        for prefix in (jobs, uploads):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                found += [f"s3://{bucket}/{item['Key']}" for item in page.get("Contents", [])]
            for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
                found += [f"multipart upload of s3://{bucket}/{item['Key']}" for item in page.get("Uploads", [])]
        return found

    def upload_bytes(self, upload_id: str) -> bytes | None:
        """The bytes a tus upload of under one S3 part has kept so far (its file; on S3, its tail
        object, named by its ledger row); None when there are none."""
        if not self.env.get("WHISPER_STORAGE_URL"):
            path = self.root / "tmp" / ".uploads" / upload_id
            return path.read_bytes() if path.exists() else None
        rows = self.rows("SELECT stored FROM uploads WHERE id=?", (upload_id,))
        if not rows or not rows[0]["stored"]:
            return None
        record = json.loads(rows[0]["stored"])
        assert record["mpu"] is None, "the upload has whole S3 parts: read it by staging it"
        client, bucket, jobs = self._store()
        key = f"{jobs[:-len('jobs/')]}uploads/{upload_id}/{record['tail']}"
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def _store(self):
        """A client of this server's S3 store, its bucket and the prefix its jobs' objects are under."""
        import boto3
        from botocore.config import Config
        bucket, _, prefix = self.env["WHISPER_STORAGE_URL"][len("s3://"):].partition("/")
        jobs = f"{prefix.strip('/')}/jobs/" if prefix.strip("/") else "jobs/"
        client = boto3.session.Session(aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                                       aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"]).client(
            "s3", endpoint_url=self.env["WHISPER_S3_ENDPOINT"], region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
        return client, bucket, jobs

    def job_audio(self, job_id: str) -> bytes:
        """The canonical audio the server keeps for a job: its object on the S3 backend, the file in
        its upload directory otherwise."""
        if not self.env.get("WHISPER_STORAGE_URL"):
            return (self.root / "tmp" / job_id / "audio.wav").read_bytes()
        client, bucket, jobs = self._store()
        return client.get_object(Bucket=bucket, Key=f"{jobs}{job_id}/upload/audio.wav")["Body"].read()

    def files_gone(self, timeout: float = 10.0) -> bool:
        """Wait until no job file is left (a delivery is recorded, and its files removed, just
        after the client has the last byte); True when none is, False if some stayed."""
        deadline = time.monotonic() + timeout
        while self.job_files():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _job_file(parts: tuple[str, ...]) -> bool:
    """Not the quarantine, not node markers or the cluster's mark, not a node's own staging directory on
    shared storage."""
    if parts[0] in (".nodes", ".quarantine", ".whisperd-cluster") or parts in ((".incoming",), (".uploads",)):
        return False
    return not (parts[0] == ".incoming" and len(parts) == 2 and not _is_uuid(parts[1]))


def _is_uuid(text: str) -> bool:
    import uuid
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def wait_until(predicate, timeout: float = 15.0, what: str = "condition", poll: float = 0.05):
    """Poll until predicate() returns something true (returned); AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def metric(server: "Server", line_start: str) -> float:
    """The value of the /metrics sample whose line starts with line_start (0 when absent)."""
    for line in server.api("GET", "/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def words(text: str) -> list[str]:
    return "".join(ch.lower() if ch.isalnum() or ch.isspace() else " " for ch in text).split()
