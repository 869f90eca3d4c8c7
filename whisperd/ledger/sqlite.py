"""The SQLite ledger (the embedded default): every job and every change of its state, in one WAL file."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import aiosqlite

from ..config import REPO_DIR
from ..jobs import ACTIVE, TERMINAL, WEBHOOK_DONE, Job, NewJob, TokenRecord, now_iso
from .errors import LedgerBusy, LedgerUnavailable, TokenNameTaken
from .recovery import Recovery

MIGRATIONS_DIR = REPO_DIR / "migrations" / "sqlite"
BUSY_TIMEOUT_MS = 10_000


# --- schema -------------------------------------------------------------------------------


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        found.append((int(path.name[:4]), path.stem, path.read_text(encoding="utf-8")))
    return found


def _connect_sync(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.row_factory = sqlite3.Row
    for pragma in _PRAGMAS:
        conn.execute(pragma)
    _owner_only(path)
    return conn


def _owner_only(path: str) -> None:
    # Token hashes, prompts and file names are nobody else's business; SQLite gives the
    # -wal and -shm files the database file's mode.
    for name in (path, path + "-wal", path + "-shm"):
        try:
            os.chmod(name, 0o600)
        except FileNotFoundError:
            continue


_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
)


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply the numbered migrations not yet recorded; returns the names applied."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    applied = []
    for version, name, sql in _migrations():
        if version in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split_sql(sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, now_iso()),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied


def _split_sql(script: str) -> Iterable[str]:
    # executescript() would commit on its own; statements run one by one inside our BEGIN.
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""


def prepare(path: str, max_attempts: int, actor: str) -> Recovery:
    """Create or migrate the ledger and take back jobs a dead process left Processing.

    Runs synchronously, before any IOLoop, thread or fork exists, in the parent process only.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = _connect_sync(path)
    try:
        migrate(conn)
        report = _take_back(conn, "1=1", (), max_attempts, actor, "server restarted while processing")
        report.webhooks_pending = _mark_pending_webhooks(conn, actor)
        report.live_tokens = conn.execute(
            "SELECT count(*) FROM api_tokens WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)",
            (now_iso(),),
        ).fetchone()[0]
        report.live_jobs = {
            row[0]
            for row in conn.execute(
                "SELECT id FROM jobs WHERE delivered_at IS NULL AND expired_at IS NULL"
                " AND status IN ('Queued', 'Processing', 'Completed')"
            )
        }
        return report
    finally:
        conn.close()


def release_worker(path: str, worker: str, max_attempts: int, actor: str) -> Recovery:
    """A worker process died: its Processing jobs go back to the queue (or fail as poison)."""
    conn = _connect_sync(path)
    try:
        return _take_back(conn, "worker=?", (worker,), max_attempts, actor, f"worker {worker} died while processing")
    finally:
        conn.close()


def _take_back(conn: sqlite3.Connection, where: str, params: tuple, max_attempts: int, actor: str,
               why: str) -> Recovery:
    report = Recovery()
    conn.execute("BEGIN IMMEDIATE")
    try:
        stamp = now_iso()
        rows = conn.execute(
            f"SELECT id, attempts, engine_pid FROM jobs WHERE status='Processing' AND {where} ORDER BY seq",
            params,
        ).fetchall()
        for row in rows:
            if row["engine_pid"]:
                report.engine_pids[row["id"]] = row["engine_pid"]
            if row["attempts"] >= max_attempts:
                reason = (
                    f"gave up after {row['attempts']} attempts: the server or the engine "
                    "stopped while running this job each time"
                )
                conn.execute(
                    "UPDATE jobs SET status='Failed', finished_at=?, error=?, worker=NULL,"
                    " engine_pid=NULL, progress=NULL, stage=NULL WHERE id=?",
                    (stamp, reason, row["id"]),
                )
                _event(conn, row["id"], stamp, "failed", actor, reason)
                report.poisoned.append(row["id"])
            else:
                conn.execute(
                    "UPDATE jobs SET status='Queued', started_at=NULL, worker=NULL,"
                    " engine_pid=NULL, progress=NULL, stage=NULL, cancel_requested=0"
                    " WHERE id=?",
                    (row["id"],),
                )
                _event(conn, row["id"], stamp, "requeued", actor, why)
                report.requeued.append(row["id"])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return report


