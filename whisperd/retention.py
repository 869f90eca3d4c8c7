"""Retention: jobs finished longer ago than WHISPER_JOB_RETENTION_HOURS lose their files, and
resumable uploads past WHISPER_UPLOAD_EXPIRY_HOURS their bytes."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Callable

from .faults import crash_point
from .jobfiles import JobFiles
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
    for upload_id in files.resumable_ids():
        if await ledger.get_upload(upload_id) is None:
            files.remove_resumable(upload_id)
            expired.append(upload_id)
    if expired:
        log.info("retention: deleted %d expired resumable upload(s)", len(expired))
    return expired
