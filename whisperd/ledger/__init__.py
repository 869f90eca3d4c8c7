"""The job ledger: one narrow async interface, and the backend the configuration picks.

Nothing outside this package imports a database driver or writes SQL. The interface is what
`Ledger` below lists; each backend module (sqlite.py, postgresql.py) implements all of it, plus the
synchronous start-up steps `prepare` (migrate, take back what a dead run left) and
`release_worker` (a dead worker process's jobs), which run before any event loop exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..jobs import Job, NewJob, TokenRecord
from .errors import LedgerBusy, LedgerError, LedgerUnavailable, TokenNameTaken
from .recovery import Recovery

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["Ledger", "LedgerBusy", "LedgerError", "LedgerUnavailable", "TokenNameTaken", "Recovery",
           "open_ledger", "prepare", "prepare_schema", "release_worker"]


class Ledger(Protocol):
    """What the service, scheduler, runner, retention, tokens, webhooks and the CLI may ask."""

    actor: str
    shared: bool  # True: other nodes use this ledger too (leases, take-backs and NOTIFY apply)

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    # jobs
    async def submit(self, job: NewJob, detail: str | None = None) -> None: ...
    async def claim(self, max_running: int) -> Job | None: ...
    async def set_engine_pid(self, job_id: str, pid: int | None) -> None: ...
    async def set_progress(self, job_id: str, progress: float | None, stage: str | None) -> None: ...
    async def add_warning(self, job_id: str, warning: str) -> None: ...
    async def complete(self, job_id: str, detected_language: str | None) -> bool: ...
    async def fail(self, job_id: str, reason: str) -> bool: ...
    async def requeue(self, job_id: str, reason: str) -> bool: ...
    async def cancel(self, job_id: str, actor: str) -> tuple[str, Job | None]: ...
    async def mark_canceled(self, job_id: str, detail: str) -> bool: ...
    async def mark_delivered(self, job_id: str, actor: str) -> bool: ...
    async def expire(self, cutoff_iso: str, limit: int = 500) -> list[str]: ...
    async def get(self, job_id: str) -> Job | None: ...
    async def queue_position(self, job: Job) -> int: ...
    async def counts(self) -> dict[str, int]: ...
    async def status_counts(self) -> dict[str, int]: ...
    async def check_writable(self) -> None: ...
    async def cancel_requests(self) -> list[str]: ...
    async def events(self, job_id: str) -> list[dict[str, Any]]: ...
    async def add_event(self, job_id: str, event: str, detail: str | None = None) -> None: ...
    async def claim_pending_webhooks(self) -> list[Job]: ...
    # tokens (hashing lives in tokens.py; only rows live here)
    async def token_by_prefix(self, prefix: str) -> TokenRecord | None: ...
    async def live_token_count(self) -> int: ...
    async def touch_token(self, token_id: int) -> None: ...
    async def insert_token(self, name: str, prefix: str, algorithm: str, salt: str, digest: str,
                           admin: bool, expires_at: str | None) -> str: ...
    async def list_tokens(self) -> list[TokenRecord]: ...
    async def revoke_token(self, name: str) -> bool: ...
    # nodes and leases (the cluster: whisperd/nodes.py)
    async def heartbeat(self, role: str, started_at: str, job_ids: list[str]) -> list[str]: ...
    async def take_back_expired(self, max_attempts: int) -> Recovery: ...
    async def nodes(self) -> list[dict[str, Any]]: ...
    async def listen(self, callback: Callable[[str, str | None], None]) -> None: ...


def open_ledger(config: "Config", actor: str) -> Ledger:
    """The configured backend's ledger, not yet opened (call `await ledger.open()`)."""
    if config.WHISPER_DB_URL:
        from . import postgresql
        return postgresql.PostgreSQLLedger(config.WHISPER_DB_URL, actor, config.node_name,
                                           config.WHISPER_LEASE_SECONDS)
    from . import sqlite
    return sqlite.SQLiteLedger(config.db_path, actor, config.node_name)


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
        return sqlite.prepare(config.db_path, config.WHISPER_MAX_ATTEMPTS, actor)
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
        sqlite.open_admin(config.db_path).close()
    except (OSError, sqlite.sqlite3.Error) as exc:
        raise LedgerUnavailable(f"cannot open the ledger WHISPER_DB_PATH={config.db_path}: {exc}") from None


def release_worker(config: "Config", worker: str, actor: str) -> Recovery:
    """A worker process died: its Processing jobs go back to the queue (or fail as poison)."""
    if config.WHISPER_DB_URL:
        from . import postgresql
        return postgresql.release_worker(config.WHISPER_DB_URL, worker, config.WHISPER_MAX_ATTEMPTS, actor)
    from . import sqlite
    return sqlite.release_worker(config.db_path, worker, config.WHISPER_MAX_ATTEMPTS, actor)
