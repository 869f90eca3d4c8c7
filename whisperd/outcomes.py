"""Recording how a job ended: retried with back-off until the ledger takes it, never given up.

A job's end (complete, fail, cancel, requeue) is the one write that must not be lost: the
engine's work is done and its files are still on disk. While the ledger is held by someone
else or its disk is full, the write is retried with a growing pause; the caller deletes files
and frees the job's slot only after it returns, that is after the row changed. While any
outcome waits, /health fails (pending()). Only a stopping server abandons a pending outcome:
the row then stays Processing and the next start requeues the job, its files intact.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from .ledger import LedgerUnavailable

log = logging.getLogger("whisperd.outcomes")
FIRST_PAUSE_SECONDS = 0.25
LONGEST_PAUSE_SECONDS = 5.0


class OutcomeAbandoned(Exception):
    """The server is stopping before the ledger would take the outcome; the next start redoes it."""


class OutcomeRecorder:
    def __init__(self) -> None:
        self._waiting: dict[str, tuple[str, float, str]] = {}  # job id -> (what, since, last error)
        self._abandon = asyncio.Event()

    async def record(self, job_id: str, what: str, write: Callable[[], Awaitable[bool]]) -> bool:
        """Run `write` until it commits; returns its answer (False: the row's guard did not match)."""
        pause = FIRST_PAUSE_SECONDS
        attempt = 0
        while True:
            attempt += 1
            try:
                changed = await write()
            except Exception as exc:  # busy, disk full, I/O error, a shared database away: may work later
                if isinstance(exc, LedgerUnavailable) and not exc.transient:
                    raise  # closed: only at shutdown, after every runner has returned
                if self._abandon.is_set():
                    self._waiting.pop(job_id, None)
                    raise OutcomeAbandoned(f"job {job_id}: {what} not recorded: {exc}") from exc
                since = self._waiting.get(job_id, (what, time.monotonic(), ""))[1]
                self._waiting[job_id] = (what, since, f"{exc.__class__.__name__}: {exc}")
                level = logging.ERROR if attempt == 1 or attempt % 20 == 0 else logging.DEBUG
                log.log(level, "job %s: could not record %s (attempt %d, retrying in %.2f s): %s",
                        job_id, what, attempt, pause, exc)
                try:
                    await asyncio.wait_for(self._abandon.wait(), pause)
                except asyncio.TimeoutError:
                    pass
                pause = min(pause * 2, LONGEST_PAUSE_SECONDS)
                continue
            if job_id in self._waiting:
                waited = time.monotonic() - self._waiting.pop(job_id)[1]
                log.warning("job %s: %s recorded after %d attempts (%.1f s)", job_id, what, attempt, waited)
            return changed

    def pending(self) -> list[str]:
        """One line per outcome the ledger has not taken yet (for /health)."""
        now = time.monotonic()
        return [f"job {job_id}: {what} not recorded for {now - since:.0f} s ({error})"[:300]
                for job_id, (what, since, error) in self._waiting.items()]

    def abandon(self) -> None:
        """Shutdown: stop retrying; what is not recorded is redone by the next start."""
        self._abandon.set()
