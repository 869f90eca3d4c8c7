"""The PostgreSQL ledger (the cluster backend): several nodes share one queue, one row per job.

Only PostgreSQL's dialect lives here (core.py holds every query and rule): its SQL fragments,
`:name` placeholders turned into `$n`, a small connection pool per process with retries while
the database is away, advisory locks, NOTIFY on every job event (see notify.py), migrations and
the synchronous start-up steps. What only a shared ledger needs: claims that skip rows another
node holds (FOR UPDATE SKIP LOCKED), leases on running jobs (the database's clock decides when
one ran out), node heartbeats. Times stay ISO-8601 UTC text written by the node, as in SQLite,
so a Job reads the same.
"""

from __future__ import annotations

import asyncio
import logging
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ..config import REPO_DIR
from ..jobs import now_iso
from .core import CLAIM, QUOTA, WEBHOOKS, SqlLedger, Work, migration_files, run_sync
from .errors import LedgerUnavailable
from .notify import CHANNEL, Listener
from .recovery import Recovery

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("whisperd.ledger")
MIGRATIONS_DIR = REPO_DIR / "migrations" / "postgresql"
MIGRATION_LOCK = 0x77687370  # pg_advisory_xact_lock key: one node migrates, the others wait
_LOCKS = {
    CLAIM: 0x7768636C,     # with hashtext(node): one claim at a time per node (its slot count)
    WEBHOOKS: 0x77687768,  # one claim of pending webhooks at a time, across the cluster
    QUOTA: 0x77687175,     # with hashtext(owner): one quota check and insert at a time per owner
}
RETRY_SECONDS = 10.0         # a restarting database: reads and writes wait this long before failing
CONNECT_TIMEOUT = 5.0
NODE_POOL = 8                # pooled connections a node's processes share (docs/cluster.md)
PROCESS_POOL = (2, 4)        # each process: at least 2 (a claim beside a read), at most 4
# The database is away, not the request wrong: the connection broke or the server is (re)starting
# (class 08), out of connection slots or other resources (class 53: "too many clients"), or shut
# down by an administrator (57P01-57P03). Retried on a new connection, the job kept, 503 to clients.
# InternalClientError: a connection the server dropped mid-commit ("cannot switch to state").
AWAY_CLASSES = ("08", "53")
AWAY_STATES = ("57P01", "57P02", "57P03")
AWAY_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError)


def database_away(exc: BaseException) -> bool:
    """Whether an error says the database is away for now (worth trying again), not refusing."""
    state = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, AWAY_ERRORS) or state[:2] in AWAY_CLASSES or state in AWAY_STATES


