"""Retention: jobs finished longer ago than WHISPER_JOB_RETENTION_HOURS lose their files, and
resumable uploads past WHISPER_UPLOAD_EXPIRY_HOURS their bytes.

The cutoff comes from the wall clock, which can jump (an NTP step, a VM resumed, an operator's
`date -s`): a forward jump of 48 h would expire every unfetched result at once. Each pass
compares the wall clock's advance with the monotonic clock's since the previous pass; when the
wall clock ran ahead by more than JUMP_TOLERANCE_SECONDS the pass logs a WARNING and uses the
time the monotonic clock vouches for; the next pass, finding the clocks agreeing again from the
new time, confirms the jump and takes the wall clock's word.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from typing import Callable

from .faults import crash_point
from .clock import monotonic
from .jobfiles import JobFiles
from .jobs import now_iso
from .ledger import Ledger

log = logging.getLogger("whisperd.retention")
JUMP_TOLERANCE_SECONDS = 120.0


class Retention:
    def __init__(self, ledger: Ledger, delete_files: Callable[[str, str], None], retention_hours: float,
                 clock: Callable[[], datetime]) -> None:
        self.ledger = ledger
        self.delete_files = delete_files
        self.retention_hours = retention_hours
        self.clock = clock
        self._previous: tuple[float, float] | None = None  # (wall, monotonic) at the last pass
        self._unconfirmed_jump = False

    def trusted_now(self) -> float:
        """The wall time this pass may use: the wall clock, unless it just jumped forward."""
        wall, mono = self.clock().timestamp(), monotonic()
        previous, self._previous = self._previous, (wall, mono)
        if previous is None:
            return wall
        expected = previous[0] + (mono - previous[1])
        jump = wall - expected
        if jump > JUMP_TOLERANCE_SECONDS:
            self._unconfirmed_jump = True
            log.warning("retention: the wall clock jumped forward by %.0f s since the last pass; this pass "
                        "keeps to the monotonic clock, and the next one confirms the jump before expiring "
                        "by the new time", jump)
            return expected
        if self._unconfirmed_jump:
            self._unconfirmed_jump = False
            log.warning("retention: the wall clock's jump is confirmed by a second pass; expiring by the new time")
        return wall

    async def run_pass(self) -> list[str]:
        now = datetime.fromtimestamp(self.trusted_now(), timezone.utc)
        return await expire_old_jobs(self.ledger, self.delete_files, self.retention_hours, now)


async def expire_old_jobs(ledger: Ledger, delete_files: Callable[[str, str], None], retention_hours: float,
                          now: datetime) -> list[str]:
    """Mark expired in the ledger first (the row stays for audit), then delete the files."""
    cutoff_iso = now_iso(now - timedelta(hours=retention_hours))
    expired: list[str] = []
    while True:
        # In a cluster the database's clock places the cutoff (a node whose clock runs ahead must
        # not expire the others' results: issue 24); a single box's cutoff is its guarded clock.
        batch = await ledger.expire(cutoff_iso, older_than=retention_hours * 3600)
        if batch:
            crash_point("retention-marked")
        for job_id in batch:
            delete_files(job_id, "expired")
        expired += batch
        if not batch:
            break
    if expired:
        log.info("retention: expired %d job(s) finished before %s", len(expired), cutoff_iso)
    return expired


async def expire_uploads(ledger: Ledger, files: JobFiles) -> list[str]:
    """Resumable uploads past their Upload-Expires lose row and bytes; bytes with no row go too.

    The row goes first: a PATCH racing with this pass then fails its offset update and stops.
    """
    expired: list[str] = []
    while True:
        batch = await ledger.expire_uploads(now_iso())
        for upload_id in batch:
            files.remove_resumable(upload_id)
        expired += batch
        if not batch:
            break
    # Bytes whose row is gone (a crash between the two deletions): rows are made before bytes.
    # Listing an object store is a network call: off the IOLoop.
    for upload_id in await asyncio.get_running_loop().run_in_executor(None, files.resumable_ids):
        if await ledger.get_upload(upload_id) is None:
            files.remove_resumable(upload_id)
            expired.append(upload_id)
    if expired:
        log.info("retention: deleted %d expired resumable upload(s)", len(expired))
    return expired
