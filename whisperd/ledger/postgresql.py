"""The PostgreSQL ledger (the cluster backend): several nodes share one queue, one row per job.

Laid out like sqlite.py (same functions and methods, same order) so that a change to one is
easy to carry to the other. What only a shared ledger needs: claims that skip rows another
node holds (FOR UPDATE SKIP LOCKED), leases on running jobs (the database's clock decides
when one ran out), node heartbeats, and a NOTIFY on every job event (see notify.py).
Times stay ISO-8601 UTC text written by the node, as in SQLite, so a Job reads the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ..config import REPO_DIR
from ..jobs import ACTIVE, TERMINAL, WEBHOOK_DONE, Job, NewJob, Quota, TokenRecord, UploadRecord, now_iso
from .errors import LedgerUnavailable, QuotaExceeded, TokenNameTaken
from .notify import CHANNEL, Listener
from .recovery import Recovery
from .sqlite import TOKEN_LIMITS, fair_position  # plain Python: the same rules on both backends

log = logging.getLogger("whisperd.ledger")
MIGRATIONS_DIR = REPO_DIR / "migrations" / "postgresql"
MIGRATION_LOCK = 0x77687370  # pg_advisory_xact_lock key: one node migrates, the others wait
CLAIM_LOCK = 0x7768636C      # with hashtext(node): one claim at a time per node (its slot count)
WEBHOOK_LOCK = 0x77687768    # one claim of pending webhooks at a time, across the cluster
QUOTA_LOCK = 0x77687175      # with hashtext(owner): one quota check and insert at a time per owner
RETRY_SECONDS = 10.0         # a restarting database: reads and writes wait this long before failing
CONNECT_TIMEOUT = 5.0
# The connection broke or the server is (re)starting: worth trying again on a new connection.
# InternalClientError: a connection the server dropped mid-commit ("cannot switch to state").
CONNECTION_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                     asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InternalClientError)


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


def _run_sync(make: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine to completion from synchronous start-up code (on a thread of its own,
    so that it works both before any event loop exists and inside a running one)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(make())
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="whisperd-ledger-sync")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


async def _connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)


def _count(status: str) -> int:
    """Rows touched, from asyncpg's command tag ("UPDATE 3")."""
    return int(status.rsplit(" ", 1)[-1]) if status and status[-1].isdigit() else 0


# The claim's choice of the next job, per scheduling policy (FOR UPDATE SKIP LOCKED: a row another
# node is claiming right now is passed over, never waited for).
_FIFO_NEXT = "SELECT seq FROM jobs WHERE status='Queued' ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED"
# fair: the oldest queued job of each owner, the owner served least recently first (never
# served counts as longest ago; ties go to the older job), as in sqlite.py.
_FAIR_NEXT = (
    "SELECT j.seq FROM jobs j LEFT JOIN scheduling_turns t ON t.owner = j.owner"
    " WHERE j.status='Queued' AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.status='Queued'"
    " AND o.owner = j.owner AND o.seq < j.seq)"
    " ORDER BY coalesce(t.turn, 0), j.seq LIMIT 1 FOR UPDATE OF j SKIP LOCKED"
)


# --- schema -------------------------------------------------------------------------------


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        found.append((int(path.name[:4]), path.stem, path.read_text(encoding="utf-8")))
    return found


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

    async def run() -> Recovery:
        conn = await _connect(url)
        try:
            await migrate(conn)
            # This node's Processing jobs, and any Queued one whose cancel was pending when a
            # graceful stop put it back (requeued jobs belong to no node).
            report = await _take_back(conn, "(node = $1 OR status = 'Queued')", (node,), max_attempts, actor,
                                      f"node {node} restarted while processing", queued_too=True)
            report.job_rows = await conn.fetchval("SELECT count(*) FROM jobs")
            report.webhooks_pending = await _mark_pending_webhooks(conn, node, actor)
            report.live_tokens = await conn.fetchval(
                "SELECT count(*) FROM api_tokens WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $1)",
                now_iso(),
            )
            report.live_jobs = {
                row[0] for row in await conn.fetch(
                    "SELECT id FROM jobs WHERE delivered_at IS NULL AND expired_at IS NULL"
                    " AND status IN ('Queued', 'Processing', 'Completed')"
                )
            }
            return report
        finally:
            await conn.close()

    try:
        return _run_sync(run)
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        raise _unavailable(url, exc) from None


