"""What a job and a token are: the records every part of whisperd passes around, whatever stores them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Mapping

ACTIVE = ("Queued", "Processing")
TERMINAL = ("Completed", "Failed", "Canceled")
# A job_events row with one of these ends a job's webhook; without one, a start sends it again.
WEBHOOK_DONE = ("webhook-delivered", "webhook-failed", "webhook-refused")


def now_iso() -> str:
    """UTC, millisecond precision, sortable as text."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _from_mapping(cls, row: Mapping[str, Any], booleans: tuple[str, ...] = (), json_lists: tuple[str, ...] = ()):
    """Build a record from a storage row: only known columns, booleans and JSON lists decoded."""
    known = {f.name for f in fields(cls)}
    data = {key: value for key, value in dict(row).items() if key in known}
    for name in booleans:
        if name in data:
            data[name] = bool(data[name])
    for name in json_lists:
        if isinstance(data.get(name), str) or data.get(name) is None:
            data[name] = json.loads(data.get(name) or "[]")
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
    audio_seconds: float | None = None

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
    audio_seconds: float | None = None


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

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "TokenRecord":
        return _from_mapping(cls, row, booleans=("admin",))

    def in_force(self, at_iso: str) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > at_iso)
