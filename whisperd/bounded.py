"""Run a helper program (ffprobe, ffmpeg) on an upload with a time limit, bounded output, and a way to stop it.

Blocking: called from an executor thread. Output is read by two threads that keep at most
`max_stdout` bytes and the first and last bytes of stderr, so a file that makes ffmpeg print an error
per frame costs no memory; the program runs in its own session and is killed as a group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from dataclasses import dataclass

STDERR_HEAD = 16 * 1024  # ffprobe names the format it found in its first lines
STDERR_TAIL = 48 * 1024  # ffmpeg's reason for failing is in its last ones


class RunTimeout(Exception):
    """The program ran past its time limit and was killed."""


class RunCanceled(Exception):
    """stop() was called (the client left): the program was killed."""


@dataclass
class Ran:
    returncode: int
    stdout: bytes
    stderr: str


class BoundedRun:
    """One caller's runs; stop() kills the one in progress and refuses the next."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._stopped = False

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._proc is not None:
                _killpg(self._proc.pid)

    def __call__(self, argv: list[str], timeout: float, max_stdout: int, cwd: str | None = None) -> Ran:
        with self._lock:
            if self._stopped:
                raise RunCanceled()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    close_fds=True, start_new_session=True, cwd=cwd)
            self._proc = proc
        out = bytearray()
        err = bytearray()

        def keep_head(stream, buffer: bytearray, limit: int) -> None:
            for chunk in iter(lambda: stream.read(65536), b""):
                if len(buffer) < limit:
                    buffer += chunk[:limit - len(buffer)]

        head = bytearray()

        def keep_ends(stream, tail: bytearray) -> None:
            for chunk in iter(lambda: stream.read(65536), b""):
                if len(head) < STDERR_HEAD:
                    taken = chunk[:STDERR_HEAD - len(head)]
                    head.extend(taken)
                    chunk = chunk[len(taken):]
                tail += chunk
                del tail[:-STDERR_TAIL]

        readers = [threading.Thread(target=keep_head, args=(proc.stdout, out, max_stdout), daemon=True),
                   threading.Thread(target=keep_ends, args=(proc.stderr, err), daemon=True)]
        for reader in readers:
            reader.start()
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _killpg(proc.pid)
            proc.wait()
        finally:
            _killpg(proc.pid)  # anything it left in its group
            for reader in readers:
                reader.join(5)
            proc.stdout.close()
            proc.stderr.close()
            with self._lock:
                self._proc = None
                stopped = self._stopped
        if stopped:
            raise RunCanceled()
        if timed_out:
            raise RunTimeout()
        return Ran(proc.returncode, bytes(out), (bytes(head) + bytes(err)).decode("utf-8", errors="replace"))


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
