"""The SQLite ledger (the embedded default): every job and every change of its state, in one WAL file.

Only SQLite's dialect lives here (core.py holds every query and rule): its SQL fragments, the
writer connection whose transactions run whole on its own thread, the reader connection,
migrations, and the synchronous start-up steps.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import aiosqlite

from ..config import REPO_DIR
from ..jobs import now_iso
from .core import SqlLedger, Work, migration_files
from .errors import LedgerBusy, LedgerUnavailable
from .recovery import Recovery

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("whisperd.ledger")
MIGRATIONS_DIR = REPO_DIR / "migrations" / "sqlite"
BUSY_TIMEOUT_MS = 10_000  # the default of WHISPER_DB_BUSY_TIMEOUT_MS

# The owners with queued jobs, found by hopping through the index (status, owner, seq): one
# lookup per owner, however many jobs each has queued (a GROUP BY would read them all).
_QUEUED_OWNERS = (
    "WITH RECURSIVE queued_owners(owner) AS ("
    " SELECT (SELECT min(owner) FROM jobs WHERE status='Queued')"
    " UNION ALL SELECT (SELECT min(owner) FROM jobs WHERE status='Queued' AND owner > q.owner)"
    " FROM queued_owners q WHERE q.owner IS NOT NULL) "
)


# --- schema -------------------------------------------------------------------------------


def _migrations() -> list[tuple[int, str, str]]:
    return migration_files(MIGRATIONS_DIR)


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


def _run_sync(path: str, busy_ms: int, work: Work, migrated: bool = False) -> Any:
    """Run one of the core's transactions to its end on a plain connection (start-up: no loop)."""
    conn = _connect_sync(path, busy_ms)
    try:
        if migrated:
            migrate(conn)
        return _in_writer_thread(conn, work, now_iso(), durable=True)
    finally:
        conn.close()


