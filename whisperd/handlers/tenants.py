"""What a caller can see of its own: its jobs (GET /transcription) and its usage (GET /usage)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from ..jobs import ACTIVE, TERMINAL, Job, now_iso
from ..identity.limits import UNSET, Limits, usage_windows
from ..identity.tokens import limits_of
from ..errors import Kind, ServiceError
from ..integers import BadInteger, strict_int
from .base import BaseHandler

DEFAULT_PAGE = 20
MAX_PAGE = 100
STATUSES = {status.lower(): status for status in ACTIVE + TERMINAL}


def encode_cursor(seq: int) -> str:
    # Opaque to clients; a seq only moves forward, so pages stay put while jobs arrive.
    return base64.urlsafe_b64encode(f"j{seq}".encode()).decode().rstrip("=")


def decode_cursor(text: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    try:
        if len(text) > 40 or not raw.startswith("j"):
            raise BadInteger(raw)
        return strict_int(raw[1:], "cursor")
    except BadInteger:
        raise ServiceError(Kind.INVALID, "'cursor' is not one this server gave out: pass the 'next' value of the previous "
                                "page as is") from None


def job_entry(job: Job, with_owner: bool) -> dict[str, Any]:
    """One row of the listing: what a client needs to find a job again and decide what to do."""
    entry: dict[str, Any] = {
        "job_id": job.id, "status": job.status, "created_at": job.created_at, "filename": job.filename,
        "model": job.model, "language": job.language,
    }
    task = getattr(job, "task", None)  # jobs gain a task (transcribe/translate) with the languages work
    if task:
        entry["task"] = task
    if job.audio_seconds is not None:
        entry["audio_seconds"] = round(job.audio_seconds, 3)
    for name in ("started_at", "finished_at", "delivered_at", "expired_at"):
        if getattr(job, name):
            entry[name] = getattr(job, name)
    if job.status == "Processing":
        entry["progress"] = job.progress
        entry["stage"] = job.stage
    if job.status in ("Failed", "Canceled") and job.error:
        entry["error"] = job.error
    entry["result_available"] = job.status == "Completed" and not job.delivered_at and not job.expired_at
    if with_owner:
        entry["owner"] = job.owner
    return entry


async def list_jobs(handler: BaseHandler) -> None:
    """GET /transcription: the caller's jobs (an admin's: everyone's), newest first, a page at a time."""
    text = handler.get_query_argument("limit", str(DEFAULT_PAGE)).strip()
    try:
        limit = strict_int(text, "'limit'", maximum=MAX_PAGE, minimum=1)
    except BadInteger:
        raise ServiceError(Kind.INVALID, f"'limit' must be a whole number from 1 to {MAX_PAGE}, got {text[:20]!r}") from None
    wanted = handler.get_query_argument("status", "").strip()
    status = None
    if wanted:
        status = STATUSES.get(wanted.lower())
        if status is None:
            raise ServiceError(Kind.INVALID, f"'status' must be one of {', '.join(ACTIVE + TERMINAL)}, got {wanted[:40]!r}")
    cursor = handler.get_query_argument("cursor", "").strip()
    before = decode_cursor(cursor) if cursor else None
    identity = handler.identity
    owner = None if identity.admin else identity.name
    # One more than asked tells whether another page exists.
    jobs = await handler.service.list_jobs(owner, status, before, limit + 1)
    page = jobs[:limit]
    more = len(jobs) > limit
    handler.send_json({
        "jobs": [job_entry(job, identity.admin) for job in page],
        "next": encode_cursor(page[-1].seq) if more else None,
    })


class UsageHandler(BaseHandler):
    """GET /usage: jobs and audio today and over 30 days, and the limits that apply."""

    allowed_methods = ("OPTIONS", "GET")

    async def get(self) -> None:
        config = self.service.config
        today, window = usage_windows()
        identity = self.identity
        used = await self.service.usage(None if identity.admin else identity.name, today, window)
        body = usage_entry(identity.name, used.get(identity.name, {}), identity.limits.resolved(config))
        # live: minutes of realtime sessions (issue 26), beside the jobs'.
        live = await self.service.ledger.live_usage(None if identity.admin else identity.name, today, window)
        body["live"] = live_entry(live.get(identity.name, {}))
        body["day_started_at"] = today
        body["window_started_at"] = window
        body["as_of"] = now_iso()
        if identity.admin:
            tokens = {record.name: limits_of(record) for record in await self.service.list_tokens()
                      if record.in_force(now_iso())}
            names = sorted(set(tokens) | set(used))
            body["tokens"] = [
                {**usage_entry(name, used.get(name, {}), tokens.get(name, UNSET).resolved(config)),
                 "token": name in tokens, "live": live_entry(live.get(name, {}))}
                for name in sorted(set(names) | set(live))
            ]
        self.send_json(body)


def live_entry(used: dict[str, Any]) -> dict[str, Any]:
    """live: realtime sessions ended today and over 30 days, and their minutes of audio."""
    return {"today": {"sessions": int(used.get("sessions_today") or 0),
                      "minutes": round(float(used.get("seconds_today") or 0.0) / 60, 3)},
            "last_30_days": {"sessions": int(used.get("sessions_window") or 0),
                             "minutes": round(float(used.get("seconds_window") or 0.0) / 60, 3)}}


def usage_entry(name: str, used: dict[str, Any], limits: Limits) -> dict[str, Any]:
    return {
        "name": name,
        "active_jobs": int(used.get("active") or 0),
        "today": {"jobs": int(used.get("jobs_today") or 0),
                  "audio_seconds": round(float(used.get("seconds_today") or 0.0), 3)},
        "last_30_days": {"jobs": int(used.get("jobs_window") or 0),
                         "audio_seconds": round(float(used.get("seconds_window") or 0.0), 3)},
        "limits": limits.as_dict(),
    }
