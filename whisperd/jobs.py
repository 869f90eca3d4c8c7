"""What a job and a token are: the records every part of whisperd passes around, whatever stores them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .clock import now_iso  # noqa: F401  (the records' time stamps; the ledger imports it from here)

ACTIVE = ("Queued", "Processing")
TERMINAL = ("Completed", "Failed", "Canceled")
# A job_events row with one of these ends a job's webhook; without one, a start sends it again.
WEBHOOK_DONE = ("webhook-delivered", "webhook-failed", "webhook-refused")


_FIELDS: dict[type, frozenset[str]] = {}  # each record class's field names (fields() is slow: every status read)


def _from_mapping(cls, row: Mapping[str, Any], booleans: tuple[str, ...] = (), json_lists: tuple[str, ...] = ()):
    """Build a record from a storage row: only known columns, booleans and JSON lists decoded."""
    known = _FIELDS.get(cls)
    if known is None:
        known = _FIELDS[cls] = frozenset(f.name for f in fields(cls))
    # By position, not row[key]: a sqlite3.Row finds a name by comparing it with each column's.
    data = {key: value for key, value in zip(row.keys(), row) if key in known}
    for name in booleans:
        if name in data:
            data[name] = bool(data[name])
    for name in json_lists:
        value = data.get(name)
        if not value:  # NULL or "": none (most jobs have no warnings)
            data[name] = []
        elif isinstance(value, str):
            data[name] = json.loads(value)
    return cls(**data)


@dataclass
class Job:
    seq: int
    id: str
    owner: str
    status: str
    created_at: str
    filename: str
    upload_bytes: int
    language: str
    model: str
    response_format: str
    diarize: bool
    prompt: str
    device: str
    device_index: str
    started_at: str | None = None
    finished_at: str | None = None
    delivered_at: str | None = None
    expired_at: str | None = None
    attempts: int = 0
    worker: str | None = None
    engine_pid: int | None = None
    cancel_requested: bool = False
    progress: float | None = None
    stage: str | None = None
    detected_language: str | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    callback_url: str | None = None
    task: str = "transcribe"  # or "translate" (to English)
    audio_seconds: float | None = None
    delivered_to: str | None = None  # identity that received the result (grace window)
    temperature: float | None = None  # None: the engine's own fallback schedule
    lease: str | None = None  # the running claim's token: its runner's writes carry it (ledger/core.py)
    batch_size: int | None = None  # None: the device's default (WHISPER_DEVICES' =N, else WHISPER_BATCH_SIZE)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Job":
        return _from_mapping(cls, row, booleans=("diarize", "cancel_requested"), json_lists=("warnings",))

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


@dataclass
class NewJob:
    """What a submission asks for; the ledger adds status, times and order."""

    id: str
    owner: str
    filename: str
    upload_bytes: int
    language: str
    model: str
    response_format: str
    diarize: bool
    prompt: str
    device: str
    device_index: str
    warnings: list[str] = field(default_factory=list)
    callback_url: str | None = None
    task: str = "transcribe"
    audio_seconds: float | None = None
    temperature: float | None = None
    batch_size: int | None = None


@dataclass(frozen=True)
class Quota:
    """What submit() checks in the transaction that inserts the job, so that concurrent uploads
    (in any worker process) cannot together pass a limit; 0 = no limit."""

    max_active: int = 0  # jobs of the owner Queued or Processing, this one not counted
    max_audio_seconds: float = 0.0  # audio of the owner's jobs since `since`, this one included
    since: str = ""  # ISO time the audio budget counts from (the start of the UTC day)


@dataclass
class TokenRecord:
    id: int
    name: str
    prefix: str
    algorithm: str
    salt: str
    hash: str
    admin: bool
    created_at: str
    expires_at: str | None
    last_used_at: str | None
    revoked_at: str | None
    # Per-token limits (issue 15): None = the setting's default, 0 = no limit.
    max_queued: int | None = None
    max_audio_minutes_per_day: float | None = None
    max_file_size: int | None = None
    max_open_uploads: int | None = None  # resumable uploads not yet used (issue 23)
    max_upload_bytes: int | None = None  # their Upload-Lengths together

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "TokenRecord":
        return _from_mapping(cls, row, booleans=("admin",))

    def in_force(self, at_iso: str | None = None) -> bool:
        """Not revoked, and not expired at `at_iso` (None: now, read only for a token that expires)."""
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > (at_iso or now_iso()))


@dataclass
class UploadRecord:
    """A resumable (tus) upload: how many of its bytes count, whose it is, and the job it became."""

    id: str
    owner: str
    upload_length: int
    upload_offset: int
    filename: str
    metadata: str
    created_at: str
    updated_at: str
    expires_at: str
    finished_at: str | None = None
    job_id: str | None = None
    used_at: str | None = None
    stored: str | None = None  # the store's record of the bytes that count (None: a local file)
    next_part: int = 1  # the S3 part number the next PATCH may take

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "UploadRecord":
        return _from_mapping(cls, row)

    @property
    def complete(self) -> bool:
        return self.upload_offset == self.upload_length

    def expired(self, at_iso: str) -> bool:
        return self.job_id is None and self.expires_at <= at_iso
