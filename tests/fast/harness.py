"""In-process harness (its fixtures are made visible by tests/fast/conftest.py): the Tornado application on a temporary SQLite ledger, the fake engine
(tests/fake_whisperx.py, WHISPER_ENGINE=cli) and a clock the test can move.

A test asks for `http_client` and `base_url` (pytest-tornado) and marks itself `gen_test`;
`@pytest.mark.settings(NAME="value", ...)` changes the configuration of that test's service.
Nothing here starts a whisperd process: a test costs milliseconds plus its engine runs.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import signal
import struct
import subprocess
import uuid
import wave
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from whisperd import config as config_module
from whisperd.app import make_app
from whisperd.clock import utc_now
from whisperd.server import prepare_node, start_service, stop_service
from whisperd.service import Service

REPO = Path(__file__).resolve().parents[2]
FAKE_ENGINE = REPO / "tests" / "fake_whisperx.py"
TOKEN = "fast-test-token"
# Intake runs the real ffprobe and ffmpeg (Debian's), as in production: every upload is probed under
# the format allow-list and decoded into the canonical 16 kHz mono WAV (whisperd/intake.py).
FFPROBE = "/usr/bin/ffprobe"
FFMPEG = "/usr/bin/ffmpeg"


class Clock:
    """utc_now() moved by `advance`; the service reads it where retention decides what is old."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self):
        return utc_now() + self.offset

    def advance(self, **delta: float) -> None:
        self.offset += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pass_time(tmp_path, monkeypatch):
    """pass_time(seconds): whisperd's clocks (clock.py, wall and monotonic alike) move forward, as
    when that much time passes, instead of the test waiting it out. Retention, which reads the
    `clock` fixture, sees no step."""
    path = tmp_path / "clock-offset"
    monkeypatch.setenv("WHISPERD_CLOCK_OFFSET_FILE", str(path))
    moved = [0.0]

    def move(seconds: float) -> None:
        moved[0] += seconds
        path.write_text(f"{moved[0]} {moved[0]}\n")

    return move


def base_environment(root: Path) -> dict[str, str]:
    models = root / "models"
    (models / "tiny.en").mkdir(parents=True, exist_ok=True)
    (models / "tiny.en" / "model.bin").write_bytes(b"fake")
    (models / "small").mkdir(parents=True, exist_ok=True)
    (models / "small" / "model.bin").write_bytes(b"fake")
    return {
        "WHISPER_CMD": str(FAKE_ENGINE),
        "WHISPER_ENGINE": "cli",
        "WHISPER_FFPROBE": FFPROBE,
        "WHISPER_FFMPEG": FFMPEG,
        "WHISPER_MODELS_DIR": str(models),
        "WHISPER_TMP_FILES": str(root / "tmp"),
        "WHISPER_OUTPUT_DIR": str(root / "output"),
        "WHISPER_DB_PATH": str(root / "whisperd.db"),
        "WHISPER_HF_TOKEN_FILE": str(root / "hf_token.txt"),
        "WHISPER_DEFAULT_MODEL": "tiny.en",
        "WHISPER_DEFAULT_LANGUAGE": "en",
        "WHISPER_DEVICE": "cpu",
        "WHISPER_DEFAULT_DIARIZE": "false",
        "WHISPER_OFFLINE": "true",
        "WHISPER_KILL_GRACE_SECONDS": "0.5",
        "WHISPER_API_ALLOW_ANY_TOKEN": "true",
        "WHISPER_MIN_FREE_DISK_MB": "0",
        "WHISPER_RESULT_GRACE_SECONDS": "0",  # the grace window has tests of its own (test_nothing_lost.py)
    }


@pytest.fixture
def fast_env(tmp_path, request, monkeypatch) -> dict[str, str]:
    """The service's configuration: the base above, then the test's `settings` marker."""
    env = base_environment(tmp_path)
    for marker in reversed(list(request.node.iter_markers("settings"))):
        env.update({name: str(value) for name, value in marker.kwargs.items()})
    # The fake engine reads its own variables from the server's environment, as in production.
    monkeypatch.setenv("FAKE_WHISPERX_LOG", str(tmp_path / "engine-runs.jsonl"))
    monkeypatch.setenv("FAKE_WHISPERX_SLOW_SECONDS", env.pop("FAKE_WHISPERX_SLOW_SECONDS", "1"))
    for name in [n for n in env if n.startswith("FAKE_WHISPERX_")]:
        monkeypatch.setenv(name, env.pop(name))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return env


@pytest.fixture
def service(fast_env, tmp_path, io_loop, clock):
    conf = tmp_path / "whisper_api.conf"
    conf.write_text("# everything comes from the test's environment\n")
    config = config_module.load(environ=fast_env, conf_path=str(conf))
    # The very start-up and shutdown serve() runs (server.py), on the test's loop.
    prepare_node(config, count_ends=False)  # the fast tests keep no metrics
    svc = io_loop.run_sync(lambda: start_service(config, offline=True, clock=clock))
    yield svc
    io_loop.run_sync(lambda: stop_service(svc, 0, 0), timeout=30)
    _kill_leftover_engines(tmp_path)


