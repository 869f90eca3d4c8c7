"""Runs the WhisperX command line for one job, in its own session, and stops it as a group."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from tornado.iostream import StreamClosedError
from tornado.process import Subprocess

from .config import Config
from .languages import AUTO
from .models import local_model_dir
from .tasks import spawn

log = logging.getLogger("whisperd.engine")

# The child gets these from our environment and nothing else: no API tokens, no HF_TOKEN of ours.
PASSED_ENV = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
    "XDG_DATA_HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "TORCH_HOME",
    "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "WHISPERX_VENV",
)
PASSED_PREFIXES = ("WHISPERX_", "FAKE_WHISPERX_")
_PROGRESS = re.compile(r"Progress:\s*([0-9]+(?:\.[0-9]+)?)%")
# WhisperX overwrites "language" in its JSON with the alignment language ("en" when none was
# given), so the language it detected is only known from this log line.
_DETECTED = re.compile(r"Detected language: ([a-z]{2,3}) \(")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_NOISE = re.compile(r"^\s*$|^\s*\d+%\|.*\||^\s*(Lightning|Model was trained with|Bad things might happen)")


@dataclass
class EngineOptions:
    """What one engine run is asked to do (decided by the runner from the job and the policy)."""

    audio: Path
    output_dir: Path
    model: str
    language: str
    device: str
    device_index: str
    prompt: str
    align: bool
    diarize: bool
    hf_token: str | None
    offline: bool
    threads: int | None = None
    task: str = "transcribe"  # or "translate": English text from any language


@dataclass
class EngineResult:
    returncode: int | None
    signal: int | None = None
    stderr_tail: list[str] = field(default_factory=list)
    killed_because: str | None = None  # "canceled", "timeout", "shutdown"
    detected_language: str | None = None
    retry: bool = False  # the engine worker died under the job: run it again (poison rules apply)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed_because is None

    def reason(self) -> str:
        """A short cause a user can read: the engine's last meaningful line, not a traceback."""
        line = last_meaningful_line(self.stderr_tail)
        if line:
            return line
        if self.signal is not None:
            name = signal.Signals(self.signal).name if self.signal in signal.valid_signals() else str(self.signal)
            return f"the engine was killed by signal {name}"
        return f"the engine exited with status {self.returncode} and printed no error"


def last_meaningful_line(lines) -> str | None:
    """The last line of engine output that says something (not a progress bar or a known warning)."""
    for line in reversed(list(lines)):
        if not _NOISE.search(line):
            return line.strip()[:500]
    return None


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
    if opts.diarize:
        argv.append("--diarize")
    if opts.prompt:
        argv += ["--initial_prompt", opts.prompt]
    if opts.threads:
        argv += ["--threads", str(opts.threads)]
    argv += ["--print_progress", "True"]
    return argv


def build_env(opts: EngineOptions, environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in environ.items() if k in PASSED_ENV or k.startswith(PASSED_PREFIXES)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["PYTHONUNBUFFERED"] = "1"  # progress lines must arrive as they happen
    if opts.offline:
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
    if opts.diarize and opts.hf_token:
        env["HF_TOKEN"] = opts.hf_token  # WhisperX and huggingface_hub read it from here
    return env


ProgressCallback = Callable[[float, str], Awaitable[None] | None]  # (percent, stage)


class EngineProcess:
    """One running engine: its own session, its output streamed, stoppable as a group."""

    def __init__(self, argv: list[str], env: dict[str, str], grace_seconds: float) -> None:
        self.argv = argv
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
            stdin=subprocess.DEVNULL,
            stdout=Subprocess.STREAM,
            stderr=Subprocess.STREAM,
            env=self.env,
            start_new_session=True,  # own process group: a stop reaches its grandchildren too
            close_fds=True,
        )
        # One exit future for the process's life: Tornado keeps a single exit callback, so a
        # second wait_for_exit() would silently steal the first one's notification.
        self._exit = self.proc.wait_for_exit(raise_error=False)
        return self.proc.pid

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
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return


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
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True
