"""The spec's engine: the WhisperX command line, one process per job, in its own session, stopped as a group."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Any

from tornado.iostream import StreamClosedError
from tornado.process import Subprocess

from ..config import Config
from ..languages import AUTO
from ..models import local_model_dir
from ..tasks import spawn
from .base import (EngineOptions, EngineResult, ProgressCallback, StartedCallback, diarization_request, engine_env,
                   kill_group)

log = logging.getLogger("whisperd.engine")

_PROGRESS = re.compile(r"Progress:\s*([0-9]+(?:\.[0-9]+)?)%")
# WhisperX overwrites "language" in its JSON with the alignment language ("en" when none was
# given), so the language it detected is only known from this log line.
_DETECTED = re.compile(r"Detected language: ([a-z]{2,3}) \(")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def build_argv(config: Config, opts: EngineOptions) -> list[str]:
    """The spec's argument list (plus the flags the policy needs); never a secret on it."""
    local = local_model_dir(config.WHISPER_MODELS_DIR, opts.model)
    argv = [
        config.WHISPER_CMD,
        str(opts.audio),
        "--model", str(local) if local else opts.model,
        "--model_dir", config.WHISPER_MODELS_DIR,
    ]
    if opts.language != AUTO:
        argv += ["--language", opts.language]
    if opts.task != "transcribe":
        argv += ["--task", opts.task]
    argv += [
        "--output_dir", str(opts.output_dir),
        "--output_format", "json",  # the canonical result; every format is rendered from it
        "--device", opts.device,
        "--device_index", opts.device_index,
    ]
    compute_type = config.WHISPER_CPU_COMPUTE_TYPE if opts.device == "cpu" else config.WHISPER_CUDA_COMPUTE_TYPE
    if compute_type:
        argv += ["--compute_type", compute_type]
    if not opts.align:
        argv.append("--no_align")
    if opts.diarize and opts.diarizer == "pyannote":
        argv.append("--diarize")  # senko runs after, as a step of its own (diarize_argv)
        # The CLI has no fixed count: num_speakers is both bounds.
        low = opts.speakers.get("min_speakers") or opts.speakers.get("num_speakers")
        high = opts.speakers.get("max_speakers") or opts.speakers.get("num_speakers")
        if low:
            argv += ["--min_speakers", str(int(low))]
        if high:
            argv += ["--max_speakers", str(int(high))]
    if opts.prompt:
        argv += ["--initial_prompt", opts.prompt]
    if opts.temperature is not None:
        argv += ["--temperature", f"{opts.temperature:g}"]
    if opts.threads:
        argv += ["--threads", str(opts.threads)]
    # whisperx.sh's entry (whisperd/engine_cli.py) serves `silero` from faster-whisper's wheel, offline.
    argv += ["--vad_method", config.WHISPER_VAD]
    batch_size = opts.batch_size or config.WHISPER_BATCH_SIZE
    if batch_size != 8:  # WhisperX's own default otherwise: the spec's command line unchanged
        argv += ["--batch_size", str(batch_size)]
    argv += ["--print_progress", "True"]
    return argv


def build_env(opts: EngineOptions, environ: dict[str, str] | None = None) -> dict[str, str]:
    # WhisperX and huggingface_hub read the token from here (never from the command line).
    extra = {"HF_TOKEN": opts.hf_token} if opts.diarize and opts.diarizer == "pyannote" and opts.hf_token else None
    return engine_env(opts.offline, extra, environ)


def diarize_argv(config: Config, result_path: Path) -> list[str]:
    """The CLI path's speaker step (engine_diarize.py in the engine venv), run after WhisperX wrote
    its JSON: it adds speakers to that file. The path names the job, so a crash's clean-up can
    recognise the process; the options go on stdin."""
    return [config.WHISPER_CMD, "--whisperd-diarize", str(result_path)]


def diarize_input(opts: EngineOptions, result_path: Path) -> bytes:
    request = {"result": str(result_path), "audio": str(opts.audio), "device": opts.device,
               **diarization_request(opts)}
    return json.dumps(request).encode("utf-8")


