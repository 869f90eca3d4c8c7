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
import logging

from ..config import REPO_DIR
from ..jobs import ACTIVE, TERMINAL, WEBHOOK_DONE, Job, NewJob, Quota, TokenRecord, UploadRecord, now_iso
from .errors import LedgerBusy, LedgerUnavailable, QuotaExceeded, TokenNameTaken
from .recovery import Recovery

log = logging.getLogger("whisperd.ledger")
MIGRATIONS_DIR = REPO_DIR / "migrations" / "sqlite"
TOKEN_LIMITS = ("max_queued", "max_audio_minutes_per_day", "max_file_size")  # api_tokens columns

# The claim's choice of the next job, per scheduling policy (a subquery returning one seq).
_FIFO_NEXT = "SELECT seq FROM jobs WHERE status='Queued' ORDER BY seq LIMIT 1"
# The owners with queued jobs, found by hopping through the index (status, owner, seq): one
# lookup per owner, however many jobs each has queued (a GROUP BY would read them all).
_QUEUED_OWNERS = (
    "WITH RECURSIVE queued_owners(owner) AS ("
    " SELECT (SELECT min(owner) FROM jobs WHERE status='Queued')"
    " UNION ALL SELECT (SELECT min(owner) FROM jobs WHERE status='Queued' AND owner > q.owner)"
    " FROM queued_owners q WHERE q.owner IS NOT NULL) "
)
_FAIR_NEXT = (
    _QUEUED_OWNERS
    + "SELECT (SELECT min(seq) FROM jobs WHERE status='Queued' AND owner=q.owner) AS head"
    " FROM queued_owners q LEFT JOIN scheduling_turns t ON t.owner = q.owner WHERE q.owner IS NOT NULL"
    " ORDER BY coalesce(t.turn, 0), head LIMIT 1"
)


def fair_position(owner: str, rank: int, owners: list[tuple[str, int, int, int]]) -> int:
    """Where the owner's rank-th queued job stands when jobs are taken one per owner in turn.

    `owners`: (owner, queued jobs, turn, oldest seq) for every owner with queued jobs. Owners
    are served in (turn, oldest seq) order and each claim moves its owner to the back, so the
    queue is a round robin in that order: an owner ahead of ours gets `rank` turns before our
    job runs, an owner behind ours `rank - 1`, each at most as many as it has queued.
    """
    order = sorted(owners, key=lambda o: (o[2], o[3]))
    names = [o[0] for o in order]
    mine = names.index(owner) if owner in names else len(names)
    position = rank
    for index, (name, queued, _turn, _head) in enumerate(order):
        if name != owner:
            position += min(queued, rank if index < mine else rank - 1)
    return position
BUSY_TIMEOUT_MS = 10_000  # the default of WHISPER_DB_BUSY_TIMEOUT_MS


# --- schema -------------------------------------------------------------------------------


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        found.append((int(path.name[:4]), path.stem, path.read_text(encoding="utf-8")))
    return found


def _connect_sync(path: str, busy_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=busy_ms / 1000)
    conn.row_factory = sqlite3.Row
    for pragma in _pragmas(busy_ms):
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


