"""Whether this node's job storage takes writes: tripped by a storage error, cleared by a probe write.

A read-only or full job directory is the box's fault, never the job's: while it lasts the node
claims no job (scheduler.may_claim), running jobs that hit it go back to the queue without
spending an attempt (runner.py), uploads are refused with 503 or 507 and Retry-After, and
/health says why. A probe write (a small file, written and synced, in both roots) every
PROBE_SECONDS decides when it is over.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from pathlib import Path
from typing import Callable

from . import metrics
from .errors import Kind, ServiceError

log = logging.getLogger("whisperd.storage")
PROBE_SECONDS = 1.0
PROBE_BYTES = 4096  # an empty file needs no block: a full disk would still take it
PROBE_PREFIX = ".probe-"
FULL = (errno.ENOSPC, errno.EDQUOT)
STORAGE_ERRNOS = {errno.EROFS, errno.EIO, errno.ESTALE, errno.EACCES, *FULL}


def is_storage_error(exc: BaseException) -> bool:
    """An OSError that says the storage (not the job, not the client) cannot be written."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def _kind(exc: OSError) -> str:
    if exc.errno in FULL:
        return "full"
    return "read-only" if exc.errno == errno.EROFS else "error"


class StorageWatch:
    def __init__(self, roots: list[Path], name: str, on_recovered: Callable[[], None] = lambda: None,
                 probe_store: Callable[[], OSError | None] = lambda: None) -> None:
        self.roots = list(dict.fromkeys(roots))
        self.name = name  # node and pid: several processes, several nodes may probe one directory
        self.on_recovered = on_recovered
        self.probe_store = probe_store  # the object store's own probe write (store/s3.py); None: fine
        self.kind: str | None = None  # None: healthy
        self.reason: str | None = None
        self.since = 0.0
        self._probing: asyncio.Task | None = None
        self._closed = False

    @property
    def healthy(self) -> bool:
        return self.kind is None

    def trip(self, exc: OSError) -> None:
        """The storage refused a write: stop taking work until a probe write succeeds."""
        if self.kind is None:
            self.kind, self.since = _kind(exc), time.monotonic()
            self.reason = f"job storage {self.kind}: {exc.strerror or exc}"
            log.error("%s; claiming no job and refusing uploads until a probe write succeeds (every %g s)",
                      self.reason, PROBE_SECONDS)
            metrics.storage_state(self.kind)
        if (self._probing is None or self._probing.done()) and not self._closed:
            self._probing = asyncio.ensure_future(self._probe_until_writable())

    def problem(self) -> str | None:
        """For /health: None when the storage works."""
        if self.kind is None:
            return None
        return f"{self.reason} (for {time.monotonic() - self.since:.0f} s)"

    def refusal(self) -> ServiceError:
        """What a submission gets while the storage fails."""
        if self.kind == "full":
            return ServiceError(Kind.STORAGE_FULL, "the server's job storage is full; try again later", 60)
        return ServiceError(Kind.UNAVAILABLE, "the server's job storage is not writable right now; try again in a moment", 30)

    def refusal_for(self, exc: BaseException) -> ServiceError | None:
        """A storage error met while serving a request: trip, and the answer to give; None otherwise."""
        if not is_storage_error(exc):
            return None
        self.trip(exc)  # type: ignore[arg-type]
        return self.refusal()

    async def check(self) -> bool:
        """Probe now (after an engine failure that may have been the disk's); trips on failure."""
        failure = await asyncio.get_running_loop().run_in_executor(None, self.probe_once)
        if failure is not None:
            self.trip(failure)
            return False
        return True

    def probe_once(self) -> OSError | None:
        for root in self.roots:
            path = root / f"{PROBE_PREFIX}{self.name}"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.write(fd, b"\0" * PROBE_BYTES)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.unlink(path)
            except OSError as exc:
                try:
                    os.unlink(path)
                except OSError:
                    pass
                return exc
        return self.probe_store()

    async def _probe_until_writable(self) -> None:
        loop = asyncio.get_running_loop()
        while self.kind is not None and not self._closed:
            await asyncio.sleep(PROBE_SECONDS)
            failure = await loop.run_in_executor(None, self.probe_once)
            if failure is None:
                log.warning("job storage writable again after %.0f s (%s): claiming jobs and taking uploads again",
                            time.monotonic() - self.since, self.reason)
                self.kind = self.reason = None
                metrics.storage_state(None)
                self.on_recovered()
            elif _kind(failure) != self.kind:
                self.kind, self.reason = _kind(failure), f"job storage {_kind(failure)}: {failure.strerror}"

    async def close(self) -> None:
        self._closed = True
        if self._probing is not None:
            self._probing.cancel()
            await asyncio.gather(self._probing, return_exceptions=True)