def _kill_leftover_engines(root: Path) -> None:
    log = root / "engine-runs.jsonl"
    if not log.exists():
        return
    for line in log.read_text().splitlines():
        run = json.loads(line)
        for pid in (run.get("pgid"), run.get("grandchild_pid")):
            if pid:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


@pytest.fixture
def app(service):
    return make_app(service)


@pytest.fixture
def base_url(http_port) -> str:
    return f"http://127.0.0.1:{http_port}"  # "localhost" may try ::1 first, where nobody listens


# -- requests


def wav_bytes(seconds: float = 0.1, rate: int = 16000, freq: float = 440.0) -> bytes:
    """A real mono 16-bit tone (as tests/harness.py make_wav): ffprobe and ffmpeg accept it, and at
    16 kHz ffmpeg's canonical audio.wav holds the very same bytes."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * freq * i / rate)))
                                 for i in range(int(seconds * rate))))
    return buffer.getvalue()


WAV_SECONDS = 0.1


WAV = wav_bytes(WAV_SECONDS)


def multipart(fields: dict[str, Any] | None = None, file: bytes | None = WAV,
              filename: str = "tone.wav", file_field: str = "file") -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (fields or {}).items():
        for item in value if isinstance(value, list) else [value]:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{item}\r\n'.encode())
    if file is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + file + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Api:
    """Requests to the in-process server; never raises on an HTTP error status."""

    def __init__(self, client: AsyncHTTPClient, base_url: str, service: Service) -> None:
        self.client = client
        self.base_url = base_url
        self.service = service

    async def call(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                   token: str | None = TOKEN, timeout: float = 30) -> HTTPResponse:
        headers = dict(headers or {})
        if token is not None:
            headers.setdefault("Authorization", f"Bearer {token}")
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = b""
        return await self.client.fetch(self.base_url + path, method=method, body=body, headers=headers,
                                       raise_error=False, request_timeout=timeout, allow_nonstandard_methods=True)

    async def submit(self, fields: dict[str, Any] | None = None, file: bytes | None = WAV,
                     path: str = "/transcription", token: str | None = TOKEN, **kwargs) -> HTTPResponse:
        body, content_type = multipart(fields, file, **kwargs)
        return await self.call("POST", path, body, {"Content-Type": content_type}, token=token)

    async def submit_ok(self, fields: dict[str, Any] | None = None, **kwargs) -> str:
        response = await self.submit(fields, **kwargs)
        assert response.code == 202, response.body
        return json.loads(response.body)["job_id"]

    async def status(self, job_id: str) -> tuple[int, dict]:
        response = await self.call("GET", f"/transcription/{job_id}")
        return response.code, json.loads(response.body)

    async def wait_status(self, job_id: str, wanted=("Completed", "Failed"), timeout: float = 20.0) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        body: dict = {}
        while loop.time() < deadline:
            job = await self.service.ledger.get(job_id)
            if job is not None and job.status in wanted:
                code, body = await self.status(job_id)
                return body if code == 200 else {"status": job.status, "http": code, **body}
            await asyncio.sleep(0.02)
        raise AssertionError(f"job {job_id} never reached {wanted}: last {await self.service.ledger.get(job_id)}")


async def wait_until(predicate, timeout: float = 15.0, what: str = "condition", poll: float = 0.01):
    """tests/harness.py's wait_until on the test's loop: `predicate` (a function, or a coroutine
    function) is asked until it returns something true, which is returned; AssertionError after
    `timeout`. Never a bare sleep: the wait ends when the thing waited for happens."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(poll)


@pytest.fixture
def api(http_client, base_url, service) -> Api:
    return Api(http_client, base_url, service)


def body_of(response: HTTPResponse) -> Any:
    return json.loads(response.body)


def engine_runs(root: Path) -> list[dict]:
    log = root / "engine-runs.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def job_files(service: Service) -> list[str]:
    found = []
    for root in (service.files.tmp_root, service.files.output_root):
        found += [str(p) for p in root.rglob("*") if p.name not in (".incoming", ".uploads")
                  and ".quarantine" not in p.relative_to(root).parts]
    return found


async def no_job_files(service: Service, timeout: float = 5.0) -> bool:
    """True once no job file is left: a delivery is recorded, and its files removed, just after
    the client has the last byte, so a test that has its answer may look a moment too early."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while job_files(service):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def delivered(service: Service, job_id: str, timeout: float = 5.0) -> bool:
    """True once the job's row records its delivery: like its files' removal (no_job_files), the
    delivery is recorded just after the client has the last byte of the result."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        job = await service.ledger.get(job_id)
        if job is not None and job.delivered_at:
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)


async def run_retention_after_a_jump(service: Service) -> None:
    """Retention once the test moved the clock forward by more than retention.JUMP_TOLERANCE_SECONDS:
    the first pass takes the jump for a wall-clock step and keeps to the monotonic clock; the
    second confirms the jump and expires by the new time (whisperd/retention.py)."""
    await service.run_retention()
    await service.run_retention()


def ffmpeg_made(path: Path, *args: str) -> bytes:
    """A file the real ffmpeg writes (lavfi sources, e.g. a video without sound), as bytes to upload."""
    subprocess.run([FFMPEG, "-nostdin", "-hide_banner", "-v", "error", *args, "-y", str(path)], check=True, timeout=30)
    return path.read_bytes()