def prepare(path: str, max_attempts: int, actor: str, busy_ms: int = BUSY_TIMEOUT_MS,
            node: str | None = None) -> Recovery:
    """Create or migrate the ledger and take back jobs a dead process left Processing.

    Runs synchronously, before any IOLoop, thread or fork exists, in the parent process only.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ledger = SQLiteLedger(path, actor, busy_ms, node)
    return _run_sync(path, busy_ms, lambda tx, now: ledger._recover_at_start(tx, now, max_attempts), migrated=True)


def release_worker(path: str, worker: str, max_attempts: int, actor: str,
                   busy_ms: int = BUSY_TIMEOUT_MS) -> Recovery:
    """A worker process died: its Processing jobs go back to the queue (or fail as poison)."""
    ledger = SQLiteLedger(path, actor, busy_ms)
    return _run_sync(path, busy_ms, lambda tx, now: ledger._release_worker(tx, now, worker, max_attempts))


def known_jobs(path: str, ids: Iterable[str], busy_ms: int = BUSY_TIMEOUT_MS) -> set[str]:
    """Which of these ids the ledger has a row for (start-up's sweep of the job directories)."""
    return _run_sync(path, busy_ms, lambda tx, now: SqlLedger._known_jobs(tx, now, ids))


def open_admin(path: str, busy_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """A plain connection to a migrated ledger (created if missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = _connect_sync(path, busy_ms)
    migrate(conn)
    return conn


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


# --- one transaction, one call on the writer's thread ------------------------------------
#
# aiosqlite runs each statement as its own call on the connection's thread: a transaction of five
# statements was five round trips through the IOLoop (and a claim, a completion and a submission
# each one). The core's transactions, coroutines over `tx`, are run to their end inside the
# thread instead: there `tx` answers every await at once, so no round trip happens between
# BEGIN and COMMIT. (aiosqlite has no public call for "run this on
# the connection's thread": Connection._execute is used, with aiosqlite pinned in requirements.txt.)


class _Ready:
    """`await x` for a value that is already there."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self):
        return self.value
        yield  # noqa: unreachable: it makes __await__ a generator


class _ThreadTx:
    """A transaction's `tx` on the writer's thread (core.Tx): every call answered at once."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def fetchone(self, sql: str, params: dict[str, Any]) -> _Ready:
        return _Ready(self._conn.execute(sql, params).fetchone())

    def fetchall(self, sql: str, params: dict[str, Any]) -> _Ready:
        return _Ready(self._conn.execute(sql, params).fetchall())

    def execute(self, sql: str, params: dict[str, Any]) -> _Ready:
        return _Ready(self._conn.execute(sql, params).rowcount)


def _fetch_each(conn: sqlite3.Connection, queries) -> list[list[sqlite3.Row]]:
    """On the reader's thread: each query's rows, every statement fetched to its end."""
    return [conn.execute(sql, params or {}).fetchall() for sql, params in queries]


def _in_writer_thread(conn: sqlite3.Connection, work, now: str, durable: bool) -> Any:
    if not durable:
        conn.execute("PRAGMA synchronous=NORMAL")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            transaction = work(_ThreadTx(conn), now)
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


# --- the asynchronous interface: SQLite's dialect of core.SqlLedger -----------------------


class SQLiteLedger(SqlLedger):
    """One writer connection (serialised by a lock) and one reader connection per process."""

    shared = False  # one box: jobs are taken back by process at start, not by lease

    FIFO_NEXT = "SELECT seq FROM jobs WHERE status='Queued' ORDER BY seq LIMIT 1"
    FAIR_NEXT = (
        _QUEUED_OWNERS
        + "SELECT (SELECT min(seq) FROM jobs WHERE status='Queued' AND owner=q.owner) AS head"
        " FROM queued_owners q LEFT JOIN scheduling_turns t ON t.owner = q.owner WHERE q.owner IS NOT NULL"
        " ORDER BY coalesce(t.turn, 0), head LIMIT 1"
    )
    FAIR_OWNERS = (
        _QUEUED_OWNERS
        + "SELECT q.owner,"
        " (SELECT count(*) FROM (SELECT 1 FROM jobs WHERE status='Queued' AND owner=q.owner LIMIT :rank)) AS n,"
        " (SELECT min(seq) FROM jobs WHERE status='Queued' AND owner=q.owner) AS head,"
        " coalesce(t.turn, 0) AS turn"
        " FROM queued_owners q LEFT JOIN scheduling_turns t ON t.owner = q.owner WHERE q.owner IS NOT NULL"
    )
    NODES = (
        "SELECT n.name, n.role, n.started_at, n.last_seen,"
        " (julianday('now') - julianday(n.last_seen)) * 86400.0 AS seconds_since_seen,"
        " (SELECT count(*) FROM jobs j WHERE j.status = 'Processing') AS running_jobs"
        " FROM nodes n ORDER BY n.name"
    )
    APPEND_WARNING = "json_insert(warnings, '$[#]', :warning)"
    # Point reads run on the IOLoop's thread: counting 1,000 queued jobs ahead takes ~45 us there,
    # 20,000 ~0.6 ms; a job further back is placed on the reader's thread.
    POINT_COUNT_LIMIT = 1000

    def __init__(self, path: str, actor: str, busy_ms: int = BUSY_TIMEOUT_MS, node: str | None = None) -> None:
        super().__init__(actor, node or actor.split(":")[0])
        self.path = path
        self.busy_ms = busy_ms
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._point: sqlite3.Connection | None = None  # point reads on the IOLoop's thread (_read_point)
        self._lock_writes = asyncio.Lock()

    async def open(self) -> None:
        self._writer = await self._connect()
        self._reader = await self._connect()
        # No busy wait (timeout 0): a point read that would wait for a lock goes to the reader's
        # thread instead, whose busy_timeout may wait; query_only: this connection never writes.
        self._point = sqlite3.connect(self.path, isolation_level=None, timeout=0, check_same_thread=False)
        self._point.row_factory = sqlite3.Row
        self._point.execute("PRAGMA query_only=ON")

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=self.busy_ms / 1000)
        conn.row_factory = sqlite3.Row
        for pragma in _pragmas(self.busy_ms):
            await conn.execute(pragma)
        return conn

    async def close(self) -> None:
        # After the write under way (and those already waiting for the lock): never mid-transaction.
        async with self._lock_writes:
            for conn in (self._writer, self._reader):
                if conn is not None:
                    await conn.close()
            if self._point is not None:
                self._point.close()
            self._writer = self._reader = self._point = None

    async def _write(self, work: Work, durable: bool = True, patient: bool = True) -> Any:
        """Run `work(tx, now)` inside BEGIN IMMEDIATE ... COMMIT, one writer at a time, as one
        call on the writer's thread (see _in_writer_thread).

        durable=False commits without waiting for the disk (synchronous=NORMAL): for what a
        restart resets anyway (a claim, progress, the engine's pid, a running job's warning).
        The WAL is one file written in order, so the next durable commit makes it durable too."""
        if self._writer is None:
            raise LedgerUnavailable("ledger is not open")
        async with self._lock_writes:
            with _busy_as_ledger_busy():
                return await self._writer._execute(_in_writer_thread, self._writer._conn, work, now_iso(), durable)

    async def _read(self, sql: str, params: dict[str, Any] | None = None) -> list[sqlite3.Row]:
        # One call on the reader's thread: a cursor left open across an await would hold a read
        # transaction, and every other read on this connection would see its old snapshot.
        if self._reader is None:
            raise LedgerUnavailable("ledger is not open")
        with _busy_as_ledger_busy():
            return list(await self._reader.execute_fetchall(sql, params or {}))

    async def _reads(self, *queries: tuple[str, dict[str, Any] | None]) -> list[list[sqlite3.Row]]:
        """Several reads as one call on the reader's thread: one crossing, not one each."""
        if self._reader is None:
            raise LedgerUnavailable("ledger is not open")
        with _busy_as_ledger_busy():
            return await self._reader._execute(_fetch_each, self._reader._conn, queries)

    async def _read_point(self, sql: str, params: dict[str, Any]) -> sqlite3.Row | None:
        """One row by its key, read here on the IOLoop's thread: SQLite finds it in a few
        microseconds, while handing a read to the reader's thread and back costs 50-100 us of
        CPU (a queue, a thread switch, the loop's self-pipe) -- most of what a status poll
        costs beyond Tornado's own work. It never waits: a lock in the way (busy) sends it to
        the reader's thread, which may. A fresh statement each time, fetched to its end: no read
        transaction stays open."""
        if self._point is None:
            raise LedgerUnavailable("ledger is not open")
        try:
            rows = self._point.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if not any(word in str(exc) for word in _TRANSIENT):
                raise
            return await self._read_one(sql, params)
        return rows[0] if rows else None

    def _name_taken(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError) and "name" in str(exc)

    async def checkpoint(self) -> tuple[int, int, int]:
        """Copy the WAL into the database and truncate it: (busy, wal pages, pages checkpointed)."""
        if self._writer is None:
            raise LedgerUnavailable("ledger is not open")
        async with self._lock_writes:
            with _busy_as_ledger_busy():
                async with self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cursor:
                    row = await cursor.fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    async def check_writable(self) -> None:
        """Take the write lock and let it go: raises when the ledger cannot be written."""

        async def work(tx, now):
            # Rewriting the header's unused user_version is a real write to the main file
            # (a temp table would only prove that /tmp is writable).
            (version,) = await tx.fetchone("PRAGMA user_version", {})
            await tx.execute(f"PRAGMA user_version = {int(version)}", {})

        await self._write(work)


class Backend:
    """The configuration's SQLite ledger: the entry points ledger/__init__.py hands out."""

    def __init__(self, config: "Config") -> None:
        self.config = config
        self.path = config.db_path
        self.busy_ms = config.WHISPER_DB_BUSY_TIMEOUT_MS

    def ledger(self, actor: str) -> SQLiteLedger:
        return SQLiteLedger(self.path, actor, self.busy_ms, self.config.node_name)

    def describe(self) -> str:
        return f"SQLite {self.path}"

    @contextmanager
    def _unavailable(self, doing: str):
        try:
            yield
        except (OSError, sqlite3.Error) as exc:
            raise LedgerUnavailable(f"cannot {doing} the ledger WHISPER_DB_PATH={self.path}: {exc}") from None

    def prepare(self, actor: str) -> Recovery:
        with self._unavailable("open"):
            return prepare(self.path, self.config.WHISPER_MAX_ATTEMPTS, actor, self.busy_ms, self.config.node_name)

    def prepare_schema(self) -> None:
        with self._unavailable("open"):
            open_admin(self.path, self.busy_ms).close()

    def release_worker(self, worker: str, actor: str) -> Recovery:
        return release_worker(self.path, worker, self.config.WHISPER_MAX_ATTEMPTS, actor, self.busy_ms)

    def known_jobs(self, ids: Iterable[str]) -> set[str]:
        with self._unavailable("read"):
            return known_jobs(self.path, ids, self.busy_ms)