class EngineProcess:
    """One running engine: its own session, its output streamed, stoppable as a group."""

    def __init__(self, argv: list[str], env: dict[str, str], grace_seconds: float, stdin: bytes | None = None) -> None:
        self.argv = argv
        self.stdin_data = stdin
        self.env = env
        self.grace_seconds = grace_seconds
        self.proc: Subprocess | None = None
        self.killed_because: str | None = None
        self._stderr: deque[str] = deque(maxlen=40)
        self.detected_language: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> int:
        self.proc = Subprocess(
            self.argv,
            stdin=subprocess.DEVNULL if self.stdin_data is None else Subprocess.STREAM,
            stdout=Subprocess.STREAM,
            stderr=Subprocess.STREAM,
            env=self.env,
            start_new_session=True,  # own process group: a stop reaches its grandchildren too
            close_fds=True,
        )
        # One exit future for the process's life: Tornado keeps a single exit callback, so a
        # second wait_for_exit() would silently steal the first one's notification.
        self._exit = self.proc.wait_for_exit(raise_error=False)
        if self.stdin_data is not None:
            spawn(self._feed(self.stdin_data), "engine stdin")
        return self.proc.pid

    async def _feed(self, data: bytes) -> None:
        try:
            await self.proc.stdin.write(data)
            self.proc.stdin.close()
        except StreamClosedError:
            pass  # it ended before reading: its exit status says why

    async def run(self, on_progress: ProgressCallback | None = None, timeout: float | None = None) -> EngineResult:
        """Wait for the engine to end, reading its output; enforce the time limit if any."""
        assert self.proc is not None
        readers = [
            asyncio.ensure_future(self._read_lines(self.proc.stdout, self._on_stdout(on_progress))),
            asyncio.ensure_future(self._read_lines(self.proc.stderr, self._stderr.append)),
        ]
        exit_future = self._exit
        try:
            if timeout:
                await asyncio.wait_for(asyncio.shield(exit_future), timeout)
            else:
                await exit_future
        except asyncio.TimeoutError:
            await self.stop("timeout")
        status = await exit_future
        # Whatever the engine left behind in its group goes now, even after a clean exit: a
        # grandchild holding our pipes would otherwise keep the readers waiting forever.
        self._signal_group(signal.SIGKILL)
        await asyncio.wait(readers, timeout=5)
        for reader in readers:
            reader.cancel()
        returncode, sig = _decode_status(self.proc, status)
        return EngineResult(returncode, sig, list(self._stderr), self.killed_because, self.detected_language)

    def _on_stdout(self, on_progress: ProgressCallback | None):
        def handle(line: str) -> None:
            detected = _DETECTED.search(line)
            if detected:
                self.detected_language = detected.group(1)
            match = _PROGRESS.search(line)
            if match and on_progress is not None:
                outcome = on_progress(min(100.0, float(match.group(1))), "transcribing")
                if asyncio.iscoroutine(outcome):
                    spawn(outcome, "progress callback")

        return handle

    @staticmethod
    async def _read_lines(stream, handle) -> None:
        pending = b""
        try:
            while True:
                chunk = await stream.read_bytes(65536, partial=True)
                pending += chunk
                *lines, pending = re.split(rb"\r\n|\r|\n", pending)
                for raw in lines:
                    handle(_ANSI.sub("", raw.decode("utf-8", errors="replace")))
                if len(pending) > 65536:
                    pending = pending[-4096:]
        except StreamClosedError:
            if pending:
                handle(_ANSI.sub("", pending.decode("utf-8", errors="replace")))

    async def stop(self, because: str) -> None:
        """TERM the whole group, then KILL it after the grace period."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.killed_because = self.killed_because or because
        self._signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self._exit), self.grace_seconds)
        except asyncio.TimeoutError:
            log.warning("engine pid %s ignored SIGTERM for %.1f s: killing its group", self.pid, self.grace_seconds)
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        if self.proc is not None:
            kill_group(self.proc.pid, sig)


def _decode_status(proc: Subprocess, status: int | None) -> tuple[int | None, int | None]:
    # Subprocess reports a signal death as a negative return code.
    if status is not None and status < 0:
        return None, -status
    return status, None


def kill_orphan_group(pid: int, job_id: str) -> bool:
    """After a crash, stop an engine a dead server left running, if it is still that engine."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if job_id.encode() not in cmdline:
        return False  # the pid was reused by something else
    return kill_group(pid, signal.SIGKILL)


