"""Retention: jobs finished longer ago than WHISPER_JOB_RETENTION_HOURS lose their files."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Callable

from .faults import crash_point
from .jobs import now_iso
from .ledger import Ledger

log = logging.getLogger("whisperd.retention")


async def expire_old_jobs(ledger: Ledger, delete_files: Callable[[str, str], None], retention_hours: float,
                          now: datetime) -> list[str]:
    """Mark expired in the ledger first (the row stays for audit), then delete the files."""
    cutoff_iso = now_iso(now - timedelta(hours=retention_hours))
    expired: list[str] = []
    while True:
        batch = await ledger.expire(cutoff_iso)
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