def release_worker(url: str, worker: str, max_attempts: int, actor: str) -> Recovery:
    """A worker process of this node died: its Processing jobs go back to the queue (or fail as poison)."""

    async def run() -> Recovery:
        conn = await _connect(url)
        try:
            return await _take_back(conn, "worker = $1", (worker,), max_attempts, actor,
                                    f"worker {worker} died while processing")
        finally:
            await conn.close()

    try:
        return _run_sync(run)
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        # The lease will bring the job back anyway; the supervisor must not die of it.
        log.error("could not release worker %s's jobs now (their leases will): %s", worker,
                  _unavailable(url, exc))
        return Recovery()


async def _take_back(conn: asyncpg.Connection, where: str, params: tuple, max_attempts: int, actor: str,
                     why: str, queued_too: bool = False) -> Recovery:
    """Processing jobs matching `where` go back to the queue, fail after max_attempts, or, when
    their cancel was asked for, end Canceled: a crash never undoes a cancel (queued_too: also
    the Queued rows a graceful stop put back while their cancel was pending)."""
    report = Recovery()
    async with conn.transaction():
        stamp = now_iso()
        statuses = "('Processing', 'Queued')" if queued_too else "('Processing')"
        rows = await conn.fetch(
            f"SELECT id, status, attempts, engine_pid, cancel_requested FROM jobs WHERE status IN {statuses}"
            f" AND (status='Processing' OR cancel_requested=1) AND {where}"
            " ORDER BY seq FOR UPDATE SKIP LOCKED",
            *params,
        )
        for row in rows:
            if row["engine_pid"]:
                report.engine_pids[row["id"]] = row["engine_pid"]
            if row["cancel_requested"]:
                await conn.execute(
                    "UPDATE jobs SET status='Canceled', finished_at=$1, error='canceled by the client',"
                    " worker=NULL, engine_pid=NULL, progress=NULL, stage=NULL, lease_until=NULL WHERE id=$2",
                    stamp, row["id"],
                )
                await _event(conn, row["id"], stamp, "canceled", actor,
                             f"{why}; its cancel was asked for, so it ends here")
                report.canceled.append(row["id"])
            elif row["attempts"] >= max_attempts:
                reason = (
                    f"gave up after {row['attempts']} attempts: the server or the engine "
                    "stopped while running this job each time"
                )
                await conn.execute(
                    "UPDATE jobs SET status='Failed', finished_at=$1, error=$2, worker=NULL,"
                    " engine_pid=NULL, progress=NULL, stage=NULL, lease_until=NULL WHERE id=$3",
                    stamp, reason, row["id"],
                )
                await _event(conn, row["id"], stamp, "failed", actor, reason)
                report.poisoned.append(row["id"])
            else:
                await conn.execute(
                    "UPDATE jobs SET status='Queued', started_at=NULL, worker=NULL, node=NULL,"
                    " engine_pid=NULL, progress=NULL, stage=NULL, cancel_requested=0, lease_until=NULL"
                    " WHERE id=$1",
                    row["id"],
                )
                await _event(conn, row["id"], stamp, "requeued", actor, why)
                report.requeued.append(row["id"])
    return report


def known_jobs(url: str, ids: Iterable[str]) -> set[str]:
    """Which of these ids the ledger has a row for (start-up: a directory of a known job that
    ended may go; one of an unknown job is quarantined)."""

    async def run() -> set[str]:
        conn = await _connect(url)
        try:
            rows = await conn.fetch("SELECT id FROM jobs WHERE id = ANY($1::text[])", list(ids))
            return {row[0] for row in rows}
        finally:
            await conn.close()

    try:
        return _run_sync(run)
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        raise _unavailable(url, exc) from None


async def _mark_pending_webhooks(conn: asyncpg.Connection, node: str, actor: str) -> list[str]:
    """Finished jobs of this node whose notice never went out (the node died first): send again.

    Only the jobs this node ran: another node's notices may be under way right now.
    """
    done = ", ".join(f"'{event}'" for event in WEBHOOK_DONE)
    async with conn.transaction():
        ids = [row[0] for row in await conn.fetch(
            "SELECT id FROM jobs WHERE callback_url IS NOT NULL AND expired_at IS NULL AND node = $1"
            f" AND status IN ('Completed', 'Failed', 'Canceled') AND NOT EXISTS (SELECT 1 FROM job_events e"
            f" WHERE e.job_id = jobs.id AND e.event IN ({done})) ORDER BY seq", node
        )]
        stamp = now_iso()
        for job_id in ids:
            await _event(conn, job_id, stamp, "webhook-pending", actor,
                         "the server restarted before the notice was delivered; it is sent again")
    return ids


async def _event(conn: asyncpg.Connection, job_id: str, at: str, event: str, actor: str | None,
                 detail: str | None) -> None:
    # Every event wakes the other nodes' schedulers and waiters (notify.py); PostgreSQL
    # delivers the NOTIFY only when (and if) the transaction commits.
    await conn.execute(
        "WITH e AS (INSERT INTO job_events (job_id, at, event, actor, detail) VALUES ($1, $2, $3, $4, $5))"
        " SELECT pg_notify($6, $3 || ':' || $1)",
        job_id, at, event, actor, detail, CHANNEL,
    )