def _mark_pending_webhooks(conn: sqlite3.Connection, actor: str) -> list[str]:
    """Finished jobs whose notice never went out (the server died first): send them again.

    Only here, once per server start and before any worker exists, so a delivery still under
    way in a live worker is never taken for an abandoned one.
    """
    done = ", ".join(f"'{event}'" for event in WEBHOOK_DONE)
    conn.execute("BEGIN IMMEDIATE")
    try:
        ids = [row[0] for row in conn.execute(
            "SELECT id FROM jobs WHERE callback_url IS NOT NULL AND expired_at IS NULL"
            f" AND status IN ('Completed', 'Failed', 'Canceled') AND NOT EXISTS (SELECT 1 FROM job_events e"
            f" WHERE e.job_id = jobs.id AND e.event IN ({done})) ORDER BY seq"
        )]
        stamp = now_iso()
        for job_id in ids:
            _event(conn, job_id, stamp, "webhook-pending", actor,
                   "the server restarted before the notice was delivered; it is sent again")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return ids


@contextmanager
def _busy_as_ledger_busy():
    """SQLite's "database is locked" past busy_timeout becomes the backend-neutral LedgerBusy."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise LedgerBusy(str(exc)) from exc
        raise


def _event(conn: sqlite3.Connection, job_id: str, at: str, event: str, actor: str | None, detail: str | None) -> None:
    conn.execute(
        "INSERT INTO job_events (job_id, at, event, actor, detail) VALUES (?, ?, ?, ?, ?)",
        (job_id, at, event, actor, detail),
    )


# --- the asynchronous interface ---------------------------------------------------------


class SQLiteLedger:
    """One writer connection (serialised by a lock) and one reader connection per process."""

    shared = False  # one box: jobs are taken back by process at start, not by lease

    def __init__(self, path: str, actor: str, node: str | None = None) -> None:
        self.path = path
        self.actor = actor  # host:pid, recorded on the events this process writes
        self.node = node or actor.split(":")[0]
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self._writer = await self._connect()
        self._reader = await self._connect()

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        conn.row_factory = sqlite3.Row
        for pragma in _PRAGMAS:
            await conn.execute(pragma)
        return conn

    async def close(self) -> None:
        for conn in (self._writer, self._reader):
            if conn is not None:
                await conn.close()
        self._writer = self._reader = None

    # -- helpers

    async def _write(self, work) -> Any:
        """Run `work(conn, now)` inside BEGIN IMMEDIATE ... COMMIT, one writer at a time."""
        if self._writer is None:
            raise LedgerUnavailable("ledger is not open")
        async with self._lock:
            with _busy_as_ledger_busy():
                await self._writer.execute("BEGIN IMMEDIATE")
                try:
                    result = await work(self._writer, now_iso())
                except BaseException:
                    await self._writer.execute("ROLLBACK")
                    raise
                await self._writer.execute("COMMIT")
                return result

    async def _add_event(self, conn, job_id, at, event, detail=None, actor=None) -> None:
        await conn.execute(
            "INSERT INTO job_events (job_id, at, event, actor, detail) VALUES (?, ?, ?, ?, ?)",
            (job_id, at, event, actor or self.actor, detail),
        )

    async def _fetch_one(self, sql: str, params: tuple = ()) -> sqlite3.Row | None:
        rows = await self._fetch_all(sql, params)
        return rows[0] if rows else None

    async def _fetch_all(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        # One call on the reader's thread: a cursor left open across an await would hold a read
        # transaction, and every other read on this connection would see its old snapshot.
        if self._reader is None:
            raise LedgerUnavailable("ledger is not open")
        with _busy_as_ledger_busy():
            return list(await self._reader.execute_fetchall(sql, params))

    # -- the interface

    async def submit(self, job: NewJob, detail: str | None = None) -> None:
        async def work(conn, now):
            await conn.execute(
                "INSERT INTO jobs (id, owner, status, created_at, filename, upload_bytes, language,"
                " model, response_format, diarize, prompt, device, device_index, warnings, callback_url)"
                " VALUES (?, ?, 'Queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id, job.owner, now, job.filename, job.upload_bytes, job.language,
                    job.model, job.response_format, int(job.diarize), job.prompt, job.device,
                    job.device_index, json.dumps(job.warnings), job.callback_url,
                ),
            )
            await self._add_event(conn, job.id, now, "accepted", detail, actor=job.owner)

        await self._write(work)

    async def claim(self, max_running: int) -> Job | None:
        """Atomically move the oldest Queued job to Processing, if fewer than max_running run."""

        async def work(conn, now):
            async with conn.execute(
                "UPDATE jobs SET status='Processing', started_at=?, attempts=attempts+1,"
                " worker=?, node=?, progress=0, stage='starting'"
                " WHERE seq=(SELECT seq FROM jobs WHERE status='Queued' ORDER BY seq LIMIT 1)"
                " AND (SELECT count(*) FROM jobs WHERE status='Processing') < ?"
                " RETURNING *",
                (now, self.actor, self.node, max_running),
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                return None
            job = Job.from_row(row)
            await self._add_event(conn, job.id, now, "started", f"attempt {job.attempts}")
            return job

        return await self._write(work)

    async def set_engine_pid(self, job_id: str, pid: int | None) -> None:
        async def work(conn, now):
            await conn.execute("UPDATE jobs SET engine_pid=? WHERE id=?", (pid, job_id))

        await self._write(work)

    async def set_progress(self, job_id: str, progress: float | None, stage: str | None) -> None:
        async def work(conn, now):
            await conn.execute(
                "UPDATE jobs SET progress=?, stage=? WHERE id=? AND status='Processing'",
                (progress, stage, job_id),
            )

        await self._write(work)

    async def add_warning(self, job_id: str, warning: str) -> None:
        async def work(conn, now):
            await conn.execute(
                "UPDATE jobs SET warnings=json_insert(warnings, '$[#]', ?) WHERE id=?",
                (warning, job_id),
            )
            await self._add_event(conn, job_id, now, "warning", warning)

        await self._write(work)

    async def _transition(self, sql: str, job_id: str, event: str, detail: str | None,
                          actor: str | None = None, **params: Any) -> bool:
        """One guarded UPDATE of a job (:id, :now and params bound by name) plus its event row,
        both or neither; False when the guard in the SQL did not match (nothing changed)."""

        async def work(conn, now):
            cursor = await conn.execute(sql, {"id": job_id, "now": now, **params})
            if cursor.rowcount:
                await self._add_event(conn, job_id, now, event, detail, actor=actor)
            return bool(cursor.rowcount)

        return await self._write(work)

    async def complete(self, job_id: str, detected_language: str | None) -> bool:
        return await self._transition(
            "UPDATE jobs SET status='Completed', finished_at=:now, detected_language=:language,"
            " progress=100, stage='done', engine_pid=NULL WHERE id=:id AND status='Processing'",
            job_id, "completed", f"language {detected_language}", language=detected_language,
        )

    async def fail(self, job_id: str, reason: str) -> bool:
        return await self._transition(
            "UPDATE jobs SET status='Failed', finished_at=:now, error=:reason, engine_pid=NULL,"
            " stage=NULL WHERE id=:id AND status IN ('Queued', 'Processing')",
            job_id, "failed", reason, reason=reason,
        )

    async def requeue(self, job_id: str, reason: str) -> bool:
        """Put a Processing job back at its original place in the queue."""
        return await self._transition(
            "UPDATE jobs SET status='Queued', started_at=NULL, worker=NULL, engine_pid=NULL,"
            " progress=NULL, stage=NULL WHERE id=:id AND status='Processing'",
            job_id, "requeued", reason,
        )

    async def cancel(self, job_id: str, actor: str) -> tuple[str, Job | None]:
        """Cancel a Queued job at once; flag a Processing one for its runner to stop.

        Returns ("canceled" | "requested" | "finished" | "missing", job-as-it-was).
        """

        async def work(conn, now):
            async with conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)) as cursor:
                row = await cursor.fetchone()
            if row is None:
                return "missing", None
            job = Job.from_row(row)
            if job.status == "Queued":
                await conn.execute(
                    "UPDATE jobs SET status='Canceled', finished_at=?, error='canceled by the client'"
                    " WHERE id=?",
                    (now, job_id),
                )
                await self._add_event(conn, job_id, now, "canceled", "while queued", actor=actor)
                return "canceled", job
            if job.status == "Processing":
                if not job.cancel_requested:
                    await conn.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))
                    await self._add_event(conn, job_id, now, "cancel-requested", "while processing", actor=actor)
                return "requested", job
            return "finished", job

        return await self._write(work)

    async def mark_canceled(self, job_id: str, detail: str) -> bool:
        """The runner stopped a Processing job whose cancel was requested."""
        return await self._transition(
            "UPDATE jobs SET status='Canceled', finished_at=:now, error='canceled by the client',"
            " engine_pid=NULL, stage=NULL WHERE id=:id AND status='Processing'",
            job_id, "canceled", detail,
        )

    async def mark_delivered(self, job_id: str, actor: str) -> bool:
        """Record that the result went out; only the first caller wins (no double delivery)."""
        return await self._transition(
            "UPDATE jobs SET delivered_at=:now WHERE id=:id AND status='Completed'"
            " AND delivered_at IS NULL AND expired_at IS NULL",
            job_id, "delivered", "files deleted", actor=actor,
        )

    async def expire(self, cutoff_iso: str, limit: int = 500) -> list[str]:
        """Mark finished jobs older than the cutoff as expired; returns their ids."""

        async def work(conn, now):
            async with conn.execute(
                "UPDATE jobs SET expired_at=? WHERE seq IN (SELECT seq FROM jobs"
                " WHERE expired_at IS NULL AND finished_at IS NOT NULL AND finished_at < ?"
                " LIMIT ?) RETURNING id",
                (now, cutoff_iso, limit),
            ) as cursor:
                ids = [row[0] for row in await cursor.fetchall()]
            for job_id in ids:
                await self._add_event(conn, job_id, now, "expired", "retention period over, files deleted")
            return ids

        return await self._write(work)

    async def get(self, job_id: str) -> Job | None:
        row = await self._fetch_one("SELECT * FROM jobs WHERE id=?", (job_id,))
        return Job.from_row(row) if row else None

    async def queue_position(self, job: Job) -> int:
        """1-based place among Queued jobs."""
        row = await self._fetch_one(
            "SELECT count(*) FROM jobs WHERE status='Queued' AND seq <= ?", (job.seq,)
        )
        return int(row[0]) if row else 0

    async def counts(self) -> dict[str, int]:
        rows = await self._fetch_all(
            "SELECT status, count(*) FROM jobs WHERE status IN ('Queued', 'Processing') GROUP BY status"
        )
        found = {row[0]: row[1] for row in rows}
        return {"Queued": found.get("Queued", 0), "Processing": found.get("Processing", 0)}

    async def status_counts(self) -> dict[str, int]:
        """Rows per status, every status present (0 when none): the metrics' jobs gauge."""
        rows = await self._fetch_all("SELECT status, count(*) FROM jobs GROUP BY status")
        found = {row[0]: row[1] for row in rows}
        return {status: found.get(status, 0) for status in ACTIVE + TERMINAL}

    async def check_writable(self) -> None:
        """Take the write lock and let it go: raises when the ledger cannot be written."""
        async def work(conn, now):
            # Rewriting the header's unused user_version is a real write to the main file
            # (a temp table would only prove that /tmp is writable).
            async with conn.execute("PRAGMA user_version") as cursor:
                (version,) = await cursor.fetchone()
            await conn.execute(f"PRAGMA user_version = {int(version)}")

        await self._write(work)

    async def cancel_requests(self) -> list[str]:
        rows = await self._fetch_all(
            "SELECT id FROM jobs WHERE status='Processing' AND cancel_requested=1 AND worker=?",
            (self.actor,),
        )
        return [row[0] for row in rows]

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        rows = await self._fetch_all(
            "SELECT at, event, actor, detail FROM job_events WHERE job_id=? ORDER BY id", (job_id,)
        )
        return [dict(row) for row in rows]

    async def claim_pending_webhooks(self) -> list[Job]:
        """Take the notices the start marked pending; each goes to exactly one worker."""

        async def work(conn, now):
            async with conn.execute(
                "SELECT j.* FROM jobs j JOIN job_events p ON p.job_id = j.id AND p.event = 'webhook-pending'"
                " WHERE NOT EXISTS (SELECT 1 FROM job_events r WHERE r.job_id = j.id AND r.id > p.id"
                " AND r.event = 'webhook-resumed') ORDER BY j.seq",
            ) as cursor:
                jobs = [Job.from_row(row) for row in await cursor.fetchall()]
            for job in jobs:
                await self._add_event(conn, job.id, now, "webhook-resumed", "sending the notice again")
            return jobs

        return await self._write(work)

    async def add_event(self, job_id: str, event: str, detail: str | None = None) -> None:
        async def work(conn, now):
            await self._add_event(conn, job_id, now, event, detail)

        await self._write(work)

    # -- API tokens (the hashing lives in tokens.py; only rows live here)

    async def token_by_prefix(self, prefix: str) -> "TokenRecord | None":
        row = await self._fetch_one("SELECT * FROM api_tokens WHERE prefix=?", (prefix,))
        return TokenRecord.from_row(row) if row else None

    async def live_token_count(self) -> int:
        row = await self._fetch_one(
            "SELECT count(*) FROM api_tokens WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)",
            (now_iso(),),
        )
        return int(row[0]) if row else 0

    async def touch_token(self, token_id: int) -> None:
        async def work(conn, now):
            await conn.execute("UPDATE api_tokens SET last_used_at=? WHERE id=?", (now, token_id))

        await self._write(work)


    async def insert_token(self, name: str, prefix: str, algorithm: str, salt: str, digest: str,
                           admin: bool, expires_at: str | None) -> str:
        """Store a new token's row; returns its creation time. TokenNameTaken if the name is in force."""

        async def work(conn, now):
            try:
                await conn.execute(
                    "INSERT INTO api_tokens (name, prefix, algorithm, salt, hash, admin, created_at, expires_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, prefix, algorithm, salt, digest, int(admin), now, expires_at),
                )
            except sqlite3.IntegrityError as exc:
                if "name" in str(exc):
                    raise TokenNameTaken(name) from None
                raise
            return now

        return await self._write(work)

    async def list_tokens(self) -> list[TokenRecord]:
        rows = await self._fetch_all("SELECT * FROM api_tokens ORDER BY revoked_at IS NOT NULL, name, id")
        return [TokenRecord.from_row(row) for row in rows]

    async def revoke_token(self, name: str) -> bool:
        """Revoke the token in force with this name; False when there is none."""

        async def work(conn, now):
            cursor = await conn.execute(
                "UPDATE api_tokens SET revoked_at=? WHERE name=? AND revoked_at IS NULL", (now, name))
            return bool(cursor.rowcount)

        return await self._write(work)

    # -- nodes (one box: its row in /status; no lease is ever taken back)

    async def heartbeat(self, role: str, started_at: str, job_ids: list[str]) -> list[str]:
        async def work(conn, now):
            await conn.execute(
                "INSERT INTO nodes (name, role, started_at, last_seen, actor) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET role=excluded.role, started_at=excluded.started_at,"
                " last_seen=excluded.last_seen, actor=excluded.actor",
                (self.node, role, started_at, now, self.actor),
            )

        await self._write(work)
        return []

    async def take_back_expired(self, max_attempts: int) -> Recovery:
        return Recovery()  # a single box takes back by process (prepare, release_worker)

    async def nodes(self) -> list[dict[str, Any]]:
        rows = await self._fetch_all(
            "SELECT n.name, n.role, n.started_at, n.last_seen,"
            " (julianday('now') - julianday(n.last_seen)) * 86400.0 AS seconds_since_seen,"
            " (SELECT count(*) FROM jobs j WHERE j.status = 'Processing') AS running_jobs"
            " FROM nodes n ORDER BY n.name"
        )
        return [dict(row) for row in rows]

    async def listen(self, callback) -> None:
        return None  # one box: every change is made by this ledger's own processes


def open_admin(path: str) -> sqlite3.Connection:
    """A plain connection to a migrated ledger (created if missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = _connect_sync(path)
    migrate(conn)
    return conn
