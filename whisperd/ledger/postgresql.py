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
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ..config import REPO_DIR
from ..jobs import ACTIVE, TERMINAL, WEBHOOK_DONE, Job, NewJob, TokenRecord, now_iso
from .errors import LedgerUnavailable, TokenNameTaken
from .notify import CHANNEL, Listener
from .recovery import Recovery

log = logging.getLogger("whisperd.ledger")
MIGRATIONS_DIR = REPO_DIR / "migrations" / "postgresql"
MIGRATION_LOCK = 0x77687370  # pg_advisory_xact_lock key: one node migrates, the others wait
CLAIM_LOCK = 0x7768636C      # with hashtext(node): one claim at a time per node (its slot count)
WEBHOOK_LOCK = 0x77687768    # one claim of pending webhooks at a time, across the cluster
RETRY_SECONDS = 10.0         # a restarting database: reads and writes wait this long before failing
CONNECT_TIMEOUT = 5.0
# The connection broke or the server is (re)starting: worth trying again on a new connection.
CONNECTION_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                     asyncpg.exceptions.OperatorInterventionError)


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
            report = await _take_back(conn, "node = $1", (node,), max_attempts, actor,
                                      f"node {node} restarted while processing")
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
                     why: str) -> Recovery:
    """Processing jobs matching `where` go back to the queue, or fail after max_attempts."""
    report = Recovery()
    async with conn.transaction():
        stamp = now_iso()
        rows = await conn.fetch(
            f"SELECT id, attempts, engine_pid FROM jobs WHERE status='Processing' AND {where}"
            " ORDER BY seq FOR UPDATE SKIP LOCKED",
            *params,
        )
        for row in rows:
            if row["engine_pid"]:
                report.engine_pids[row["id"]] = row["engine_pid"]
            if row["attempts"] >= max_attempts:
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
                    raise LedgerUnavailable(f"the PostgreSQL ledger is unreachable: {exc.__class__.__name__}") from None
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

    async def submit(self, job: NewJob, detail: str | None = None) -> None:
        async def work(conn, now):
            exists = await conn.fetchval("SELECT 1 FROM jobs WHERE id=$1", job.id)
            if exists:  # a retry after a commit whose answer was lost
                return
            await conn.execute(
                "INSERT INTO jobs (id, owner, status, created_at, filename, upload_bytes, language,"
                " model, response_format, diarize, prompt, device, device_index, warnings, callback_url)"
                " VALUES ($1, $2, 'Queued', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                job.id, job.owner, now, job.filename, job.upload_bytes, job.language,
                job.model, job.response_format, int(job.diarize), job.prompt, job.device,
                job.device_index, json.dumps(job.warnings), job.callback_url,
            )
            await self._add_event(conn, job.id, now, "accepted", detail, actor=job.owner)

        await self._write(work)

    async def claim(self, max_running: int) -> Job | None:
        """Move the oldest Queued job no other node is taking to Processing, on this node, if
        fewer than max_running run on this node (a node is a GPU box: its limit is its own)."""

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
                " WHERE seq=(SELECT seq FROM jobs WHERE status='Queued' ORDER BY seq LIMIT 1"
                " FOR UPDATE SKIP LOCKED)"
                " RETURNING *",
                now, self.actor, self.node, float(self.lease_seconds),
            )
            if row is None:
                return None
            job = Job.from_row(row)
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
        """Record that the result went out; only the first caller wins (no double delivery)."""
        return await self._transition(
            "UPDATE jobs SET delivered_at=$2 WHERE id=$1 AND status='Completed'"
            " AND delivered_at IS NULL AND expired_at IS NULL AND $3::text IS NOT NULL",
            job_id, "delivered", "files deleted", actor,
        )

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

    async def queue_position(self, job: Job) -> int:
        """1-based place among Queued jobs (of the whole cluster)."""
        row = await self._fetch_one("SELECT count(*) FROM jobs WHERE status='Queued' AND seq <= $1", job.seq)
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
                           admin: bool, expires_at: str | None) -> str:
        """Store a new token's row; returns its creation time. TokenNameTaken if the name is in force."""

        async def work(conn, now):
            try:
                async with conn.transaction():  # a savepoint: the outer transaction survives the refusal
                    await conn.execute(
                        "INSERT INTO api_tokens (name, prefix, algorithm, salt, hash, admin, created_at, expires_at)"
                        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                        name, prefix, algorithm, salt, digest, int(admin), now, expires_at,
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