class CliEngine:
    """WHISPER_ENGINE=cli: WHISPER_CMD per job with the spec's arguments."""

    mode = "cli"
    times_words = False

    def __init__(self, config: Config) -> None:
        self.config = config
        self._running: dict[str, EngineProcess] = {}

    def start(self) -> None:
        return None  # nothing to warm up

    async def run(self, job_id: str, opts: EngineOptions, on_progress: ProgressCallback | None = None,
                  on_started: StartedCallback | None = None, timeout: float | None = None) -> EngineResult:
        started_at = time.monotonic()
        engine = EngineProcess(build_argv(self.config, opts), build_env(opts), self.config.WHISPER_KILL_GRACE_SECONDS)
        result = await self._run_process(job_id, engine, on_progress, on_started, timeout)
        if result.ok and opts.diarize and opts.diarizer != "pyannote":
            result = await self._add_speakers(job_id, opts, result, on_progress, on_started,
                                              None if timeout is None else max(1.0, timeout - (time.monotonic() - started_at)))
        return result

    async def _add_speakers(self, job_id: str, opts: EngineOptions, transcribed: EngineResult,
                            on_progress: ProgressCallback | None, on_started: StartedCallback | None,
                            timeout: float | None) -> EngineResult:
        """The speaker step after a good transcript; its failure leaves the transcript and a warning."""
        found = sorted(opts.output_dir.glob("*.json"))
        if not found:
            return transcribed  # no result to add to: the runner reports that
        if on_progress is not None:
            outcome = on_progress(100.0, "diarizing")
            if asyncio.iscoroutine(outcome):
                await outcome
        step = EngineProcess(diarize_argv(self.config, found[0]), engine_env(opts.offline, None),
                             self.config.WHISPER_KILL_GRACE_SECONDS, stdin=diarize_input(opts, found[0]))
        result = await self._run_process(job_id, step, None, on_started, timeout)
        if result.killed_because is not None:
            return result  # canceled, timed out or shut down: the job's own outcome
        if not result.ok:
            transcribed.warnings.append(
                f"speaker diarization failed ({result.reason()}); the transcript has no speakers")
        return transcribed

    async def _run_process(self, job_id: str, engine: EngineProcess, on_progress: ProgressCallback | None,
                           on_started: StartedCallback | None, timeout: float | None) -> EngineResult:
        try:
            pid = engine.start()
        except OSError as exc:
            log.error("job %s: cannot start WHISPER_CMD=%s: %s", job_id, self.config.WHISPER_CMD, exc)
            return EngineResult(127, stderr_tail=[f"the transcription engine could not be started ({exc.strerror})"])
        self._running[job_id] = engine
        log.info("job %s: engine started, pid %s", job_id, pid)
        try:
            if on_started is not None:
                outcome = on_started(pid)
                if asyncio.iscoroutine(outcome):
                    await outcome
            result = await engine.run(on_progress, timeout)
        finally:
            self._running.pop(job_id, None)
        log.info("job %s: engine ended: code %s signal %s %s", job_id, result.returncode, result.signal,
                 result.killed_because or "")
        return result

    async def stop(self, job_id: str, because: str) -> None:
        engine = self._running.get(job_id)
        if engine is not None:
            await engine.stop(because)

    def status(self) -> dict[str, Any]:
        return {"mode": "cli", "state": "ready", "loaded_models": []}

    def healthy(self) -> tuple[bool, str | None]:
        return True, None

    async def close(self) -> None:
        for engine in list(self._running.values()):
            await engine.stop("shutdown")