# --- the asynchronous interface ---------------------------------------------------------


class PostgreSQLLedger:
    """A small connection pool per process, plus one listening connection outside it."""

    shared = True  # other nodes use this ledger too: leases and take-backs apply

    def __init__(self, url: str, actor: str, node: str, lease_seconds: float = 30.0) -> None:
        self.url = url
        self.actor = actor  # host:pid, recorded on the events this process writes
        self.node = node
        self.lease_seconds = lease_seconds
        self._pool: asyncpg.Pool | None = None
        self._listener: Listener | None = None

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=4, timeout=CONNECT_TIMEOUT,
                server_settings={"application_name": f"whisperd {self.node}"[:63]},
            )
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise _unavailable(self.url, exc) from None

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (asyncio.TimeoutError, *CONNECTION_ERRORS):
                pool.terminate()

    # -- helpers

    async def _use(self, action: Callable[[asyncpg.Connection], Awaitable[Any]],
                   retry_for: float = RETRY_SECONDS) -> Any:
        """Run `action(conn)` on a pooled connection; a broken connection or a restarting
        server is tried again (a new connection each time) for `retry_for` seconds."""
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
            except CONNECTION_ERRORS as exc:
                if self._pool is None or loop.time() + delay > deadline:
                    unreachable = LedgerUnavailable(f"the PostgreSQL ledger is unreachable: {exc.__class__.__name__}")
                    unreachable.transient = self._pool is not None  # open, but the database is away: retry later
                    raise unreachable from None
                log.warning("ledger connection lost (%s); trying again", exc.__class__.__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _write(self, work, retry_for: float = RETRY_SECONDS) -> Any:
        """Run `work(conn, now)` inside one transaction."""

        async def action(conn):
            async with conn.transaction():
                return await work(conn, now_iso())

        return await self._use(action, retry_for)

    async def _add_event(self, conn, job_id, at, event, detail=None, actor=None) -> None:
        await _event(conn, job_id, at, event, actor or self.actor, detail)

    async def _fetch_one(self, sql: str, *params: Any) -> asyncpg.Record | None:
        return await self._use(lambda conn: conn.fetchrow(sql, *params))

    async def _fetch_all(self, sql: str, *params: Any) -> list[asyncpg.Record]:
        return await self._use(lambda conn: conn.fetch(sql, *params))

    # -- the interface

    async def submit(self, job: NewJob, detail: str | None = None, quota: Quota | None = None) -> Job:
        async def work(conn, now):
            exists = await conn.fetchrow("SELECT * FROM jobs WHERE id=$1", job.id)
            if exists:  # a retry after a commit whose answer was lost
                return Job.from_row(exists)
            if quota is not None and (quota.max_active or quota.max_audio_seconds):
                await self._check_quota(conn, job, quota)
            row = await conn.fetchrow(
                "INSERT INTO jobs (id, owner, status, created_at, filename, upload_bytes, language,"
                " model, response_format, diarize, prompt, device, device_index, warnings, callback_url,"
                " task, audio_seconds, temperature)"
                " VALUES ($1, $2, 'Queued', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
                " RETURNING *",
                job.id, job.owner, now, job.filename, job.upload_bytes, job.language,
                job.model, job.response_format, int(job.diarize), job.prompt, job.device,
                job.device_index, json.dumps(job.warnings), job.callback_url, job.task, job.audio_seconds,
                job.temperature,
            )
            await self._add_event(conn, job.id, now, "accepted", detail, actor=job.owner)
            return Job.from_row(row)

        return await self._write(work)

    @staticmethod
    async def _check_quota(conn, job: NewJob, quota: Quota) -> None:
        # Inside the inserting transaction, under a per-owner advisory lock held to its commit:
        # no other process of any node can insert for this owner between this count and the
        # INSERT. The same jobs count as in usage(): not those canceled before they ran.
        await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", QUOTA_LOCK, job.owner)
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE status IN ('Queued', 'Processing')) AS active,"
            " coalesce(sum(audio_seconds) FILTER (WHERE created_at >= $1"
            " AND NOT (status='Canceled' AND started_at IS NULL)), 0)::float8 AS seconds"
            " FROM jobs WHERE owner=$2",
            quota.since, job.owner,
        )
        active, seconds = int(row["active"] or 0), float(row["seconds"] or 0.0)
        if quota.max_active and active >= quota.max_active:
            raise QuotaExceeded("max_queued", active)
        adding = job.audio_seconds or 0.0
        if quota.max_audio_seconds and (seconds + adding > quota.max_audio_seconds
                                        or (not adding and seconds >= quota.max_audio_seconds)):
            raise QuotaExceeded("max_audio_seconds", seconds)

    async def claim(self, max_running: int, policy: str = "fifo") -> Job | None:
        """Move the next Queued job no other node is taking to Processing, on this node, if
        fewer than max_running run on this node (a node is a GPU box: its limit is its own).

        fifo: the oldest job. fair: the oldest job of the identity served least recently (as in
        sqlite.py). Every claim, under either policy, records its identity's turn in the same
        transaction, so the order holds across nodes and survives a switch of policy.
        """
        pick = _FAIR_NEXT if policy == "fair" else _FIFO_NEXT

        async def work(conn, now):
            # The worker processes of one node count the same slots: one claim at a time per node.
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", CLAIM_LOCK, self.node)
            running = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE status='Processing' AND node=$1", self.node)
            if running >= max_running:
                return None
            row = await conn.fetchrow(
                "UPDATE jobs SET status='Processing', started_at=$1, attempts=attempts+1,"
                " worker=$2, node=$3, lease_until=now() + make_interval(secs => $4),"
                " progress=0, stage='starting'"
                f" WHERE seq=({pick})"
                " RETURNING *",
                now, self.actor, self.node, float(self.lease_seconds),
            )
            if row is None:
                return None
            job = Job.from_row(row)
            await conn.execute(
                "INSERT INTO scheduling_turns (owner, turn)"
                " VALUES ($1, (SELECT coalesce(max(turn), 0) + 1 FROM scheduling_turns))"
                " ON CONFLICT (owner) DO UPDATE SET turn = EXCLUDED.turn",
                job.owner,
            )
            await self._add_event(conn, job.id, now, "started", f"attempt {job.attempts} on node {self.node}")
            return job

        return await self._write(work)

    async def set_engine_pid(self, job_id: str, pid: int | None) -> None:
        async def work(conn, now):
            await conn.execute("UPDATE jobs SET engine_pid=$1 WHERE id=$2 AND worker=$3", pid, job_id, self.actor)

        await self._write(work)

    async def set_progress(self, job_id: str, progress: float | None, stage: str | None) -> None:
        async def work(conn, now):
            status = await conn.execute(
                "UPDATE jobs SET progress=$1, stage=$2 WHERE id=$3 AND status='Processing' AND worker=$4",
                progress, stage, job_id, self.actor,
            )
            if _count(status):  # event streams on other nodes show it without waiting for their tick
                await conn.execute("SELECT pg_notify($1, 'progress:' || $2)", CHANNEL, job_id)

        await self._write(work)

    async def add_warning(self, job_id: str, warning: str) -> None:
        async def work(conn, now):
            await conn.execute(
                "UPDATE jobs SET warnings=(warnings::jsonb || jsonb_build_array($1::text))::text WHERE id=$2",
                warning, job_id,
            )
            await self._add_event(conn, job_id, now, "warning", warning)

        await self._write(work)

    async def _transition(self, sql: str, job_id: str, event: str, detail: str | None,
                          actor: str | None = None, *params: Any) -> bool:
        """One guarded UPDATE of a job ($1 id, $2 now, $3 this process, then params) plus its
        event row, both or neither; False when the guard in the SQL did not match."""

        async def work(conn, now):
            changed = _count(await conn.execute(sql, job_id, now, self.actor, *params))
            if changed:
                await self._add_event(conn, job_id, now, event, detail, actor=actor)
            return bool(changed)

        return await self._write(work)

    # A Processing job's end is written only by the process that runs it ($3): a node that lost
    # its lease (and the job to another node) must not overwrite what the new runner does.

    async def complete(self, job_id: str, detected_language: str | None) -> bool:
        return await self._transition(
            "UPDATE jobs SET status='Completed', finished_at=$2, detected_language=$4,"
            " progress=100, stage='done', engine_pid=NULL, lease_until=NULL"
            " WHERE id=$1 AND status='Processing' AND worker=$3",
            job_id, "completed", f"language {detected_language}", None, detected_language,
        )

    async def fail(self, job_id: str, reason: str) -> bool:
        return await self._transition(
            "UPDATE jobs SET status='Failed', finished_at=$2, error=$4, engine_pid=NULL,"
            " stage=NULL, lease_until=NULL"
            " WHERE id=$1 AND (status='Queued' OR (status='Processing' AND worker=$3))",
            job_id, "failed", reason, None, reason,
        )

    async def requeue(self, job_id: str, reason: str) -> bool:
        """Put a Processing job back at its original place in the queue."""
        return await self._transition(
            "UPDATE jobs SET status='Queued', started_at=NULL, worker=NULL, node=NULL, engine_pid=NULL,"
            " progress=NULL, stage=NULL, lease_until=NULL WHERE id=$1 AND status='Processing' AND worker=$3"
            " AND $2::text IS NOT NULL",
            job_id, "requeued", reason,
        )

    async def requeue_uncounted(self, job_id: str, reason: str) -> bool:
        """Put a Processing job back in its place without using up the attempt its claim counted
        (the engine died beside it, or was restarted to stop another job)."""
        return await self._transition(
            "UPDATE jobs SET status='Queued', started_at=NULL, worker=NULL, node=NULL, engine_pid=NULL,"
            " progress=NULL, stage=NULL, lease_until=NULL, attempts=greatest(attempts - 1, 0)"
            " WHERE id=$1 AND status='Processing' AND worker=$3 AND $2::text IS NOT NULL",
            job_id, "requeued", reason,
        )

    async def cancel(self, job_id: str, actor: str) -> tuple[str, Job | None]:
        """Cancel a Queued job at once; flag a Processing one for its runner (on any node) to stop.

        Returns ("canceled" | "requested" | "finished" | "missing", job-as-it-was).
        """

        async def work(conn, now):
            row = await conn.fetchrow("SELECT * FROM jobs WHERE id=$1 FOR UPDATE", job_id)
            if row is None:
                return "missing", None
            job = Job.from_row(row)
            if job.status == "Queued":
                await conn.execute(
                    "UPDATE jobs SET status='Canceled', finished_at=$1, error='canceled by the client'"
                    " WHERE id=$2",
                    now, job_id,
                )
                await self._add_event(conn, job_id, now, "canceled", "while queued", actor=actor)
                return "canceled", job
            if job.status == "Processing":
                if not job.cancel_requested:
                    await conn.execute("UPDATE jobs SET cancel_requested=1 WHERE id=$1", job_id)
                    await self._add_event(conn, job_id, now, "cancel-requested", "while processing", actor=actor)
                return "requested", job
            return "finished", job

        return await self._write(work)

    async def mark_canceled(self, job_id: str, detail: str) -> bool:
        """The runner stopped a Processing job whose cancel was requested."""
        return await self._transition(
            "UPDATE jobs SET status='Canceled', finished_at=$2, error='canceled by the client',"
            " engine_pid=NULL, stage=NULL, lease_until=NULL WHERE id=$1 AND status='Processing' AND worker=$3",
            job_id, "canceled", detail,
        )

    async def mark_delivered(self, job_id: str, actor: str) -> bool:
        """Record that the whole result went out, and to whom; only the first caller wins."""
        return await self._transition(
            "UPDATE jobs SET delivered_at=$2, delivered_to=$4 WHERE id=$1 AND status='Completed'"
            " AND delivered_at IS NULL AND expired_at IS NULL AND $3::text IS NOT NULL",
            job_id, "delivered", "result sent in full; files go after the grace window", actor, actor,
        )

    async def checkpoint(self) -> tuple[int, int, int]:
        """SQLite's WAL checkpoint; PostgreSQL checkpoints on its own: nothing to do here."""
        if self._pool is None:
            raise LedgerUnavailable("ledger is not open")
        return 0, 0, 0

    async def expire(self, cutoff_iso: str, limit: int = 500) -> list[str]:
        """Mark finished jobs older than the cutoff as expired; returns their ids."""

        async def work(conn, now):
            rows = await conn.fetch(
                "UPDATE jobs SET expired_at=$1 WHERE seq IN (SELECT seq FROM jobs"
                " WHERE expired_at IS NULL AND finished_at IS NOT NULL AND finished_at < $2"
                " LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING id",
                now, cutoff_iso, limit,
            )
            ids = [row[0] for row in rows]
            for job_id in ids:
                await self._add_event(conn, job_id, now, "expired", "retention period over, files deleted")
            return ids

        return await self._write(work)

    async def get(self, job_id: str) -> Job | None:
        row = await self._fetch_one("SELECT * FROM jobs WHERE id=$1", job_id)
        return Job.from_row(row) if row else None

    async def queue_position(self, job: Job, policy: str = "fifo") -> int:
        """1-based place among Queued jobs (of the whole cluster) in the order `claim(policy=...)` takes them."""
        if policy != "fair":
            row = await self._fetch_one("SELECT count(*) FROM jobs WHERE status='Queued' AND seq <= $1", job.seq)
            return int(row[0]) if row else 0
        row = await self._fetch_one(
            "SELECT count(*) FROM jobs WHERE status='Queued' AND owner=$1 AND seq <= $2", job.owner, job.seq)
        rank = int(row[0]) if row else 0
        if rank == 0:
            return 0
        # Another owner delays this job by at most `rank` jobs: count no further than that.
        owners = await self._fetch_all(
            "SELECT j.owner, least(count(*), $1)::int AS n, min(j.seq) AS head, coalesce(max(t.turn), 0) AS turn"
            " FROM jobs j LEFT JOIN scheduling_turns t ON t.owner = j.owner"
            " WHERE j.status='Queued' GROUP BY j.owner",
            rank,
        )
        return fair_position(job.owner, rank, [(r["owner"], r["n"], r["turn"], r["head"]) for r in owners])

    async def list_jobs(self, owner: str | None, status: str | None, before_seq: int | None,
                        limit: int) -> list[Job]:
        """Jobs newest first: one owner's (None: everyone's), optionally of one status, below a seq."""
        where, params = [], []
        for column, value in (("owner=", owner), ("status=", status), ("seq<", before_seq)):
            if value is not None:
                params.append(value)
                where.append(f"{column}${len(params)}")
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        params.append(limit)
        rows = await self._fetch_all(f"SELECT * FROM jobs{clause} ORDER BY seq DESC LIMIT ${len(params)}", *params)
        return [Job.from_row(row) for row in rows]

    async def usage(self, owner: str | None, day_start: str, window_start: str) -> dict[str, dict[str, Any]]:
        """Per owner (one, or None: all): active jobs, and jobs and audio seconds since each time.

        A job canceled before it ever ran costs nothing and is not counted.
        """
        rows = await self._fetch_all(
            "SELECT owner,"
            " count(*) FILTER (WHERE status IN ('Queued', 'Processing')) AS active,"
            " count(*) FILTER (WHERE created_at >= $1) AS jobs_today,"
            " coalesce(sum(audio_seconds) FILTER (WHERE created_at >= $1), 0)::float8 AS seconds_today,"
            " count(*) FILTER (WHERE created_at >= $2) AS jobs_window,"
            " coalesce(sum(audio_seconds) FILTER (WHERE created_at >= $2), 0)::float8 AS seconds_window"
            " FROM jobs WHERE (created_at >= $2 OR status IN ('Queued', 'Processing'))"
            " AND NOT (status='Canceled' AND started_at IS NULL)"
            " AND ($3::text IS NULL OR owner=$3)"
            " GROUP BY owner ORDER BY owner",
            day_start, window_start, owner,
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
        """Raises when the ledger cannot be written (unreachable, or a read-only standby)."""

        async def work(conn, now):
            await conn.fetchval("SELECT txid_current()")  # refused by a standby: a real write check

        await self._write(work, retry_for=0)

    async def cancel_requests(self) -> list[str]:
        rows = await self._fetch_all(
            "SELECT id FROM jobs WHERE status='Processing' AND cancel_requested=1 AND worker=$1", self.actor)
        return [row[0] for row in rows]

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        rows = await self._fetch_all(
            "SELECT at, event, actor, detail FROM job_events WHERE job_id=$1 ORDER BY id", job_id)
        return [dict(row) for row in rows]

    async def claim_pending_webhooks(self) -> list[Job]:
        """Take the notices a start marked pending; each goes to exactly one process of one node."""

        async def work(conn, now):
            # Serialised: a claim that started before another committed must still see its events.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", WEBHOOK_LOCK)
            rows = await conn.fetch(
                "SELECT j.* FROM jobs j WHERE EXISTS (SELECT 1 FROM job_events p WHERE p.job_id = j.id"
                " AND p.event = 'webhook-pending' AND NOT EXISTS (SELECT 1 FROM job_events r"
                " WHERE r.job_id = j.id AND r.id > p.id AND r.event = 'webhook-resumed')) ORDER BY j.seq"
            )
            jobs = [Job.from_row(row) for row in rows]
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
        row = await self._fetch_one("SELECT * FROM api_tokens WHERE prefix=$1", prefix)
        return TokenRecord.from_row(row) if row else None

    async def live_token_count(self) -> int:
        row = await self._fetch_one(
            "SELECT count(*) FROM api_tokens WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $1)",
            now_iso(),
        )
        return int(row[0]) if row else 0

    async def touch_token(self, token_id: int) -> None:
        async def work(conn, now):
            await conn.execute("UPDATE api_tokens SET last_used_at=$1 WHERE id=$2", now, token_id)

        await self._write(work)

    async def insert_token(self, name: str, prefix: str, algorithm: str, salt: str, digest: str,
                           admin: bool, expires_at: str | None, limits: dict[str, Any] | None = None) -> str:
        """Store a new token's row; returns its creation time. TokenNameTaken if the name is in force.

        `limits`: max_queued, max_audio_minutes_per_day, max_file_size (absent or None: the default)."""
        limits = limits or {}

        async def work(conn, now):
            try:
                async with conn.transaction():  # a savepoint: the outer transaction survives the refusal
                    await conn.execute(
                        "INSERT INTO api_tokens (name, prefix, algorithm, salt, hash, admin, created_at, expires_at,"
                        " max_queued, max_audio_minutes_per_day, max_file_size)"
                        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                        name, prefix, algorithm, salt, digest, int(admin), now, expires_at,
                        _int_or_none(limits.get("max_queued")), _float_or_none(limits.get("max_audio_minutes_per_day")),
                        _int_or_none(limits.get("max_file_size")),
                    )
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "api_tokens_live_name":
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
                return await conn.fetchval(
                    "SELECT 1 FROM api_tokens WHERE name=$1 AND revoked_at IS NULL", name) is not None
            columns = list(limits)
            values = [_float_or_none(limits[c]) if c == "max_audio_minutes_per_day" else _int_or_none(limits[c])
                      for c in columns]
            assignments = ", ".join(f"{column}=${index}" for index, column in enumerate(columns, start=2))
            status = await conn.execute(
                f"UPDATE api_tokens SET {assignments} WHERE name=$1 AND revoked_at IS NULL", name, *values)
            return bool(_count(status))

        return await self._write(work)

    async def revoke_token(self, name: str) -> bool:
        """Revoke the token in force with this name; False when there is none."""

        async def work(conn, now):
            status = await conn.execute(
                "UPDATE api_tokens SET revoked_at=$1 WHERE name=$2 AND revoked_at IS NULL", now, name)
            return bool(_count(status))

        return await self._write(work)

    # -- nodes and leases (the cluster; whisperd/nodes.py drives these)

    async def heartbeat(self, role: str, started_at: str, job_ids: list[str]) -> list[str]:
        """Say this node is alive and renew the leases of the jobs this process runs; returns
        those it no longer holds (taken back by another node: stop them, write nothing)."""

        async def work(conn, now):
            await conn.execute(
                "INSERT INTO nodes (name, role, started_at, last_seen, actor) VALUES ($1, $2, $3, now(), $4)"
                " ON CONFLICT (name) DO UPDATE SET role=EXCLUDED.role, started_at=EXCLUDED.started_at,"
                " last_seen=now(), actor=EXCLUDED.actor",
                self.node, role, started_at, self.actor,
            )
            if not job_ids:
                return []
            rows = await conn.fetch(
                "UPDATE jobs SET lease_until=now() + make_interval(secs => $1)"
                " WHERE id = ANY($2::text[]) AND status='Processing' AND worker=$3 RETURNING id",
                float(self.lease_seconds), job_ids, self.actor,
            )
            held = {row[0] for row in rows}
            return [job_id for job_id in job_ids if job_id not in held]

        return await self._write(work, retry_for=0)  # the caller's loop decides how long to keep trying

    async def take_back_expired(self, max_attempts: int) -> Recovery:
        """Jobs whose lease ran out (their node died or lost the database) go back to the queue,
        counting the attempt they used; past max_attempts they fail."""

        async def action(conn):
            return await _take_back(conn, "lease_until < now()", (), max_attempts, self.actor,
                                    "its node stopped renewing the lease (died, or lost the database)")

        return await self._use(action, retry_for=0)

    async def nodes(self) -> list[dict[str, Any]]:
        """Every node that ever registered: role, start, last heartbeat, jobs it runs now."""
        rows = await self._fetch_all(
            "SELECT n.name, n.role, n.started_at,"
            " to_char(n.last_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS last_seen,"
            " extract(epoch FROM now() - n.last_seen)::float8 AS seconds_since_seen,"
            " (SELECT count(*) FROM jobs j WHERE j.node = n.name AND j.status = 'Processing') AS running_jobs"
            " FROM nodes n ORDER BY n.name"
        )
        return [dict(row) for row in rows]

    async def listen(self, callback: Callable[[str, str | None], None]) -> None:
        """Call callback(event, job_id) for every job event any node writes (and ("reconnected",
        None) after the listening connection came back: anything may have changed meanwhile)."""
        if self._listener is None:
            self._listener = Listener(lambda: _connect(self.url), callback)
            self._listener.start()


    # -- resumable uploads (tus): the rows; the bytes are JobFiles' business

    async def create_upload(self, upload: UploadRecord) -> None:
        async def work(conn, now):
            await conn.execute(
                "INSERT INTO uploads (id, owner, upload_length, upload_offset, filename, metadata,"
                " created_at, updated_at, expires_at) VALUES ($1, $2, $3, 0, $4, $5, $6, $6, $7)",
                upload.id, upload.owner, upload.upload_length, upload.filename, upload.metadata,
                upload.created_at, upload.expires_at,
            )

        await self._write(work)

    async def get_upload(self, upload_id: str) -> UploadRecord | None:
        row = await self._fetch_one("SELECT * FROM uploads WHERE id=$1", upload_id)
        return UploadRecord.from_row(row) if row else None

    async def advance_upload(self, upload_id: str, from_offset: int, to_offset: int) -> bool:
        """Record that the bytes up to to_offset are on disk; False when the offset moved meanwhile
        (another PATCH won, on any node), the upload was used, or it expired."""

        async def work(conn, now):
            status = await conn.execute(
                "UPDATE uploads SET upload_offset=$3, updated_at=$4,"
                " finished_at=CASE WHEN $3 = upload_length THEN $4 END"
                " WHERE id=$1 AND upload_offset=$2 AND job_id IS NULL AND expires_at > $4",
                upload_id, from_offset, to_offset, now,
            )
            return bool(_count(status))

        return await self._write(work)

    async def use_upload(self, upload_id: str, job_id: str) -> bool:
        """Mark a finished upload as becoming this job; only the first caller wins (used once)."""

        async def work(conn, now):
            status = await conn.execute(
                "UPDATE uploads SET job_id=$1, used_at=$2 WHERE id=$3 AND job_id IS NULL"
                " AND upload_offset=upload_length AND expires_at > $2",
                job_id, now, upload_id,
            )
            return bool(_count(status))

        return await self._write(work)

    async def delete_upload(self, upload_id: str) -> bool:
        """tus termination: forget an upload not yet used (False: none such)."""

        async def work(conn, now):
            status = await conn.execute("DELETE FROM uploads WHERE id=$1 AND job_id IS NULL", upload_id)
            return bool(_count(status))

        return await self._write(work)

    async def expire_uploads(self, at_iso: str, limit: int = 500) -> list[str]:
        """Delete the rows whose expires_at has passed (used ones too: their bytes became a job's);
        returns their ids, for their bytes to be deleted."""

        async def work(conn, now):
            rows = await conn.fetch(
                "DELETE FROM uploads WHERE id IN (SELECT id FROM uploads WHERE expires_at <= $1 LIMIT $2"
                " FOR UPDATE SKIP LOCKED) RETURNING id",
                at_iso, limit,
            )
            return [row[0] for row in rows]

        return await self._write(work)

    # live: realtime sessions' usage (issue 26). The lead ports these into the new core.

    async def record_live_session(self, session_id: str, owner: str, started_at: str, ended_at: str,
                                  audio_seconds: float, node: str | None) -> None:
        async def work(conn, now):
            await conn.execute(
                "INSERT INTO live_sessions (id, owner, started_at, ended_at, audio_seconds, node)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
                session_id, owner, started_at, ended_at, float(audio_seconds), node)

        await self._write(work)

    async def live_usage(self, owner: str | None, day_start: str, window_start: str) -> dict[str, dict[str, Any]]:
        """Per owner: live sessions and seconds of live audio since each time."""
        rows = await self._fetch_all(
            "SELECT owner, count(*) FILTER (WHERE started_at >= $1) AS sessions_today,"
            " coalesce(sum(audio_seconds) FILTER (WHERE started_at >= $1), 0) AS seconds_today,"
            " count(*) AS sessions_window, coalesce(sum(audio_seconds), 0) AS seconds_window"
            " FROM live_sessions WHERE started_at >= $2 AND ($3::text IS NULL OR owner=$3) GROUP BY owner",
            day_start, window_start, owner)
        return {row["owner"]: {key: row[key] for key in row.keys() if key != "owner"} for row in rows}

    async def set_live_session_limit(self, name: str, limit: int | None) -> None:
        """token create --max-live-sessions: the token's own maximum (None: the setting's default)."""
        async def work(conn, now):
            await conn.execute("DELETE FROM live_token_limits WHERE name=$1", name)
            if limit is not None:
                await conn.execute("INSERT INTO live_token_limits (name, max_live_sessions) VALUES ($1, $2)",
                                   name, int(limit))

        await self._write(work)

    async def live_session_limit(self, name: str) -> int | None:
        row = await self._fetch_one("SELECT max_live_sessions FROM live_token_limits WHERE name=$1", name)
        return None if row is None else int(row[0])

def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def prepare_schema(url: str) -> None:
    """Create or migrate the ledger only (the admin commands)."""

    async def run() -> None:
        conn = await _connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    try:
        _run_sync(run)
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        raise _unavailable(url, exc) from None