def _pragmas(busy_ms: int) -> tuple[str, ...]:
    return (
        "PRAGMA journal_mode=WAL",
        f"PRAGMA busy_timeout={int(busy_ms)}",
        # FULL: a commit is on the disk (WAL fsynced) before the client hears 202 or an outcome
        # counts as recorded; NORMAL could lose the last commits at a power cut (bench/wal_sync.py
        # measures the cost).
        "PRAGMA synchronous=FULL",
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


def prepare(path: str, max_attempts: int, actor: str, busy_ms: int = BUSY_TIMEOUT_MS) -> Recovery:
    """Create or migrate the ledger and take back jobs a dead process left Processing.

    Runs synchronously, before any IOLoop, thread or fork exists, in the parent process only.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = _connect_sync(path, busy_ms)
    try:
        migrate(conn)
        report = _take_back(conn, "1=1", (), max_attempts, actor, "server restarted while processing",
                            queued_too=True)
        report.job_rows = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
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


def release_worker(path: str, worker: str, max_attempts: int, actor: str,
                   busy_ms: int = BUSY_TIMEOUT_MS) -> Recovery:
    """A worker process died: its Processing jobs go back to the queue (or fail as poison)."""
    conn = _connect_sync(path, busy_ms)
    try:
        return _take_back(conn, "worker=?", (worker,), max_attempts, actor, f"worker {worker} died while processing")
    finally:
        conn.close()


def _take_back(conn: sqlite3.Connection, where: str, params: tuple, max_attempts: int, actor: str,
               why: str, queued_too: bool = False) -> Recovery:
    """Processing rows of a dead process go back to the queue, fail as poison, or, when their
    cancel was asked for, end Canceled: a crash never undoes a cancel (queued_too: also the
    Queued rows a graceful stop put back while their cancel was pending)."""
    report = Recovery()
    conn.execute("BEGIN IMMEDIATE")
    try:
        stamp = now_iso()
        statuses = "('Processing', 'Queued')" if queued_too else "('Processing')"
        rows = conn.execute(
            f"SELECT id, status, attempts, engine_pid, cancel_requested FROM jobs WHERE status IN {statuses}"
            f" AND (status='Processing' OR cancel_requested=1) AND {where} ORDER BY seq",
            params,
        ).fetchall()
        for row in rows:
            if row["engine_pid"]:
                report.engine_pids[row["id"]] = row["engine_pid"]
            if row["cancel_requested"]:
                conn.execute(
                    "UPDATE jobs SET status='Canceled', finished_at=?, error='canceled by the client',"
                    " worker=NULL, engine_pid=NULL, progress=NULL, stage=NULL WHERE id=?",
                    (stamp, row["id"]),
                )
                _event(conn, row["id"], stamp, "canceled", actor, f"{why}; its cancel was asked for, so it ends here")
                report.canceled.append(row["id"])
            elif row["attempts"] >= max_attempts:
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
                    " engine_pid=NULL, progress=NULL, stage=NULL WHERE id=?",
                    (row["id"],),
                )
                _event(conn, row["id"], stamp, "requeued", actor, why)
                report.requeued.append(row["id"])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return report


def known_jobs(path: str, ids: Iterable[str], busy_ms: int = BUSY_TIMEOUT_MS) -> set[str]:
    """Which of these ids the ledger has a row for (start-up: a directory of a known job that
    ended may go; one of an unknown job is quarantined)."""
    conn = _connect_sync(path, busy_ms)
    try:
        wanted = list(ids)
        found: set[str] = set()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            marks = ", ".join("?" * len(chunk))
            found.update(row[0] for row in conn.execute(f"SELECT id FROM jobs WHERE id IN ({marks})", chunk))
        return found
    finally:
        conn.close()


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


_TRANSIENT = ("locked", "busy", "disk is full", "disk I/O error")


@contextmanager
def _busy_as_ledger_busy():
    """SQLite's "database is locked" past busy_timeout, and a full disk, become the
    backend-neutral LedgerBusy: the same write may succeed later."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if any(word in str(exc) for word in _TRANSIENT):
            raise LedgerBusy() from exc
        raise


def _event(conn: sqlite3.Connection, job_id: str, at: str, event: str, actor: str | None, detail: str | None) -> None:
    conn.execute(
        "INSERT INTO job_events (job_id, at, event, actor, detail) VALUES (?, ?, ?, ?, ?)",
        (job_id, at, event, actor, detail),
    )


# --- one transaction, one call on the writer's thread ------------------------------------
#
# aiosqlite runs each statement as its own call on the connection's thread: a transaction of five
# statements was five round trips through the IOLoop (and a claim, a completion and a submission
# each one). The transactions below are written once, as coroutines over `conn.execute`, and are
# run to their end inside the thread instead: there `conn` answers every await at once, so no
# round trip happens between BEGIN and COMMIT. (aiosqlite has no public call for "run this on
# the connection's thread": Connection._execute is used, with aiosqlite pinned in requirements.txt.)


class _Ready:
    """`await x` and `async with x` for a value that is already there."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self):
        return self.value
        yield  # noqa: unreachable: it makes __await__ a generator

    async def __aenter__(self) -> Any:
        return self.value

    async def __aexit__(self, *exc: Any) -> bool:
        return False


class _ThreadCursor:
    __slots__ = ("_cursor",)

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def fetchone(self) -> _Ready:
        return _Ready(self._cursor.fetchone())

    def fetchall(self) -> _Ready:
        return _Ready(self._cursor.fetchall())


class _ThreadConnection:
    """What a transaction's `conn` is, on the writer's thread: aiosqlite's calls, answered at once."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Any = ()) -> _Ready:
        return _Ready(_ThreadCursor(self._conn.execute(sql, params)))


def _in_writer_thread(conn: sqlite3.Connection, work, now: str, durable: bool) -> Any:
    if not durable:
        conn.execute("PRAGMA synchronous=NORMAL")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            transaction = work(_ThreadConnection(conn), now)
            try:
                transaction.send(None)
            except StopIteration as done:
                result = done.value
            else:
                transaction.close()
                raise RuntimeError("a ledger transaction awaited something other than its connection")
            conn.execute("COMMIT")
        except BaseException:
            # A COMMIT refused (disk full) leaves the transaction open: end it, or every later
            # BEGIN on this connection would fail.
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as exc:
                    log.warning("ROLLBACK failed: %s", exc)
            raise
        return result
    finally:
        if not durable:
            conn.execute("PRAGMA synchronous=FULL")


# --- the asynchronous interface ---------------------------------------------------------


class SQLiteLedger:
    """One writer connection (serialised by a lock) and one reader connection per process."""

    shared = False  # one box: jobs are taken back by process at start, not by lease

    def __init__(self, path: str, actor: str, busy_ms: int = BUSY_TIMEOUT_MS, node: str | None = None) -> None:
        self.path = path
        self.actor = actor  # host:pid, recorded on the events this process writes
        self.busy_ms = busy_ms
        self.node = node or actor.split(":")[0]
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self._writer = await self._connect()
        self._reader = await self._connect()

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=self.busy_ms / 1000)
        conn.row_factory = sqlite3.Row
        for pragma in _pragmas(self.busy_ms):
            await conn.execute(pragma)
        return conn

    async def close(self) -> None:
        # After the write under way (and those already waiting for the lock): never mid-transaction.
        async with self._lock:
            for conn in (self._writer, self._reader):
                if conn is not None:
                    await conn.close()
            self._writer = self._reader = None

    # -- helpers

    async def _write(self, work, durable: bool = True) -> Any:
        """Run `work(conn, now)` inside BEGIN IMMEDIATE ... COMMIT, one writer at a time, as one
        call on the writer's thread (see _in_writer_thread).

        durable=False commits without waiting for the disk (synchronous=NORMAL): for what a
        restart resets anyway (a claim, progress, the engine's pid, a running job's warning).
        The WAL is one file written in order, so the next durable commit makes it durable too."""
        if self._writer is None:
            raise LedgerUnavailable("ledger is not open")
        async with self._lock:
            with _busy_as_ledger_busy():
                return await self._writer._execute(_in_writer_thread, self._writer._conn, work, now_iso(), durable)

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

    async def submit(self, job: NewJob, detail: str | None = None, quota: Quota | None = None) -> Job:
        async def work(conn, now):
            if quota is not None and (quota.max_active or quota.max_audio_seconds):
                await self._check_quota(conn, job, quota)
            async with conn.execute(
                "INSERT INTO jobs (id, owner, status, created_at, filename, upload_bytes, language,"
                " model, response_format, diarize, prompt, device, device_index, warnings, callback_url,"
                " task, audio_seconds, temperature)"
                " VALUES (?, ?, 'Queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                (
                    job.id, job.owner, now, job.filename, job.upload_bytes, job.language,
                    job.model, job.response_format, int(job.diarize), job.prompt, job.device,
                    job.device_index, json.dumps(job.warnings), job.callback_url, job.task, job.audio_seconds,
                    job.temperature,
                ),
            ) as cursor:
                row = await cursor.fetchone()
            await self._add_event(conn, job.id, now, "accepted", detail, actor=job.owner)
            return Job.from_row(row)

        return await self._write(work)

    @staticmethod
    async def _check_quota(conn, job: NewJob, quota: Quota) -> None:
        # Inside the writer's BEGIN IMMEDIATE: no other process can insert between this count
        # and the INSERT. The same jobs count as in usage(): not those canceled before they ran.
        async with conn.execute(
            "SELECT sum(status IN ('Queued', 'Processing')),"
            " total(CASE WHEN created_at >= ? AND NOT (status='Canceled' AND started_at IS NULL)"
            " THEN audio_seconds END) FROM jobs WHERE owner=?",
            (quota.since, job.owner),
        ) as cursor:
            active, seconds = await cursor.fetchone()
        if quota.max_active and (active or 0) >= quota.max_active:
            raise QuotaExceeded("max_queued", active or 0)
        adding = job.audio_seconds or 0.0
        if quota.max_audio_seconds and (seconds + adding > quota.max_audio_seconds
                                        or (not adding and seconds >= quota.max_audio_seconds)):
            raise QuotaExceeded("max_audio_seconds", seconds)

    async def claim(self, max_running: int, policy: str = "fifo") -> Job | None:
        """Atomically move the next Queued job to Processing, if fewer than max_running run.

        fifo: the oldest job. fair: the oldest job of the identity served least recently
        (never served counts as longest ago; ties go to the older job). Every claim, under
        either policy, records its identity's turn in the same transaction, so the order
        holds across worker processes and survives a switch of policy.
        """
        pick = _FAIR_NEXT if policy == "fair" else _FIFO_NEXT

        async def work(conn, now):
            async with conn.execute(
                "UPDATE jobs SET status='Processing', started_at=?, attempts=attempts+1,"
                " worker=?, node=?, progress=0, stage='starting'"
                f" WHERE seq=({pick})"
                " AND (SELECT count(*) FROM jobs WHERE status='Processing') < ?"
                " RETURNING *",
                (now, self.actor, self.node, max_running),
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                return None
            job = Job.from_row(row)
            await conn.execute(
                "INSERT INTO scheduling_turns (owner, turn)"
                " VALUES (?, (SELECT coalesce(max(turn), 0) + 1 FROM scheduling_turns))"
                " ON CONFLICT (owner) DO UPDATE SET turn = excluded.turn",
                (job.owner,),
            )
            await self._add_event(conn, job.id, now, "started", f"attempt {job.attempts}")
            return job

        return await self._write(work, durable=False)

    async def set_engine_pid(self, job_id: str, pid: int | None) -> None:
        async def work(conn, now):
            await conn.execute("UPDATE jobs SET engine_pid=? WHERE id=?", (pid, job_id))

        await self._write(work, durable=False)

    async def set_progress(self, job_id: str, progress: float | None, stage: str | None) -> None:
        async def work(conn, now):
            await conn.execute(
                "UPDATE jobs SET progress=?, stage=? WHERE id=? AND status='Processing'",
                (progress, stage, job_id),
            )

        await self._write(work, durable=False)

    async def add_warning(self, job_id: str, warning: str) -> None:
        async def work(conn, now):
            await conn.execute(
                "UPDATE jobs SET warnings=json_insert(warnings, '$[#]', ?) WHERE id=?",
                (warning, job_id),
            )
            await self._add_event(conn, job_id, now, "warning", warning)

        await self._write(work, durable=False)

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

    async def requeue_uncounted(self, job_id: str, reason: str) -> bool:
        """Put a Processing job back in its place without using up the attempt its claim counted
        (the engine died beside it, or was restarted to stop another job)."""
        return await self._transition(
            "UPDATE jobs SET status='Queued', started_at=NULL, worker=NULL, engine_pid=NULL,"
            " progress=NULL, stage=NULL, attempts=max(attempts - 1, 0) WHERE id=:id AND status='Processing'",
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
        """Record that the whole result went out, and to whom; only the first caller wins."""
        return await self._transition(
            "UPDATE jobs SET delivered_at=:now, delivered_to=:to WHERE id=:id AND status='Completed'"
            " AND delivered_at IS NULL AND expired_at IS NULL",
            job_id, "delivered", "result sent in full; files go after the grace window", actor=actor, to=actor,
        )

    async def checkpoint(self) -> tuple[int, int, int]:
        """Copy the WAL into the database and truncate it: (busy, wal pages, pages checkpointed)."""
        if self._writer is None:
            raise LedgerUnavailable("ledger is not open")
        async with self._lock:
            with _busy_as_ledger_busy():
                async with self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cursor:
                    row = await cursor.fetchone()
        return int(row[0]), int(row[1]), int(row[2])

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

    async def queue_position(self, job: Job, policy: str = "fifo") -> int:
        """1-based place among Queued jobs in the order `claim(policy=...)` takes them."""
        if policy != "fair":
            row = await self._fetch_one(
                "SELECT count(*) FROM jobs WHERE status='Queued' AND seq <= ?", (job.seq,)
            )
            return int(row[0]) if row else 0
        row = await self._fetch_one(
            "SELECT count(*) FROM jobs WHERE status='Queued' AND owner=? AND seq <= ?", (job.owner, job.seq)
        )
        rank = int(row[0]) if row else 0
        if rank == 0:
            return 0
        # Another owner delays this job by at most `rank` jobs: count no further than that.
        owners = await self._fetch_all(
            _QUEUED_OWNERS
            + "SELECT q.owner,"
            " (SELECT count(*) FROM (SELECT 1 FROM jobs WHERE status='Queued' AND owner=q.owner LIMIT :rank)) AS n,"
            " (SELECT min(seq) FROM jobs WHERE status='Queued' AND owner=q.owner) AS head,"
            " coalesce(t.turn, 0) AS turn"
            " FROM queued_owners q LEFT JOIN scheduling_turns t ON t.owner = q.owner WHERE q.owner IS NOT NULL",
            {"rank": rank},
        )
        return fair_position(job.owner, rank, [(r["owner"], r["n"], r["turn"], r["head"]) for r in owners])

    async def list_jobs(self, owner: str | None, status: str | None, before_seq: int | None,
                        limit: int) -> list[Job]:
        """Jobs newest first: one owner's (None: everyone's), optionally of one status, below a seq."""
        where, params = [], []
        if owner is not None:
            where.append("owner=?")
            params.append(owner)
        if status is not None:
            where.append("status=?")
            params.append(status)
        if before_seq is not None:
            where.append("seq<?")
            params.append(before_seq)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self._fetch_all(f"SELECT * FROM jobs{clause} ORDER BY seq DESC LIMIT ?", (*params, limit))
        return [Job.from_row(row) for row in rows]

    async def usage(self, owner: str | None, day_start: str, window_start: str) -> dict[str, dict[str, Any]]:
        """Per owner (one, or None: all): active jobs, and jobs and audio seconds since each time.

        A job canceled before it ever ran costs nothing and is not counted.
        """
        owner_clause = " AND owner=?" if owner is not None else ""
        rows = await self._fetch_all(
            "SELECT owner,"
            " sum(status IN ('Queued', 'Processing')) AS active,"
            " sum(created_at >= :day) AS jobs_today,"
            " total(CASE WHEN created_at >= :day THEN audio_seconds END) AS seconds_today,"
            " sum(created_at >= :window) AS jobs_window,"
            " total(CASE WHEN created_at >= :window THEN audio_seconds END) AS seconds_window"
            " FROM jobs WHERE (created_at >= :window OR status IN ('Queued', 'Processing'))"
            " AND NOT (status='Canceled' AND started_at IS NULL)" + owner_clause.replace("?", ":owner") +
            " GROUP BY owner ORDER BY owner",
            {"day": day_start, "window": window_start, "owner": owner},
        )
        return {row["owner"]: {key: row[key] for key in row.keys() if key != "owner"} for row in rows}

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
                           admin: bool, expires_at: str | None, limits: dict[str, Any] | None = None) -> str:
        """Store a new token's row; returns its creation time. TokenNameTaken if the name is in force.

        `limits`: max_queued, max_audio_minutes_per_day, max_file_size (absent or None: the default)."""
        limits = limits or {}

        async def work(conn, now):
            try:
                await conn.execute(
                    "INSERT INTO api_tokens (name, prefix, algorithm, salt, hash, admin, created_at, expires_at,"
                    " max_queued, max_audio_minutes_per_day, max_file_size)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, prefix, algorithm, salt, digest, int(admin), now, expires_at,
                     limits.get("max_queued"), limits.get("max_audio_minutes_per_day"), limits.get("max_file_size")),
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

    async def update_token_limits(self, name: str, limits: dict[str, Any]) -> bool:
        """Set the named limits (None: back to the default) of the token in force; False when none."""
        unknown = set(limits) - set(TOKEN_LIMITS)
        if unknown:
            raise ValueError(f"unknown token limits: {sorted(unknown)}")

        async def work(conn, now):
            if not limits:
                async with conn.execute(
                        "SELECT 1 FROM api_tokens WHERE name=? AND revoked_at IS NULL", (name,)) as cursor:
                    return await cursor.fetchone() is not None
            assignments = ", ".join(f"{column}=?" for column in limits)
            cursor = await conn.execute(
                f"UPDATE api_tokens SET {assignments} WHERE name=? AND revoked_at IS NULL",
                (*limits.values(), name),
            )
            return bool(cursor.rowcount)

        return await self._write(work)

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

    # -- resumable uploads (tus): the rows; the bytes are JobFiles' business

    async def create_upload(self, upload: UploadRecord) -> None:
        async def work(conn, now):
            await conn.execute(
                "INSERT INTO uploads (id, owner, upload_length, upload_offset, filename, metadata,"
                " created_at, updated_at, expires_at) VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?)",
                (upload.id, upload.owner, upload.upload_length, upload.filename, upload.metadata,
                 upload.created_at, upload.created_at, upload.expires_at),
            )

        await self._write(work)

    async def get_upload(self, upload_id: str) -> UploadRecord | None:
        row = await self._fetch_one("SELECT * FROM uploads WHERE id=?", (upload_id,))
        return UploadRecord.from_row(row) if row else None

    async def advance_upload(self, upload_id: str, from_offset: int, to_offset: int) -> bool:
        """Record that the bytes up to to_offset are on disk; False when the offset moved meanwhile
        (another PATCH won), the upload was used, or it expired."""

        async def work(conn, now):
            cursor = await conn.execute(
                "UPDATE uploads SET upload_offset=:to, updated_at=:now,"
                " finished_at=CASE WHEN :to = upload_length THEN :now END"
                " WHERE id=:id AND upload_offset=:from AND job_id IS NULL AND expires_at > :now",
                {"id": upload_id, "from": from_offset, "to": to_offset, "now": now},
            )
            return bool(cursor.rowcount)

        return await self._write(work)

    async def use_upload(self, upload_id: str, job_id: str) -> bool:
        """Mark a finished upload as becoming this job; only the first caller wins (used once)."""

        async def work(conn, now):
            cursor = await conn.execute(
                "UPDATE uploads SET job_id=?, used_at=? WHERE id=? AND job_id IS NULL"
                " AND upload_offset=upload_length AND expires_at > ?",
                (job_id, now, upload_id, now),
            )
            return bool(cursor.rowcount)

        return await self._write(work)

    async def delete_upload(self, upload_id: str) -> bool:
        """tus termination: forget an upload not yet used (False: none such)."""

        async def work(conn, now):
            cursor = await conn.execute("DELETE FROM uploads WHERE id=? AND job_id IS NULL", (upload_id,))
            return bool(cursor.rowcount)

        return await self._write(work)

    async def expire_uploads(self, at_iso: str, limit: int = 500) -> list[str]:
        """Delete the rows whose expires_at has passed (used ones too: their bytes became a job's);
        returns their ids, for their bytes to be deleted."""

        async def work(conn, now):
            async with conn.execute(
                "DELETE FROM uploads WHERE id IN (SELECT id FROM uploads WHERE expires_at <= ? LIMIT ?)"
                " RETURNING id",
                (at_iso, limit),
            ) as cursor:
                return [row[0] for row in await cursor.fetchall()]

        return await self._write(work)

    # live: realtime sessions' usage (issue 26). The lead ports these into the new core.

    async def record_live_session(self, session_id: str, owner: str, started_at: str, ended_at: str,
                                  audio_seconds: float, node: str | None) -> None:
        async def work(conn, now):
            await conn.execute(
                "INSERT INTO live_sessions (id, owner, started_at, ended_at, audio_seconds, node)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (session_id, owner, started_at, ended_at, float(audio_seconds), node))

        await self._write(work)

    async def live_usage(self, owner: str | None, day_start: str, window_start: str) -> dict[str, dict[str, Any]]:
        """Per owner: live sessions and seconds of live audio since each time."""
        rows = await self._fetch_all(
            "SELECT owner, sum(started_at >= :day) AS sessions_today,"
            " total(CASE WHEN started_at >= :day THEN audio_seconds END) AS seconds_today,"
            " count(*) AS sessions_window, total(audio_seconds) AS seconds_window"
            " FROM live_sessions WHERE started_at >= :window" + (" AND owner=:owner" if owner is not None else "") +
            " GROUP BY owner",
            {"day": day_start, "window": window_start, "owner": owner})
        return {row["owner"]: {key: row[key] for key in row.keys() if key != "owner"} for row in rows}

    async def set_live_session_limit(self, name: str, limit: int | None) -> None:
        """token create --max-live-sessions: the token's own maximum (None: the setting's default)."""
        async def work(conn, now):
            await conn.execute("DELETE FROM live_token_limits WHERE name=?", (name,))
            if limit is not None:
                await conn.execute("INSERT INTO live_token_limits (name, max_live_sessions) VALUES (?, ?)",
                                   (name, int(limit)))

        await self._write(work)

    async def live_session_limit(self, name: str) -> int | None:
        row = await self._fetch_one("SELECT max_live_sessions FROM live_token_limits WHERE name=?", (name,))
        return None if row is None else int(row[0])

def open_admin(path: str, busy_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """A plain connection to a migrated ledger (created if missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = _connect_sync(path, busy_ms)
    migrate(conn)
    return conn
