"""Retention: jobs finished longer ago than WHISPER_JOB_RETENTION_HOURS lose their files.

The cutoff comes from the wall clock, which can jump (an NTP step, a VM resumed, an operator's
`date -s`): a forward jump of 48 h would expire every unfetched result at once. Each pass
compares the wall clock's advance with the monotonic clock's since the previous pass; when the
wall clock ran ahead by more than JUMP_TOLERANCE_SECONDS the pass logs a WARNING and uses the
time the monotonic clock vouches for; the next pass, finding the clocks agreeing again from the
new time, confirms the jump and takes the wall clock's word.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone

from .clock import wall_time
from .faults import crash_point
from .jobfiles import JobFiles
from .ledger import Ledger

log = logging.getLogger("whisperd.retention")
JUMP_TOLERANCE_SECONDS = 120.0


class Retention:
    def __init__(self, ledger: Ledger, files: JobFiles, retention_hours: float, interval_seconds: float) -> None:
        self.ledger = ledger
        self.files = files
        self.retention_hours = retention_hours
        self.interval_seconds = interval_seconds
        self._previous: tuple[float, float] | None = None  # (wall, monotonic) at the last pass
        self._unconfirmed_jump = False

    def trusted_now(self) -> float:
        """The wall time this pass may use: the wall clock, unless it just jumped forward."""
        wall, mono = wall_time(), time.monotonic()
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
        return await expire_old_jobs(self.ledger, self.files, self.retention_hours, now)


async def expire_old_jobs(ledger: Ledger, files: JobFiles, retention_hours: float,
                          now: datetime | None = None) -> list[str]:
    """Mark expired in the ledger first (the row stays for audit), then delete the files."""
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(hours=retention_hours)
    cutoff_iso = cutoff.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    expired: list[str] = []
    while True:
        batch = await ledger.expire(cutoff_iso)
        if batch:
            crash_point("retention-marked")
        for job_id in batch:
            files.remove_all(job_id)
        expired += batch
        if not batch:
            break
    if expired:
        log.info("retention: expired %d job(s) finished before %s", len(expired), cutoff_iso)
    return expired