def pool_size(processes: int) -> int:
    """Each process's share of NODE_POOL, within PROCESS_POOL (HTTP_WORKER_NUMBER processes)."""
    low, high = PROCESS_POOL
    return max(low, min(high, NODE_POOL // max(1, processes)))


def shown_url(url: str) -> str:
    """The URL without its password: the only form that may reach a log or an error."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit((parts.scheme, f"{user}@{netloc[-1]}", parts.path, parts.query, parts.fragment))


def _unavailable(url: str, exc: BaseException) -> LedgerUnavailable:
    # asyncpg's messages name host and port, never the password; the URL is shown redacted.
    return LedgerUnavailable(f"cannot use the PostgreSQL ledger WHISPER_DB_URL={shown_url(url)}: "
                             f"{exc.__class__.__name__}: {exc}")


async def _connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)


def _count(status: str) -> int:
    """Rows touched, from asyncpg's command tag ("UPDATE 3")."""
    return int(status.rsplit(" ", 1)[-1]) if status and status[-1].isdigit() else 0


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")  # :name, never a ::cast or a 24:MI inside a format


@lru_cache(maxsize=512)
def _numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    """The core's `:name` placeholders as `$1, $2, ...` (a name used twice is one number)."""
    names: list[str] = []

    def number(match: re.Match) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return _NAMED.sub(number, sql), tuple(names)


def _bind(sql: str, params: dict[str, Any] | None) -> tuple[str, list[Any]]:
    text, names = _numbered(sql)
    return text, [params[name] for name in names] if names else []


class _PgTx:
    """A transaction's `tx` (core.Tx) on one asyncpg connection."""

    __slots__ = ("_conn",)

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def fetchone(self, sql: str, params: dict[str, Any]) -> asyncpg.Record | None:
        text, args = _bind(sql, params)
        return await self._conn.fetchrow(text, *args)

    async def fetchall(self, sql: str, params: dict[str, Any]) -> list[asyncpg.Record]:
        text, args = _bind(sql, params)
        return await self._conn.fetch(text, *args)

    async def execute(self, sql: str, params: dict[str, Any]) -> int:
        text, args = _bind(sql, params)
        return _count(await self._conn.execute(text, *args))


def _run_transaction(url: str, work: Work | None, migrated: bool = False) -> Any:
    """One of the core's transactions (or only the migrations) on a connection of its own."""

    async def run() -> Any:
        conn = await _connect(url)
        try:
            if migrated:
                await migrate(conn)
            if work is None:
                return None
            async with conn.transaction():
                return await work(_PgTx(conn), now_iso())
        finally:
            await conn.close()

    try:
        return run_sync(run)
    except Exception as exc:
        if database_away(exc) or isinstance(exc, asyncpg.PostgresError):
            raise _unavailable(url, exc) from None
        raise


# --- schema -------------------------------------------------------------------------------


def _migrations() -> list[tuple[int, str, str]]:
    return migration_files(MIGRATIONS_DIR)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply the numbered migrations not yet recorded, all in one transaction under an advisory
    lock: a second node starting at the same moment waits, then finds nothing left to do."""
    applied = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        done = {row[0] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in _migrations():
            if version in done:
                continue
            await conn.execute(sql)  # a script without parameters: several statements are fine
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                version, name, now_iso(),
            )
            applied.append(name)
    return applied


def prepare(url: str, node: str, max_attempts: int, actor: str) -> Recovery:
    """Migrate, and take back the jobs this node's previous run left Processing.

    Only this node's: the others may be running theirs right now. A node that never comes
    back loses its jobs to the lease (take_back_expired on any live node).
    """
    ledger = PostgreSQLLedger(url, actor, node)
    return _run_transaction(url, lambda tx, now: ledger._recover_at_start(tx, now, max_attempts), migrated=True)


def release_worker(url: str, worker: str, max_attempts: int, actor: str) -> Recovery:
    """A worker process of this node died: its Processing jobs go back to the queue (or fail as poison)."""
    ledger = PostgreSQLLedger(url, actor, actor.split(":")[0])
    try:
        return _run_transaction(url, lambda tx, now: ledger._release_worker(tx, now, worker, max_attempts))
    except LedgerUnavailable as exc:
        # The lease will bring the job back anyway; the supervisor must not die of it.
        log.error("could not release worker %s's jobs now (their leases will): %s", worker, exc)
        return Recovery()


def known_jobs(url: str, ids: Iterable[str]) -> set[str]:
    """Which of these ids the ledger has a row for (start-up's sweep of the job directories)."""
    return _run_transaction(url, lambda tx, now: SqlLedger._known_jobs(tx, now, ids))


def prepare_schema(url: str) -> None:
    """Create or migrate the ledger only (the admin commands)."""
    _run_transaction(url, None, migrated=True)


# --- the asynchronous interface: PostgreSQL's dialect of core.SqlLedger ---------------------


class PostgreSQLLedger(SqlLedger):
    """A small connection pool per process, plus one listening connection outside it."""

    shared = True  # other nodes use this ledger too: leases and take-backs apply

    # FOR UPDATE SKIP LOCKED: a row another node is claiming right now is passed over, never waited for.
    FIFO_NEXT = "SELECT seq FROM jobs WHERE status='Queued' ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED"
    FAIR_NEXT = (
        "SELECT j.seq FROM jobs j LEFT JOIN scheduling_turns t ON t.owner = j.owner"
        " WHERE j.status='Queued' AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.status='Queued'"
        " AND o.owner = j.owner AND o.seq < j.seq)"
        " ORDER BY coalesce(t.turn, 0), j.seq LIMIT 1 FOR UPDATE OF j SKIP LOCKED"
    )
    FAIR_OWNERS = (
        "SELECT j.owner, least(count(*), :rank)::int AS n, min(j.seq) AS head, coalesce(max(t.turn), 0) AS turn"
        " FROM jobs j LEFT JOIN scheduling_turns t ON t.owner = j.owner"
        " WHERE j.status='Queued' GROUP BY j.owner"
    )
    NODES = (
        "SELECT n.name, n.role, n.started_at,"
        " to_char(n.last_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS last_seen,"
        " extract(epoch FROM now() - n.last_seen)::float8 AS seconds_since_seen,"
        " (SELECT count(*) FROM jobs j WHERE j.node = n.name AND j.status = 'Processing') AS running_jobs"
        " FROM nodes n ORDER BY n.name"
    )
    APPEND_WARNING = "(warnings::jsonb || jsonb_build_array(:warning::text))::text"
    # Every event wakes the other nodes' schedulers and waiters (notify.py); PostgreSQL delivers
    # the NOTIFY only when (and if) the transaction commits.
    EVENT = ("WITH e AS (INSERT INTO job_events (job_id, at, event, actor, detail)"
             " VALUES (:job_id, :at, :event, :actor, :detail))"
             f" SELECT pg_notify('{CHANNEL}', :event || ':' || :job_id)")
    FOR_UPDATE = " FOR UPDATE"
    SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
    LEASE_UNTIL = "now() + make_interval(secs => :lease_seconds)"
    DB_NOW = "now()"
    DB_CUTOFF = ("to_char((now() - make_interval(secs => :age)) AT TIME ZONE 'UTC',"
                 " 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
    CLAIM_SCOPE = " AND node=:node"
    RESTARTED = "(node = :node OR status = 'Queued')"  # requeued jobs belong to no node
    FINISHED_HERE = "node = :node"

    def __init__(self, url: str, actor: str, node: str, lease_seconds: float = 30.0,
                 pool: int = PROCESS_POOL[1]) -> None:
        super().__init__(actor, node, lease_seconds)
        self.url = url
        self.pool_size = pool
        self._pool: asyncpg.Pool | None = None
        self._listener: Listener | None = None

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=self.pool_size, timeout=CONNECT_TIMEOUT,
                server_settings={"application_name": f"whisperd {self.node}"[:63]},
            )
        except Exception as exc:
            if database_away(exc) or isinstance(exc, asyncpg.PostgresError):
                raise _unavailable(self.url, exc) from None
            raise

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception as exc:
                if not (isinstance(exc, asyncio.TimeoutError) or database_away(exc)):
                    raise
                pool.terminate()

    async def _use(self, action: Callable[[asyncpg.Connection], Awaitable[Any]],
                   retry_for: float = RETRY_SECONDS) -> Any:
        """Run `action(conn)` on a pooled connection; while the database is away (database_away)
        it is tried again, a new connection each time, for `retry_for` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_for
        delay = 0.05
        while True:
            pool = self._pool
            if pool is None:
                raise LedgerUnavailable("ledger is not open")
            try:
                async with pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                    return await action(conn)
            except Exception as exc:
                if not database_away(exc):
                    raise
                if self._pool is None or loop.time() + delay > deadline:
                    unreachable = LedgerUnavailable(f"the PostgreSQL ledger is unreachable: {exc.__class__.__name__}")
                    unreachable.transient = self._pool is not None  # open, but the database is away: retry later
                    raise unreachable from None
                log.warning("ledger connection lost (%s); trying again", exc.__class__.__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _write(self, work: Work, durable: bool = True, patient: bool = True) -> Any:
        async def action(conn):
            async with conn.transaction():
                return await work(_PgTx(conn), now_iso())

        return await self._use(action, RETRY_SECONDS if patient else 0)

    async def _read(self, sql: str, params: dict[str, Any] | None = None) -> list[asyncpg.Record]:
        text, args = _bind(sql, params)
        return await self._use(lambda conn: conn.fetch(text, *args))

    async def _lock(self, tx, what: str, key: str | None = None) -> None:
        if key is None:
            await tx.execute("SELECT pg_advisory_xact_lock(:lock)", {"lock": _LOCKS[what]})
        else:
            await tx.execute("SELECT pg_advisory_xact_lock(:lock, hashtext(:key))", {"lock": _LOCKS[what], "key": key})

    async def _notify(self, tx, event: str, job_id: str) -> None:
        await tx.execute(f"SELECT pg_notify('{CHANNEL}', :payload)", {"payload": f"{event}:{job_id}"})

    def _name_taken(self, exc: BaseException) -> bool:
        return isinstance(exc, asyncpg.UniqueViolationError) and exc.constraint_name == "api_tokens_live_name"

    async def checkpoint(self) -> tuple[int, int, int]:
        """SQLite's WAL checkpoint; PostgreSQL checkpoints on its own: nothing to do here."""
        if self._pool is None:
            raise LedgerUnavailable("ledger is not open")
        return 0, 0, 0

    async def check_writable(self) -> None:
        """Raises when the ledger cannot be written (unreachable, or a read-only standby)."""

        async def work(tx, now):
            await tx.execute("SELECT txid_current()", {})  # refused by a standby: a real write check

        await self._write(work, patient=False)

    async def listen(self, callback: Callable[[str, str | None], None]) -> None:
        """Call callback(event, job_id) for every job event any node writes (and ("reconnected",
        None) after the listening connection came back: anything may have changed meanwhile)."""
        if self._listener is None:
            self._listener = Listener(lambda: _connect(self.url), callback)
            self._listener.start()


class Backend:
    """The configuration's PostgreSQL ledger: the entry points ledger/__init__.py hands out."""

    def __init__(self, config: "Config") -> None:
        self.config = config
        self.url = config.WHISPER_DB_URL

    def ledger(self, actor: str) -> PostgreSQLLedger:
        return PostgreSQLLedger(self.url, actor, self.config.node_name, self.config.WHISPER_LEASE_SECONDS,
                                pool_size(self.config.worker_processes))

    def describe(self) -> str:
        return f"PostgreSQL {shown_url(self.url)}"

    def prepare(self, actor: str) -> Recovery:
        return prepare(self.url, self.config.node_name, self.config.WHISPER_MAX_ATTEMPTS, actor)

    def prepare_schema(self) -> None:
        prepare_schema(self.url)

    def release_worker(self, worker: str, actor: str) -> Recovery:
        return release_worker(self.url, worker, self.config.WHISPER_MAX_ATTEMPTS, actor)

    def known_jobs(self, ids: Iterable[str]) -> set[str]:
        return known_jobs(self.url, ids)
