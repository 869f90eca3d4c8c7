"""Per-identity limits: what one token may queue, run per day and upload, and how they resolve.

A token's own value wins; a token without one (and every caller that is not a ledger token:
WHISPER_API_ALLOW_ANY_TOKEN, a custom validator, authorization off) gets the setting's
default. 0 means "no limit", at both levels.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from ..clock import iso, utc_now
from ..errors import Kind, ServiceError
from ..jobs import Quota

NAMES = ("max_queued", "max_audio_minutes_per_day", "max_file_size", "max_open_uploads", "max_upload_bytes")
# The setting that gives each limit its default.
SETTING_OF = {
    "max_queued": "WHISPER_TOKEN_MAX_QUEUED",
    "max_audio_minutes_per_day": "WHISPER_TOKEN_MAX_AUDIO_MINUTES_PER_DAY",
    "max_file_size": "WHISPER_TOKEN_MAX_FILE_SIZE",
    "max_open_uploads": "WHISPER_TOKEN_MAX_OPEN_UPLOADS",
    "max_upload_bytes": "WHISPER_TOKEN_MAX_UPLOAD_BYTES",
}


@dataclass(frozen=True)
class Limits:
    """None: not set here (the default applies); 0: no limit."""

    max_queued: int | None = None
    max_audio_minutes_per_day: float | None = None
    max_file_size: int | None = None
    # Resumable uploads (tus) not yet used or expired: how many, and their Upload-Lengths together.
    max_open_uploads: int | None = None
    max_upload_bytes: int | None = None

    def resolved(self, config: Any) -> "Limits":
        """Every field set: this object's values, else the configured defaults."""
        return Limits(**{
            name: getattr(self, name) if getattr(self, name) is not None else getattr(config, SETTING_OF[name])
            for name in NAMES
        })

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


UNSET = Limits()


def day_start(now: datetime | None = None) -> datetime:
    """The start of the current UTC day: the daily audio budget and "today" in /usage start here."""
    now = now or utc_now()
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def seconds_to_next_day(now: datetime | None = None) -> int:
    now = now or utc_now()
    return max(1, int((day_start(now) + timedelta(days=1) - now).total_seconds()) + 1)


def usage_windows(now: datetime | None = None) -> tuple[str, str]:
    """(start of today, start of the 30-day window), both as ledger times."""
    now = now or utc_now()
    return iso(day_start(now)), iso(now - timedelta(days=30))


QUEUE_RETRY_AFTER_SECONDS = 30  # a queued job takes about this long to make room; the client retries


class LimitExceeded(ServiceError):
    """A submission over one of the caller's limits: a message, and when to retry (or None)."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(Kind.OVER_LIMIT, message, retry_after)


def file_size_limit(limits: Limits, server_max: int) -> tuple[int, str]:
    """The bytes one file may have for this caller, and the name of the limit that sets it."""
    if limits.max_file_size and limits.max_file_size < server_max:
        return limits.max_file_size, "this token's max_file_size"
    return server_max, "MAX_FILE_SIZE"


OPEN_UPLOADS_RETRY_AFTER_SECONDS = 60


def check_open_uploads(name: str, limits: Limits, count: int, declared: int, adding: int) -> None:
    """LimitExceeded when one more resumable upload of `adding` bytes would take the caller past
    max_open_uploads or max_upload_bytes (count and declared: its open uploads now)."""
    if limits.max_upload_bytes and adding > limits.max_upload_bytes:
        raise ServiceError(Kind.TOO_LARGE, f"Upload-Length {adding} is larger than max_upload_bytes ({limits.max_upload_bytes} "
                                 f"bytes), the most {name!r} may have in open uploads")
    if limits.max_open_uploads and count >= limits.max_open_uploads:
        raise LimitExceeded(f"too many open uploads: max_open_uploads is {limits.max_open_uploads} for {name!r}, "
                                 f"which has {count} not yet used; use (upload=<id>) or DELETE one, or wait for "
                                 "unfinished ones to expire", OPEN_UPLOADS_RETRY_AFTER_SECONDS)
    if limits.max_upload_bytes and declared + adding > limits.max_upload_bytes:
        raise LimitExceeded(f"too many bytes in open uploads: max_upload_bytes is {limits.max_upload_bytes} for "
                                 f"{name!r}, whose open uploads declare {declared} already and this one {adding} "
                                 "more; use or DELETE one first", OPEN_UPLOADS_RETRY_AFTER_SECONDS)


def quota(limits: Limits) -> Quota:
    """What the ledger checks again in the transaction that inserts the job."""
    return Quota(max_active=limits.max_queued or 0,
                 max_audio_seconds=(limits.max_audio_minutes_per_day or 0.0) * 60,
                 since=usage_windows()[0])


def refusal(name: str, limits: Limits, which: str, used: float, adding_seconds: float = 0.0) -> LimitExceeded:
    """The 429 for a caller over `which` ("max_queued" or "max_audio_seconds"), naming limit and usage."""
    if which == "max_queued":
        return LimitExceeded(
            f"too many jobs: max_queued is {limits.max_queued} for {name!r}, which has {int(used)} queued or "
            "running; wait for one to finish (or cancel one) and send it again",
            QUEUE_RETRY_AFTER_SECONDS)
    this = f" and this file has {adding_seconds / 60:.2f} more" if adding_seconds else ""
    return LimitExceeded(
        f"daily audio limit reached: max_audio_minutes_per_day is {_number(limits.max_audio_minutes_per_day)} "
        f"for {name!r}, which has used {used / 60:.2f} minutes today (UTC){this}; "
        "the budget starts again at midnight UTC",
        seconds_to_next_day())


async def check_usage(ledger: Any, name: str, limits: Limits, adding_seconds: float = 0.0) -> None:
    """LimitExceeded when the caller has too many jobs in the queue, or its audio budget for
    today cannot take `adding_seconds` more (0: is any budget left at all?). A quick answer
    before the upload is stored; the ledger's submit checks the same again (see quota())."""
    if not limits.max_queued and not limits.max_audio_minutes_per_day:
        return
    today, window = usage_windows()
    used = (await ledger.usage(name, today, window)).get(name, {})
    active = int(used.get("active") or 0)
    if limits.max_queued and active >= limits.max_queued:
        raise refusal(name, limits, "max_queued", active)
    if limits.max_audio_minutes_per_day:
        budget = limits.max_audio_minutes_per_day * 60
        spent = float(used.get("seconds_today") or 0.0)
        if spent + adding_seconds > budget or (adding_seconds == 0 and spent >= budget):
            raise refusal(name, limits, "max_audio_seconds", spent, adding_seconds)


def _number(value: float) -> str:
    return f"{value:g}"
