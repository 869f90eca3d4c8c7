"""Retention: jobs finished longer ago than WHISPER_JOB_RETENTION_HOURS lose their files."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from .faults import crash_point
from .jobfiles import JobFiles
from .ledger import Ledger

log = logging.getLogger("whisperd.retention")


async def expire_old_jobs(ledger: Ledger, files: JobFiles, retention_hours: float) -> list[str]:
    """Mark expired in the ledger first (the row stays for audit), then delete the files."""
    cutoff = datetime.now(timezone.utc) - timedelta(hours=retention_hours)
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
