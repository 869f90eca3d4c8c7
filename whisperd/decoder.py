"""The warm decoder: long-lived PyAV processes that probe and decode uploads without a process start each.

Every upload that is not already canonical used to pay two process starts (ffprobe, then ffmpeg:
about 110 ms each here, most of it loading FFmpeg's 200-odd shared libraries). A DecoderPool keeps
up to one process per core (decoder_worker.py, run with this interpreter) that loaded FFmpeg once
through PyAV, and lends one to an intake for its probe and its decode:

- A crash, a hang or a memory explosion happens in that process, never in the HTTP process: a
  request that runs past its time limit gets the process killed (DecoderTimeout), one that dies
  or runs out of its memory limit (RLIMIT_AS, WHISPER_DECODER_MEMORY_MB) is DecoderCrashed; the
  intake refuses the upload in words and the next lease starts a fresh process.
- A process that ever went above half its memory limit is retired after its answer.
- stop() from another thread (the client left) kills the process in use: DecoderCanceled.

Blocking calls, made from intake's executor threads. Processes start on first use, after any fork.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("whisperd.decoder")

WORKER = Path(__file__).resolve().parent / "decoder_worker.py"
HELLO_SECONDS = 10.0
MAX_ANSWER = 1024 * 1024
POLL_SECONDS = 0.1  # how soon a stop() from another thread is noticed


class DecoderError(Exception):
    """Base of the pool's failures; the message is for logs."""


class DecoderTimeout(DecoderError):
    """The process did not answer within the time limit and was killed."""


class DecoderCrashed(DecoderError):
    """The process died or ran out of memory under this file."""


class DecoderCanceled(DecoderError):
    """stop() was called (the client left): the process was killed."""


class DecoderUnavailable(DecoderError):
    """No decoder process can be started (PyAV missing or broken): use ffprobe/ffmpeg."""


def pyav_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("av") is not None


class DecoderProcess:
    """One warm decoder: a child in its own session speaking JSON lines."""

    def __init__(self, memory_bytes: int) -> None:
        self.memory_bytes = memory_bytes
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
        env["WHISPERD_DECODER_MEMORY_BYTES"] = str(memory_bytes)
        self.proc = subprocess.Popen([sys.executable, "-I", str(WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                     start_new_session=True, close_fds=True)
        self._buffer = b""
        self.retire = False
        hello = self._read(time.monotonic() + HELLO_SECONDS, None)
        if not hello.get("ok"):
            self.kill()
            raise DecoderUnavailable(str(hello.get("why") or "the decoder did not start"))

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def ask(self, request: dict, timeout: float, canceled: threading.Event | None) -> dict:
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            self.kill()
            raise DecoderCrashed("the decoder process was gone") from None
        answer = self._read(time.monotonic() + timeout, canceled)
        if answer.get("memory"):
            self.kill()
            raise DecoderCrashed("the decoder ran out of memory")
        if int(answer.get("rss_kib") or 0) * 1024 > self.memory_bytes // 2:
            self.retire = True  # its heap stays large: a fresh process takes the next file
        return answer

    def _read(self, deadline: float, canceled: threading.Event | None) -> dict:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            if canceled is not None and canceled.is_set():
                self.kill()
                raise DecoderCanceled("stopped")
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise DecoderTimeout("no answer in time")
            ready, _, _ = select.select([fd], [], [], min(left, POLL_SECONDS))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                status = self.proc.wait()
                self.kill()
                why = f"signal {signal.Signals(-status).name}" if status < 0 else f"exit status {status}"
                raise DecoderCrashed(f"the decoder process died ({why})")
            self._buffer += chunk
            if len(self._buffer) > MAX_ANSWER:
                self.kill()
                raise DecoderCrashed("the decoder wrote an answer too long")
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            self.kill()
            raise DecoderCrashed("the decoder wrote something that is not JSON") from None

    def kill(self) -> None:
        self.retire = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class DecoderPool:
    """Up to `size` warm decoder processes of one HTTP process, lent one per intake."""

    def __init__(self, size: int, memory_bytes: int) -> None:
        self.size = max(1, size)
        self.memory_bytes = memory_bytes
        self._idle: list[DecoderProcess] = []
        self._count = 0
        self._cond = threading.Condition()
        self.started = 0  # processes started so far (a restart counts), for tests and logs

    @contextmanager
    def lease(self):
        """A live decoder process for one intake; given back (or replaced) afterwards."""
        with self._cond:
            while not self._idle and self._count >= self.size:
                self._cond.wait()
            process = self._idle.pop() if self._idle else None
            if process is None:
                self._count += 1
        try:
            if process is None or not process.alive:
                process = self._start()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise
        try:
            yield process
        finally:
            with self._cond:
                if process.retire or not process.alive:
                    process.kill()
                    self._count -= 1
                else:
                    self._idle.append(process)
                self._cond.notify()

    def _start(self) -> DecoderProcess:
        try:
            process = DecoderProcess(self.memory_bytes)
        except DecoderError:
            raise
        except OSError as exc:
            raise DecoderUnavailable(f"the decoder could not be started ({exc.strerror})") from None
        self.started += 1
        log.debug("warm decoder started, pid %s", process.proc.pid)
        return process

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for process in idle:
            process.kill()


_POOLS: dict[tuple[int, int], DecoderPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(size: int, memory_bytes: int) -> DecoderPool:
    """This process's pool for these limits (made on first use: after any fork)."""
    key = (size, memory_bytes)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = DecoderPool(size, memory_bytes)
        return pool


def close_pools() -> None:
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()
