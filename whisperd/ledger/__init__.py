"""The job ledger: one narrow async interface, and the backend the configuration picks.

Nothing outside this package imports a database driver or writes SQL. The interface is what
`Ledger` below lists; each backend module (sqlite.py, postgresql.py) implements all of it, plus the
synchronous start-up steps `prepare` (migrate, take back what a dead run left) and
`release_worker` (a dead worker process's jobs), which run before any event loop exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

from ..jobs import Job, NewJob, Quota, TokenRecord, UploadRecord
from .errors import LedgerBusy, LedgerError, LedgerUnavailable, QuotaExceeded, TokenNameTaken
from .recovery import Recovery

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["Ledger", "LedgerBusy", "LedgerError", "LedgerUnavailable", "QuotaExceeded", "TokenNameTaken", "Recovery",
           "open_ledger", "describe", "prepare", "prepare_schema", "release_worker", "known_jobs"]


class Ledger(Protocol):
    """What the service, scheduler, runner, retention, tokens, webhooks and the CLI may ask."""

    actor: str
    shared: bool  # True: other nodes use this ledger too (leases, take-backs and NOTIFY apply)

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    # jobs
    # quota (issue 15): checked in the inserting transaction; QuotaExceeded and nothing written when over
    async def submit(self, job: NewJob, detail: str | None = None, quota: Quota | None = None) -> Job: ...
    # policy: "fifo" (the oldest job) or "fair" (the oldest job of the owner served least
    # recently; every claim records its owner's turn, whatever the policy). Issue 15.
    async def claim(self, max_running: int, policy: str = "fifo") -> Job | None: ...
    async def set_engine_pid(self, job_id: str, pid: int | None) -> None: ...
    async def set_progress(self, job_id: str, progress: float | None, stage: str | None) -> None: ...
    async def add_warning(self, job_id: str, warning: str) -> None: ...
    async def complete(self, job_id: str, detected_language: str | None) -> bool: ...
    async def fail(self, job_id: str, reason: str) -> bool: ...
    async def requeue(self, job_id: str, reason: str) -> bool: ...
    async def requeue_uncounted(self, job_id: str, reason: str) -> bool: ...  # no attempt used up
    async def cancel(self, job_id: str, actor: str) -> tuple[str, Job | None]: ...
    async def mark_canceled(self, job_id: str, detail: str) -> bool: ...
    async def mark_delivered(self, job_id: str, actor: str) -> bool: ...
    async def checkpoint(self) -> tuple[int, int, int]: ...
    async def expire(self, cutoff_iso: str, limit: int = 500) -> list[str]: ...
    async def get(self, job_id: str) -> Job | None: ...
    async def queue_position(self, job: Job, policy: str = "fifo") -> int: ...
    # tenants (issue 15): newest first; owner None = every owner; before_seq: the cursor
    async def list_jobs(self, owner: str | None, status: str | None, before_seq: int | None,
                        limit: int) -> list[Job]: ...
    # {owner: {active, jobs_today, seconds_today, jobs_window, seconds_window}}; owner None = all
    async def usage(self, owner: str | None, day_start: str, window_start: str) -> dict[str, dict[str, Any]]: ...
    async def counts(self) -> dict[str, int]: ...
    async def status_counts(self) -> dict[str, int]: ...
    async def check_writable(self) -> None: ...
    async def cancel_requests(self) -> list[str]: ...
    async def add_event(self, job_id: str, event: str, detail: str | None = None) -> None: ...
    async def claim_pending_webhooks(self) -> list[Job]: ...
    # tokens (hashing lives in tokens.py; only rows live here)
    async def token_by_prefix(self, prefix: str) -> TokenRecord | None: ...
    async def live_token_count(self) -> int: ...
    async def touch_token(self, token_id: int) -> None: ...
    async def insert_token(self, name: str, prefix: str, algorithm: str, salt: str, digest: str,
                           admin: bool, expires_at: str | None, limits: dict[str, Any] | None = None) -> str: ...
    async def update_token_limits(self, name: str, limits: dict[str, Any]) -> bool: ...
    async def list_tokens(self) -> list[TokenRecord]: ...
    async def revoke_token(self, name: str) -> bool: ...
    # resumable uploads (tus, issue 17): rows only; the bytes are JobFiles' business
    async def create_upload(self, upload: UploadRecord) -> None: ...
    async def get_upload(self, upload_id: str) -> UploadRecord | None: ...
    async def advance_upload(self, upload_id: str, from_offset: int, to_offset: int) -> bool: ...
    async def use_upload(self, upload_id: str, job_id: str) -> bool: ...
    async def delete_upload(self, upload_id: str) -> bool: ...
    async def expire_uploads(self, at_iso: str, limit: int = 500) -> list[str]: ...
    # nodes and leases (the cluster: whisperd/nodes.py)
    async def heartbeat(self, role: str, started_at: str, job_ids: list[str]) -> list[str]: ...
    async def take_back_expired(self, max_attempts: int) -> Recovery: ...
    async def nodes(self) -> list[dict[str, Any]]: ...
    async def listen(self, callback: Callable[[str, str | None], None]) -> None: ...
    # live: realtime sessions' usage (issue 26, docs/realtime.md)
    async def record_live_session(self, session_id: str, owner: str, started_at: str, ended_at: str,
                                  audio_seconds: float, node: str | None) -> None: ...
    async def live_usage(self, owner: str | None, day_start: str,
                         window_start: str) -> dict[str, dict[str, Any]]: ...
    async def set_live_session_limit(self, name: str, limit: int | None) -> None: ...
    async def live_session_limit(self, name: str) -> int | None: ...


def open_ledger(config: "Config", actor: str) -> Ledger:
    """The configured backend's ledger, not yet opened (call `await ledger.open()`)."""
    if config.WHISPER_DB_URL:
        from . import postgresql
        return postgresql.PostgreSQLLedger(config.WHISPER_DB_URL, actor, config.node_name,
                                           config.WHISPER_LEASE_SECONDS)
    from . import sqlite
    return sqlite.SQLiteLedger(config.db_path, actor, config.WHISPER_DB_BUSY_TIMEOUT_MS, config.node_name)


def describe(config: "Config") -> str:
    """Where the ledger is, for a log line (never with the database password)."""
    if config.WHISPER_DB_URL:
        from . import postgresql
        return f"PostgreSQL {postgresql.shown_url(config.WHISPER_DB_URL)}"
    return f"SQLite {config.db_path}"


def prepare(config: "Config", actor: str) -> Recovery:
    """Create or migrate the ledger and take back what the previous run left (before any fork)."""
    if config.WHISPER_DB_URL:
        from . import postgresql
        return postgresql.prepare(config.WHISPER_DB_URL, config.node_name, config.WHISPER_MAX_ATTEMPTS, actor)
    from . import sqlite
    try:
        return sqlite.prepare(config.db_path, config.WHISPER_MAX_ATTEMPTS, actor, config.WHISPER_DB_BUSY_TIMEOUT_MS)
    except (OSError, sqlite.sqlite3.Error) as exc:
        raise LedgerUnavailable(f"cannot open the ledger WHISPER_DB_PATH={config.db_path}: {exc}") from None


def prepare_schema(config: "Config") -> None:
    """Create or migrate the ledger only (the admin commands), touching no job."""
    if config.WHISPER_DB_URL:
        from . import postgresql
        postgresql.prepare_schema(config.WHISPER_DB_URL)
        return
    from . import sqlite
    try:
        sqlite.open_admin(config.db_path, config.WHISPER_DB_BUSY_TIMEOUT_MS).close()
    except (OSError, sqlite.sqlite3.Error) as exc:
        raise LedgerUnavailable(f"cannot open the ledger WHISPER_DB_PATH={config.db_path}: {exc}") from None


def release_worker(config: "Config", worker: str, actor: str) -> Recovery:
    """A worker process died: its Processing jobs go back to the queue (or fail as poison, or
    end Canceled when their cancel was asked for)."""
    if config.WHISPER_DB_URL:
        from . import postgresql
        return postgresql.release_worker(config.WHISPER_DB_URL, worker, config.WHISPER_MAX_ATTEMPTS, actor)
    from . import sqlite
    return sqlite.release_worker(config.db_path, worker, config.WHISPER_MAX_ATTEMPTS, actor,
                                 config.WHISPER_DB_BUSY_TIMEOUT_MS)


def known_jobs(config: "Config", ids: Iterable[str]) -> set[str]:
    """Which of these job ids the ledger has a row for (start-up's sweep of the job directories)."""
    if config.WHISPER_DB_URL:
        from . import postgresql
        return postgresql.known_jobs(config.WHISPER_DB_URL, ids)
    from . import sqlite
    try:
        return sqlite.known_jobs(config.db_path, ids, config.WHISPER_DB_BUSY_TIMEOUT_MS)
    except (OSError, sqlite.sqlite3.Error) as exc:
        raise LedgerUnavailable(f"cannot read the ledger WHISPER_DB_PATH={config.db_path}: {exc}") from None
