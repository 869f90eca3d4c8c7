"""The SQL ledger written once: every query, transition, recovery and queue rule of both backends.

A backend (sqlite.py, postgresql.py) subclasses `SqlLedger` and supplies only its dialect: the
SQL fragments that differ (the class attributes below), how a transaction runs (`_write`), how
a read runs (`_read`), locks and notifications, and its connections. Every query here is
written with named placeholders (`:name`); PostgreSQL's dialect turns them into `$1, $2, ...`.

A transaction is `work(tx, now)`: a coroutine over `tx.fetchone / fetchall / execute(sql,
params)` (execute returns the rows touched), run to its end inside one transaction by the
backend, committed when it returns, rolled back when it raises. `now` is the node's clock at
its start (ISO-8601 UTC text, the form every time column but the lease columns holds).
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Protocol

from ..jobs import ACTIVE, TERMINAL, WEBHOOK_DONE, Job, NewJob, Quota, TokenRecord, UploadRecord, now_iso
from .errors import QuotaExceeded, TokenNameTaken, UploadUnusable
from .recovery import Recovery

TOKEN_LIMITS = ("max_queued", "max_audio_minutes_per_day", "max_file_size",  # api_tokens columns
                "max_open_uploads", "max_upload_bytes")  # issue 23, migration 0011
CLAIM, QUOTA, WEBHOOKS = "claim", "quota", "webhooks"  # what `_lock` serialises
Row = Any  # sqlite3.Row or asyncpg.Record: both read by name and by index


class Tx(Protocol):
    """What a transaction's work sees (each backend's adapter of its connection)."""

    def fetchone(self, sql: str, params: dict[str, Any]) -> Awaitable[Row | None]: ...
    def fetchall(self, sql: str, params: dict[str, Any]) -> Awaitable[list[Row]]: ...
    def execute(self, sql: str, params: dict[str, Any]) -> Awaitable[int]: ...


Work = Callable[[Tx, str], Awaitable[Any]]


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


def _active_counts(rows: Iterable[Row]) -> dict[str, int]:
    found = {row[0]: row[1] for row in rows}
    return {"Queued": found.get("Queued", 0), "Processing": found.get("Processing", 0)}


def run_sync(make: Callable[[], Awaitable[Any]]) -> Any:
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


def migration_files(directory: Path) -> list[tuple[int, str, str]]:
    """(version, name, SQL) of each numbered migration in a backend's directory, in order."""
    return [(int(path.name[:4]), path.stem, path.read_text(encoding="utf-8"))
            for path in sorted(directory.glob("[0-9][0-9][0-9][0-9]_*.sql"))]


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _in_list(prefix: str, values: list[Any]) -> tuple[str, dict[str, Any]]:
    """`:p0, :p1, ...` and their parameters, for an IN (...) list."""
    params = {f"{prefix}{index}": value for index, value in enumerate(values)}
    return ", ".join(f":{name}" for name in params), params


_RUN_ENDS = "engine_pid=NULL, lease_until=NULL"  # what every end of a run clears
_BACK_IN_QUEUE = ("status='Queued', started_at=NULL, worker=NULL, node=NULL, lease=NULL, engine_pid=NULL,"
                  " progress=NULL, stage=NULL, lease_until=NULL")


class SqlLedger:
    """Everything the `Ledger` interface promises, on any SQL dialect (see the module doc)."""

    shared = False  # True: other nodes use this ledger too (leases, take-backs, NOTIFY apply)

    # -- the dialect (a backend overrides these) ------------------------------------------
    FIFO_NEXT = ""    # subquery: the seq of the next Queued job, oldest first
    FAIR_NEXT = ""    # subquery: the seq of the oldest job of the owner served least recently
    FAIR_OWNERS = ""  # owner, n (queued, counted up to :rank), head (oldest seq), turn; per owner queued
    NODES = ""        # name, role, started_at, last_seen, seconds_since_seen, running_jobs
    APPEND_WARNING = ""  # the warnings JSON list with :warning appended
    EVENT = ("INSERT INTO job_events (job_id, at, event, actor, detail)"
             " VALUES (:job_id, :at, :event, :actor, :detail)")
    FOR_UPDATE = ""   # a read whose row the transaction then writes: lock it against other nodes
    SKIP_LOCKED = ""  # a batch of rows to change: pass over those another node is changing
    LEASE_UNTIL = "NULL"  # until when a claim or heartbeat holds a job (:lease_seconds from now)
    DB_NOW = ":now"   # nodes.last_seen: the clock that judges heartbeats
    DB_CUTOFF = ""    # '' or: the ISO time :age seconds ago by the database's own clock
    CLAIM_SCOPE = ""  # which Processing rows count against this claimer's max_running
    RESTARTED = "1=1"  # which rows a restart of this node takes back (besides Queued ones being canceled)
    FINISHED_HERE = "1=1"  # which finished jobs' notices a restart of this node sends again
    # The most Queued jobs a point read (_read_point) counts to place a job (None: no bound): a
    # job further back is placed by queue_position(), a general read.
    POINT_COUNT_LIMIT: int | None = None

    def __init__(self, actor: str, node: str, lease_seconds: float = 30.0) -> None:
        self.actor = actor  # host:pid, recorded on the events this process writes
        self.node = node
        self.lease_seconds = lease_seconds

    # -- the mechanics (a backend overrides these) ----------------------------------------

    async def _write(self, work: Work, durable: bool = True, patient: bool = True) -> Any:
        """Run `work(tx, now)` in one transaction. durable=False: may commit without waiting for
        the disk (what a restart resets anyway); patient=False: no retry when the database is
        away (the caller's loop decides)."""
        raise NotImplementedError

    async def _read(self, sql: str, params: dict[str, Any] | None = None) -> list[Row]:
        raise NotImplementedError

    async def _lock(self, tx: Tx, what: str, key: str | None = None) -> None:
        """Serialise `what` (for `key`) until the transaction ends, across processes and nodes
        (a single box's write transactions are serial already)."""

    async def _notify(self, tx: Tx, event: str, job_id: str) -> None:
        """Wake other nodes for a change that writes no event row (a single box: nobody)."""

    def _name_taken(self, exc: BaseException) -> bool:
        """Whether an INSERT failed on the unique name of the tokens in force."""
        raise NotImplementedError

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def checkpoint(self) -> tuple[int, int, int]:
        return 0, 0, 0

    async def check_writable(self) -> None:
        raise NotImplementedError

    async def listen(self, callback: Callable[[str, str | None], None]) -> None:
        return None  # one box: every change is made by this ledger's own processes

    # -- small helpers ------------------------------------------------------------------

    async def _read_one(self, sql: str, params: dict[str, Any] | None = None) -> Row | None:
        rows = await self._read(sql, params)
        return rows[0] if rows else None

    async def _reads(self, *queries: tuple[str, dict[str, Any] | None]) -> list[list[Row]]:
        """Several reads, each one's rows (a backend may run them together)."""
        return [await self._read(sql, params) for sql, params in queries]

    async def _read_point(self, sql: str, params: dict[str, Any]) -> Row | None:
        """_read_one for a read of one row by its key (a status poll): a backend may answer it
        more cheaply than a general read (see SQLiteLedger._read_point)."""
        return await self._read_one(sql, params)

    async def _count(self, sql: str, params: dict[str, Any] | None = None) -> int:
        row = await self._read_one(sql, params)
        return int(row[0] or 0) if row else 0

    async def _add_event(self, tx: Tx, job_id: str, at: str, event: str, detail: str | None = None,
                         actor: str | None = None) -> None:
        await tx.execute(self.EVENT, {"job_id": job_id, "at": at, "event": event,
                                      "actor": actor or self.actor, "detail": detail})

    def _held(self, lease: str | None) -> str:
        """The guard of every write a runner makes to its job: still Processing, by this process,
        under the lease its claim took (a node that lost the job, even to itself, writes nothing)."""
        return "status='Processing' AND worker=:worker" + (" AND lease=:lease" if lease else "")

    async def _transition(self, sql: str, job_id: str, event: str, detail: str | None, *, actor: str | None = None,
                          lease: str | None = None, **params: Any) -> bool:
        """One guarded UPDATE of a job plus its event row, both or neither; False when the guard
        did not match (nothing changed). Bound: :id, :now, :worker, :lease, and params."""

        async def work(tx, now):
            changed = await tx.execute(sql, {"id": job_id, "now": now, "worker": self.actor, "lease": lease,
                                             **params})
            if changed:
                await self._add_event(tx, job_id, now, event, detail, actor=actor)
            return bool(changed)

        return await self._write(work)

    # -- jobs -------------------------------------------------------------------------------

    async def submit(self, job: NewJob, detail: str | None = None, quota: Quota | None = None,
                     upload_id: str | None = None) -> Job:
        """Insert a Queued job (quota checked in the same transaction). upload_id: a finished tus
        upload becomes this job in the same transaction, or UploadUnusable and nothing written."""

        async def work(tx, now):
            exists = await tx.fetchone("SELECT * FROM jobs WHERE id=:id", {"id": job.id})
            if exists:  # a retry after a commit whose answer was lost
                return Job.from_row(exists)
            if quota is not None and (quota.max_active or quota.max_audio_seconds):
                await self._check_quota(tx, job, quota)
            row = await tx.fetchone(
                "INSERT INTO jobs (id, owner, status, created_at, filename, upload_bytes, language,"
                " model, response_format, diarize, prompt, device, device_index, warnings, callback_url,"
                " task, audio_seconds, temperature, batch_size)"
                " VALUES (:id, :owner, 'Queued', :now, :filename, :upload_bytes, :language, :model,"
                " :response_format, :diarize, :prompt, :device, :device_index, :warnings, :callback_url,"
                " :task, :audio_seconds, :temperature, :batch_size) RETURNING *",
                {"id": job.id, "owner": job.owner, "now": now, "filename": job.filename,
                 "upload_bytes": job.upload_bytes, "language": job.language, "model": job.model,
                 "response_format": job.response_format, "diarize": int(job.diarize), "prompt": job.prompt,
                 "device": job.device, "device_index": job.device_index, "warnings": json.dumps(job.warnings),
                 "callback_url": job.callback_url, "task": job.task, "audio_seconds": job.audio_seconds,
                 "temperature": job.temperature, "batch_size": job.batch_size},
            )
            if upload_id is not None and not await self._use_upload(tx, now, upload_id, job.id):
                raise UploadUnusable(upload_id)  # the job's INSERT goes with the rollback
            await self._add_event(tx, job.id, now, "accepted", detail, actor=job.owner)
            return Job.from_row(row)

        return await self._write(work)

    async def _check_quota(self, tx: Tx, job: NewJob, quota: Quota) -> None:
        # Inside the inserting transaction, serialised per owner to its commit: nobody inserts
        # for this owner between this count and the INSERT. The same jobs count as in usage():
        # not those canceled before they ran.
        await self._lock(tx, QUOTA, job.owner)
        row = await tx.fetchone(
            "SELECT coalesce(sum(CASE WHEN status IN ('Queued', 'Processing') THEN 1 ELSE 0 END), 0),"
            " coalesce(sum(CASE WHEN created_at >= :since AND NOT (status='Canceled' AND started_at IS NULL)"
            " THEN audio_seconds END), 0.0) FROM jobs WHERE owner=:owner",
            {"since": quota.since, "owner": job.owner},
        )
        active, seconds = int(row[0] or 0), float(row[1] or 0.0)
        if quota.max_active and active >= quota.max_active:
            raise QuotaExceeded("max_queued", active)
        adding = job.audio_seconds or 0.0
        if quota.max_audio_seconds and (seconds + adding > quota.max_audio_seconds
                                        or (not adding and seconds >= quota.max_audio_seconds)):
            raise QuotaExceeded("max_audio_seconds", seconds)

    async def claim(self, max_running: int, policy: str = "fifo") -> Job | None:
        """Move the next Queued job (no other node is taking) to Processing under a fresh lease,
        if fewer than max_running run here (a node is a GPU box: its limit is its own).

        fifo: the oldest job. fair: the oldest job of the identity served least recently (never
        served counts as longest ago; ties go to the older job). Every claim, under either
        policy, records its identity's turn in the same transaction, so the order holds across
        processes and nodes and survives a switch of policy.
        """
        pick = self.FAIR_NEXT if policy == "fair" else self.FIFO_NEXT

        async def work(tx, now):
            await self._lock(tx, CLAIM, self.node)  # a node's processes count the same slots
            running = await tx.fetchone(f"SELECT count(*) FROM jobs WHERE status='Processing'{self.CLAIM_SCOPE}",
                                        {"node": self.node})
            if running[0] >= max_running:
                return None
            row = await tx.fetchone(
                "UPDATE jobs SET status='Processing', started_at=:now, attempts=attempts+1, worker=:worker,"
                f" node=:node, lease=:lease, lease_until={self.LEASE_UNTIL}, progress=0, stage='starting'"
                f" WHERE seq=({pick}) RETURNING *",
                {"now": now, "worker": self.actor, "node": self.node, "lease": uuid.uuid4().hex,
                 "lease_seconds": float(self.lease_seconds)},
            )
            if row is None:
                return None
            job = Job.from_row(row)
            await tx.execute(
                "INSERT INTO scheduling_turns (owner, turn)"
                " VALUES (:owner, (SELECT coalesce(max(turn), 0) + 1 FROM scheduling_turns))"
                " ON CONFLICT (owner) DO UPDATE SET turn = excluded.turn",
                {"owner": job.owner},
            )
            where = f" on node {self.node}" if self.shared else ""
            await self._add_event(tx, job.id, now, "started", f"attempt {job.attempts}{where}")
            return job

        return await self._write(work, durable=False)

    # A Processing job's writes are made only by the process that runs it, under its lease (_held):
    # a node that lost its lease (and the job to another runner) must not overwrite the new run.

    async def set_engine_pid(self, job_id: str, pid: int | None, lease: str | None = None) -> bool:
        async def work(tx, now):
            return bool(await tx.execute(f"UPDATE jobs SET engine_pid=:pid WHERE id=:id AND {self._held(lease)}",
                                         {"pid": pid, "id": job_id, "worker": self.actor, "lease": lease}))

        return await self._write(work, durable=False)

    async def set_progress(self, job_id: str, progress: float | None, stage: str | None,
                           lease: str | None = None) -> bool:
        async def work(tx, now):
            changed = await tx.execute(
                f"UPDATE jobs SET progress=:progress, stage=:stage WHERE id=:id AND {self._held(lease)}",
                {"progress": progress, "stage": stage, "id": job_id, "worker": self.actor, "lease": lease})
            if changed:  # event streams on other nodes show it without waiting for their tick
                await self._notify(tx, "progress", job_id)
            return bool(changed)

        return await self._write(work, durable=False)

    async def add_warning(self, job_id: str, warning: str, lease: str | None = None) -> bool:
        async def work(tx, now):
            changed = await tx.execute(
                f"UPDATE jobs SET warnings={self.APPEND_WARNING} WHERE id=:id AND {self._held(lease)}",
                {"warning": warning, "id": job_id, "worker": self.actor, "lease": lease})
            if changed:
                await self._add_event(tx, job_id, now, "warning", warning)
            return bool(changed)

        return await self._write(work, durable=False)

    async def complete(self, job_id: str, detected_language: str | None, lease: str | None = None) -> bool:
        return await self._transition(
            "UPDATE jobs SET status='Completed', finished_at=:now, detected_language=:language,"
            f" progress=100, stage='done', {_RUN_ENDS} WHERE id=:id AND {self._held(lease)}",
            job_id, "completed", f"language {detected_language}", lease=lease, language=detected_language,
        )

    async def fail(self, job_id: str, reason: str, lease: str | None = None) -> bool:
        """The job this process runs under `lease` ends Failed; without a lease, a Queued job or
        a Processing one of this process. (A runner always names its lease: a job taken back to
        the queue while its node was frozen is not the runner's to fail.)"""
        guard = self._held(lease) if lease else "(status='Queued' OR status='Processing' AND worker=:worker)"
        return await self._transition(
            f"UPDATE jobs SET status='Failed', finished_at=:now, error=:reason, stage=NULL, {_RUN_ENDS}"
            f" WHERE id=:id AND {guard}",
            job_id, "failed", reason, lease=lease, reason=reason,
        )

    async def requeue(self, job_id: str, reason: str, lease: str | None = None) -> bool:
        """Put a Processing job back at its original place in the queue (its attempt counted)."""
        return await self._transition(
            f"UPDATE jobs SET {_BACK_IN_QUEUE} WHERE id=:id AND {self._held(lease)}",
            job_id, "requeued", reason, lease=lease,
        )

    async def requeue_uncounted(self, job_id: str, reason: str, lease: str | None = None) -> bool:
        """Put a Processing job back in its place without using up the attempt its claim counted
        (a shutdown, the engine dying beside it, or restarted to stop another job)."""
        return await self._transition(
            f"UPDATE jobs SET {_BACK_IN_QUEUE}, attempts=CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END"
            f" WHERE id=:id AND {self._held(lease)}",
            job_id, "requeued", reason, lease=lease,
        )

    async def mark_canceled(self, job_id: str, detail: str, lease: str | None = None) -> bool:
        """The runner stopped a Processing job whose cancel was requested."""
        return await self._transition(
            f"UPDATE jobs SET status='Canceled', finished_at=:now, error='canceled by the client', stage=NULL,"
            f" {_RUN_ENDS} WHERE id=:id AND {self._held(lease)}",
            job_id, "canceled", detail, lease=lease,
        )

    async def holds(self, job_id: str, lease: str | None) -> bool:
        """Whether this process still runs the job under this lease (a runner woken from a freeze
        asks before it acts on its own clock)."""
        return bool(await self._read_one(f"SELECT 1 FROM jobs WHERE id=:id AND {self._held(lease)}",
                                         {"id": job_id, "worker": self.actor, "lease": lease}))

    async def cancel(self, job_id: str, actor: str) -> tuple[str, Job | None]:
        """Cancel a Queued job at once; flag a Processing one for its runner (on any node) to stop.

        Returns ("canceled" | "requested" | "finished" | "missing", job-as-it-was).
        """

        async def work(tx, now):
            row = await tx.fetchone(f"SELECT * FROM jobs WHERE id=:id{self.FOR_UPDATE}", {"id": job_id})
            if row is None:
                return "missing", None
            job = Job.from_row(row)
            if job.status == "Queued":
                await tx.execute("UPDATE jobs SET status='Canceled', finished_at=:now, error='canceled by the client'"
                                 " WHERE id=:id", {"now": now, "id": job_id})
                await self._add_event(tx, job_id, now, "canceled", "while queued", actor=actor)
                return "canceled", job
            if job.status == "Processing":
                if not job.cancel_requested:
                    await tx.execute("UPDATE jobs SET cancel_requested=1 WHERE id=:id", {"id": job_id})
                    await self._add_event(tx, job_id, now, "cancel-requested", "while processing", actor=actor)
                return "requested", job
            return "finished", job

        return await self._write(work)

    async def mark_delivered(self, job_id: str, actor: str) -> bool:
        """Record that the whole result went out, and to whom; only the first caller wins."""
        return await self._transition(
            "UPDATE jobs SET delivered_at=:now, delivered_to=:to WHERE id=:id AND status='Completed'"
            " AND delivered_at IS NULL AND expired_at IS NULL",
            job_id, "delivered", "result sent in full; files go after the grace window", actor=actor, to=actor,
        )

    async def expire(self, cutoff_iso: str, limit: int = 500, older_than: float | None = None) -> list[str]:
        """Mark finished jobs older than the cutoff as expired; returns their ids.

        older_than (seconds): in a cluster the database's clock places the cutoff, so a node
        whose clock runs ahead does not expire the others' results; a single box uses cutoff_iso."""
        cutoff = self.DB_CUTOFF if (older_than is not None and self.DB_CUTOFF) else ":cutoff"

        async def work(tx, now):
            rows = await tx.fetchall(
                "UPDATE jobs SET expired_at=:now WHERE seq IN (SELECT seq FROM jobs"
                f" WHERE expired_at IS NULL AND finished_at IS NOT NULL AND finished_at < {cutoff}"
                f" LIMIT :limit{self.SKIP_LOCKED}) RETURNING id",
                {"now": now, "cutoff": cutoff_iso, "limit": limit, "age": float(older_than or 0.0)},
            )
            ids = [row[0] for row in rows]
            for job_id in ids:
                await self._add_event(tx, job_id, now, "expired", "retention period over, files deleted")
            return ids

        return await self._write(work)

    async def get(self, job_id: str) -> Job | None:
        row = await self._read_point("SELECT * FROM jobs WHERE id=:id", {"id": job_id})
        return Job.from_row(row) if row else None

    async def get_with_position(self, job_id: str, policy: str = "fifo") -> tuple[Job | None, int | None]:
        """The job (None: no such job) and, when it is Queued, its queue_position(job, policy) (else
        None): what a status read shows, the job's row and its place in one read (under "fair",
        the owners' queues are a second), where get() then queue_position() crossed twice."""
        fair = policy == "fair"
        ahead = "SELECT 1 FROM jobs q WHERE q.status='Queued'" + (" AND q.owner=j.owner" if fair else "") + \
            " AND q.seq <= j.seq" + (f" LIMIT {int(self.POINT_COUNT_LIMIT)}" if self.POINT_COUNT_LIMIT else "")
        row = await self._read_point(
            f"SELECT j.*, CASE WHEN j.status='Queued' THEN (SELECT count(*) FROM ({ahead}) AS ahead) END AS place"
            " FROM jobs j WHERE j.id=:id", {"id": job_id})
        if row is None:
            return None, None
        job, place = Job.from_row(row), _int_or_none(row["place"])
        if place is not None and place == self.POINT_COUNT_LIMIT:
            return job, await self.queue_position(job, policy)  # further back than a point read counts
        if fair and place is not None:
            place = await self._fair_position(job, place)
        return job, place

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        """A job's history, oldest first: at, event, actor, detail."""
        rows = await self._read("SELECT at, event, actor, detail FROM job_events WHERE job_id=:id ORDER BY id",
                                {"id": job_id})
        return [dict(zip(("at", "event", "actor", "detail"), row)) for row in rows]

    async def queue_position(self, job: Job, policy: str = "fifo") -> int:
        """1-based place among Queued jobs (of the whole cluster) in the order `claim(policy=...)` takes them."""
        if policy != "fair":
            return await self._count("SELECT count(*) FROM jobs WHERE status='Queued' AND seq <= :seq",
                                     {"seq": job.seq})
        rank = await self._count("SELECT count(*) FROM jobs WHERE status='Queued' AND owner=:owner AND seq <= :seq",
                                 {"owner": job.owner, "seq": job.seq})
        return await self._fair_position(job, rank)

    async def _fair_position(self, job: Job, rank: int) -> int:
        """queue_position under "fair" of the owner's rank-th Queued job (0: it is not Queued)."""
        if rank == 0:
            return 0
        # Another owner delays this job by at most `rank` jobs: count no further than that.
        owners = await self._read(self.FAIR_OWNERS, {"rank": rank})
        return fair_position(job.owner, rank, [(r["owner"], r["n"], r["turn"], r["head"]) for r in owners])

    async def list_jobs(self, owner: str | None, status: str | None, before_seq: int | None,
                        limit: int) -> list[Job]:
        """Jobs newest first: one owner's (None: everyone's), optionally of one status, below a seq."""
        conditions = (("owner=:owner", owner), ("status=:status", status), ("seq<:before", before_seq))
        where = [condition for condition, value in conditions if value is not None]
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self._read(f"SELECT * FROM jobs{clause} ORDER BY seq DESC LIMIT :limit",
                                {"owner": owner, "status": status, "before": before_seq, "limit": limit})
        return [Job.from_row(row) for row in rows]

    async def usage(self, owner: str | None, day_start: str, window_start: str) -> dict[str, dict[str, Any]]:
        """Per owner (one, or None: all): active jobs, and jobs and audio seconds since each time.

        A job canceled before it ever ran costs nothing and is not counted.
        """
        rows = await self._read(
            "SELECT owner,"
            " sum(CASE WHEN status IN ('Queued', 'Processing') THEN 1 ELSE 0 END),"
            " sum(CASE WHEN created_at >= :day THEN 1 ELSE 0 END),"
            " coalesce(sum(CASE WHEN created_at >= :day THEN audio_seconds END), 0.0),"
            " sum(CASE WHEN created_at >= :window THEN 1 ELSE 0 END),"
            " coalesce(sum(CASE WHEN created_at >= :window THEN audio_seconds END), 0.0)"
            " FROM jobs WHERE (created_at >= :window OR status IN ('Queued', 'Processing'))"
            " AND NOT (status='Canceled' AND started_at IS NULL)" + (" AND owner=:owner" if owner is not None else "") +
            " GROUP BY owner ORDER BY owner",
            {"day": day_start, "window": window_start, "owner": owner},
        )
        return {row[0]: {"active": int(row[1]), "jobs_today": int(row[2]), "seconds_today": float(row[3]),
                         "jobs_window": int(row[4]), "seconds_window": float(row[5])} for row in rows}

    COUNTS = "SELECT status, count(*) FROM jobs WHERE status IN ('Queued', 'Processing') GROUP BY status"

    async def counts(self) -> dict[str, int]:
        return _active_counts(await self._read(self.COUNTS))

    async def counts_and_nodes(self) -> tuple[dict[str, int], list[dict[str, Any]]]:
        """counts() and nodes() in one go (an admin's /status): one crossing to SQLite's reader."""
        counted, nodes = await self._reads((self.COUNTS, None), (self.NODES, None))
        return _active_counts(counted), [dict(row) for row in nodes]

    async def status_counts(self) -> dict[str, int]:
        """Rows per status, every status present (0 when none): the metrics' jobs gauge."""
        rows = await self._read("SELECT status, count(*) FROM jobs GROUP BY status")
        found = {row[0]: row[1] for row in rows}
        return {status: found.get(status, 0) for status in ACTIVE + TERMINAL}

    async def cancel_requests(self) -> list[str]:
        rows = await self._read(
            "SELECT id FROM jobs WHERE status='Processing' AND cancel_requested=1 AND worker=:worker",
            {"worker": self.actor})
        return [row[0] for row in rows]

    async def claim_pending_webhooks(self) -> list[Job]:
        """Take the notices a start marked pending; each goes to exactly one process of one node."""

        async def work(tx, now):
            # Serialised: a claim that started before another committed must still see its events.
            await self._lock(tx, WEBHOOKS)
            rows = await tx.fetchall(
                "SELECT j.* FROM jobs j WHERE EXISTS (SELECT 1 FROM job_events p WHERE p.job_id = j.id"
                " AND p.event = 'webhook-pending' AND NOT EXISTS (SELECT 1 FROM job_events r"
                " WHERE r.job_id = j.id AND r.id > p.id AND r.event = 'webhook-resumed')) ORDER BY j.seq", {})
            jobs = [Job.from_row(row) for row in rows]
            for job in jobs:
                await self._add_event(tx, job.id, now, "webhook-resumed", "sending the notice again")
            return jobs

        return await self._write(work)

    async def add_event(self, job_id: str, event: str, detail: str | None = None) -> None:
        async def work(tx, now):
            await self._add_event(tx, job_id, now, event, detail)

        await self._write(work)

    # -- API tokens (the hashing lives in tokens.py; only rows live here) ----------------

    async def token_by_prefix(self, prefix: str) -> TokenRecord | None:
        row = await self._read_one("SELECT * FROM api_tokens WHERE prefix=:prefix", {"prefix": prefix})
        return TokenRecord.from_row(row) if row else None

    async def live_token_count(self) -> int:
        return await self._count(
            "SELECT count(*) FROM api_tokens WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > :now)",
            {"now": now_iso()})

    async def touch_token(self, token_id: int) -> None:
        async def work(tx, now):
            await tx.execute("UPDATE api_tokens SET last_used_at=:now WHERE id=:id", {"now": now, "id": token_id})

        await self._write(work)

    async def insert_token(self, name: str, prefix: str, algorithm: str, salt: str, digest: str,
                           admin: bool, expires_at: str | None, limits: dict[str, Any] | None = None) -> str:
        """Store a new token's row; returns its creation time. TokenNameTaken if the name is in force.

        `limits`: TOKEN_LIMITS (absent or None: the default)."""
        limits = limits or {}

        async def work(tx, now):
            await tx.execute(
                "INSERT INTO api_tokens (name, prefix, algorithm, salt, hash, admin, created_at, expires_at,"
                " max_queued, max_audio_minutes_per_day, max_file_size, max_open_uploads, max_upload_bytes)"
                " VALUES (:name, :prefix, :algorithm, :salt, :hash, :admin, :now, :expires_at, :max_queued,"
                " :max_minutes, :max_file_size, :max_open_uploads, :max_upload_bytes)",
                {"name": name, "prefix": prefix, "algorithm": algorithm, "salt": salt, "hash": digest,
                 "admin": int(admin), "now": now, "expires_at": expires_at,
                 "max_queued": _int_or_none(limits.get("max_queued")),
                 "max_minutes": _float_or_none(limits.get("max_audio_minutes_per_day")),
                 "max_file_size": _int_or_none(limits.get("max_file_size")),
                 "max_open_uploads": _int_or_none(limits.get("max_open_uploads")),
                 "max_upload_bytes": _int_or_none(limits.get("max_upload_bytes"))},
            )
            return now

        try:
            return await self._write(work)
        except Exception as exc:  # the whole transaction was that INSERT: nothing else is lost
            if self._name_taken(exc):
                raise TokenNameTaken(name) from None
            raise

    async def list_tokens(self) -> list[TokenRecord]:
        rows = await self._read("SELECT * FROM api_tokens ORDER BY revoked_at IS NOT NULL, name, id")
        return [TokenRecord.from_row(row) for row in rows]

    async def update_token_limits(self, name: str, limits: dict[str, Any]) -> bool:
        """Set the named limits (None: back to the default) of the token in force; False when none."""
        unknown = set(limits) - set(TOKEN_LIMITS)
        if unknown:
            raise ValueError(f"unknown token limits: {sorted(unknown)}")
        values = {column: _float_or_none(value) if column == "max_audio_minutes_per_day" else _int_or_none(value)
                  for column, value in limits.items()}

        async def work(tx, now):
            if not values:
                return await tx.fetchone("SELECT 1 FROM api_tokens WHERE name=:name AND revoked_at IS NULL",
                                         {"name": name}) is not None
            assignments = ", ".join(f"{column}=:{column}" for column in values)
            return bool(await tx.execute(
                f"UPDATE api_tokens SET {assignments} WHERE name=:name AND revoked_at IS NULL",
                {"name": name, **values}))

        return await self._write(work)

    async def revoke_token(self, name: str) -> bool:
        """Revoke the token in force with this name; False when there is none."""

        async def work(tx, now):
            return bool(await tx.execute(
                "UPDATE api_tokens SET revoked_at=:now WHERE name=:name AND revoked_at IS NULL",
                {"now": now, "name": name}))

        return await self._write(work)

    # -- nodes and leases (the cluster; whisperd/nodes.py drives these) -------------------

    async def heartbeat(self, role: str, started_at: str, job_ids: list[str]) -> list[str]:
        """Say this node is alive and renew the leases of the jobs this process runs; returns
        those it no longer holds (taken back by another node: stop them, write nothing)."""

        async def work(tx, now):
            await tx.execute(
                "INSERT INTO nodes (name, role, started_at, last_seen, actor)"
                f" VALUES (:name, :role, :started_at, {self.DB_NOW}, :actor)"
                " ON CONFLICT (name) DO UPDATE SET role=excluded.role, started_at=excluded.started_at,"
                " last_seen=excluded.last_seen, actor=excluded.actor",
                {"name": self.node, "role": role, "started_at": started_at, "now": now, "actor": self.actor},
            )
            if not self.shared or not job_ids:
                return []  # a single box takes back by process (prepare, release_worker), never by lease
            marks, params = _in_list("j", job_ids)
            rows = await tx.fetchall(
                f"UPDATE jobs SET lease_until={self.LEASE_UNTIL} WHERE id IN ({marks})"
                " AND status='Processing' AND worker=:worker RETURNING id",
                {"lease_seconds": float(self.lease_seconds), "worker": self.actor, **params},
            )
            held = {row[0] for row in rows}
            return [job_id for job_id in job_ids if job_id not in held]

        return await self._write(work, patient=False)  # the caller's loop decides how long to keep trying

    async def take_back_expired(self, max_attempts: int) -> Recovery:
        """Jobs whose lease ran out (their node died or lost the database) go back to the queue,
        counting the attempt they used; past max_attempts they fail. A single box: none."""
        if not self.shared:
            return Recovery()

        async def work(tx, now):
            return await self._take_back(tx, now, "lease_until < now()", {}, max_attempts,
                                         "its node stopped renewing the lease (died, or lost the database)")

        return await self._write(work, patient=False)

    async def nodes(self) -> list[dict[str, Any]]:
        """Every node that ever registered: role, start, last heartbeat, jobs it runs now."""
        return [dict(row) for row in await self._read(self.NODES)]

    async def cluster_identity(self, proposed: str) -> tuple[str, bool]:
        """The ledger's identity, made from `proposed` if it has none yet; (identity, made now).
        The job directories carry it (issue 24), so a node pointed at another directory refuses to start."""

        async def work(tx, now):
            await tx.execute("INSERT INTO cluster_identity (id, identity, created_at, created_by)"
                             " VALUES (1, :identity, :now, :node) ON CONFLICT (id) DO NOTHING",
                             {"identity": proposed, "now": now, "node": self.node})
            row = await tx.fetchone("SELECT identity FROM cluster_identity WHERE id = 1", {})
            return row[0], row[0] == proposed

        return await self._write(work)

    # -- enrolled voices (issue 27): a token's named speaker embeddings, never audio ---------

    async def add_voice(self, owner: str, name: str, embedding: list[float]) -> str | None:
        """Enrol a voice; its created_at, or None when the owner already has one of that name."""

        async def work(tx, now):
            added = await tx.execute(
                "INSERT INTO voices (owner, name, embedding, created_at) VALUES (:owner, :name, :embedding, :now)"
                " ON CONFLICT (owner, name) DO NOTHING",
                {"owner": owner, "name": name, "embedding": json.dumps(embedding), "now": now})
            return now if added else None

        return await self._write(work)

    async def list_voices(self, owner: str) -> list[dict[str, Any]]:
        """The owner's voices, by name: [{name, embedding, created_at}]."""
        rows = await self._read("SELECT name, embedding, created_at FROM voices WHERE owner=:owner ORDER BY name",
                                {"owner": owner})
        return [{"name": row[0], "embedding": json.loads(row[1]), "created_at": row[2]} for row in rows]

    async def delete_voice(self, owner: str, name: str) -> bool:
        async def work(tx, now):
            return bool(await tx.execute("DELETE FROM voices WHERE owner=:owner AND name=:name",
                                         {"owner": owner, "name": name}))

        return await self._write(work)

    async def delete_voices(self, owner: str) -> int:
        """All of an owner's voices (its token was revoked); how many."""

        async def work(tx, now):
            return int(await tx.execute("DELETE FROM voices WHERE owner=:owner", {"owner": owner}) or 0)

        return await self._write(work)

    # -- live sessions (issue 26): usage of ended realtime sessions, per-token session caps ----

    async def record_live_session(self, session_id: str, owner: str, started_at: str, ended_at: str,
                                  audio_seconds: float, node: str | None) -> None:
        async def work(tx, now):
            await tx.execute(
                "INSERT INTO live_sessions (id, owner, started_at, ended_at, audio_seconds, node)"
                " VALUES (:id, :owner, :started, :ended, :seconds, :node) ON CONFLICT (id) DO NOTHING",
                {"id": session_id, "owner": owner, "started": started_at, "ended": ended_at,
                 "seconds": float(audio_seconds), "node": node})

        await self._write(work)

    async def live_usage(self, owner: str | None, day_start: str, window_start: str) -> dict[str, dict[str, Any]]:
        """Per owner (one, or None: all): live sessions and seconds of live audio since each time."""
        rows = await self._read(
            "SELECT owner, sum(CASE WHEN started_at >= :day THEN 1 ELSE 0 END),"
            " coalesce(sum(CASE WHEN started_at >= :day THEN audio_seconds END), 0.0),"
            " count(*), coalesce(sum(audio_seconds), 0.0)"
            " FROM live_sessions WHERE started_at >= :window" + (" AND owner=:owner" if owner is not None else "") +
            " GROUP BY owner",
            {"day": day_start, "window": window_start, "owner": owner})
        return {row[0]: {"sessions_today": int(row[1]), "seconds_today": float(row[2]),
                         "sessions_window": int(row[3]), "seconds_window": float(row[4])} for row in rows}

    async def set_live_session_limit(self, name: str, limit: int | None) -> None:
        """token create --max-live-sessions: the token's own maximum (None: the setting's default)."""

        async def work(tx, now):
            await tx.execute("DELETE FROM live_token_limits WHERE name=:name", {"name": name})
            if limit is not None:
                await tx.execute("INSERT INTO live_token_limits (name, max_live_sessions) VALUES (:name, :limit)",
                                 {"name": name, "limit": int(limit)})

        await self._write(work)

    async def live_session_limit(self, name: str) -> int | None:
        row = await self._read_one("SELECT max_live_sessions FROM live_token_limits WHERE name=:name", {"name": name})
        return None if row is None else int(row[0])

    # -- resumable uploads (tus, issue 17): the rows; the bytes are JobFiles' business ------

    async def create_upload(self, upload: UploadRecord) -> None:
        async def work(tx, now):
            await tx.execute(
                "INSERT INTO uploads (id, owner, upload_length, upload_offset, filename, metadata,"
                " created_at, updated_at, expires_at)"
                " VALUES (:id, :owner, :length, 0, :filename, :metadata, :created, :created, :expires)",
                {"id": upload.id, "owner": upload.owner, "length": upload.upload_length,
                 "filename": upload.filename, "metadata": upload.metadata, "created": upload.created_at,
                 "expires": upload.expires_at},
            )

        await self._write(work)

    async def get_upload(self, upload_id: str) -> UploadRecord | None:
        row = await self._read_one("SELECT * FROM uploads WHERE id=:id", {"id": upload_id})
        return UploadRecord.from_row(row) if row else None

    async def advance_upload(self, upload_id: str, from_offset: int, to_offset: int, *, stored: str | None = None,
                             claim: str | None = None, expires_at: str | None = None) -> bool:
        """Record that the bytes up to to_offset are durable; False when the offset moved meanwhile
        (another PATCH won, on any node), the upload was used, or it expired. stored: the store's
        new record of those bytes (kept as it is when None); claim: the PATCH's claim, let go in
        the same write; expires_at: the new Upload-Expires."""

        async def work(tx, now):
            return bool(await tx.execute(
                "UPDATE uploads SET upload_offset=:to, updated_at=:now,"
                " finished_at=CASE WHEN :to = upload_length THEN :now END,"
                " stored=coalesce(:stored, stored), expires_at=coalesce(:expires, expires_at),"
                " patch_claim=CASE WHEN patch_claim = :claim THEN NULL ELSE patch_claim END,"
                " patch_claim_until=CASE WHEN patch_claim = :claim THEN NULL ELSE patch_claim_until END"
                " WHERE id=:id AND upload_offset=:from AND job_id IS NULL AND expires_at > :now",
                {"id": upload_id, "from": from_offset, "to": to_offset, "now": now, "stored": stored,
                 "claim": claim, "expires": expires_at}))

        return await self._write(work)

    async def claim_upload(self, upload_id: str, claim: str, until: str) -> str | None:
        """Take the one PATCH slot of an upload, cluster-wide, until `until` (renew_upload_claim
        moves it on); None when taken, else the time the PATCH holding it lapses."""

        async def work(tx, now):
            if await tx.execute(
                    "UPDATE uploads SET patch_claim=:claim, patch_claim_until=:until WHERE id=:id AND job_id IS NULL"
                    " AND (patch_claim IS NULL OR patch_claim_until <= :now)",
                    {"id": upload_id, "claim": claim, "until": until, "now": now}):
                return None
            rows = await tx.fetchall("SELECT patch_claim_until FROM uploads WHERE id=:id", {"id": upload_id})
            return (rows[0][0] if rows else None) or now

        return await self._write(work, durable=False)

    async def renew_upload_claim(self, upload_id: str, claim: str, until: str) -> bool:
        """Move a PATCH's claim on; False when it is not this PATCH's any more."""

        async def work(tx, now):
            return bool(await tx.execute("UPDATE uploads SET patch_claim_until=:until WHERE id=:id AND patch_claim=:claim",
                                         {"id": upload_id, "claim": claim, "until": until}))

        return await self._write(work, durable=False)

    async def release_upload_claim(self, upload_id: str, claim: str) -> None:
        async def work(tx, now):
            await tx.execute("UPDATE uploads SET patch_claim=NULL, patch_claim_until=NULL WHERE id=:id AND patch_claim=:claim",
                             {"id": upload_id, "claim": claim})

        await self._write(work, durable=False)

    async def reserve_upload_parts(self, upload_id: str, count: int, limit: int) -> int | None:
        """Take `count` part numbers of an upload for one PATCH, never handed out again; the
        first of them, or None when they would pass `limit` (the store's last part number)."""

        async def work(tx, now):
            rows = await tx.fetchall(
                "UPDATE uploads SET next_part = next_part + :count WHERE id=:id AND next_part + :count <= :limit + 1"
                " RETURNING next_part - :count", {"id": upload_id, "count": count, "limit": limit})
            return int(rows[0][0]) if rows else None

        return await self._write(work)

    async def _use_upload(self, tx: Tx, now: str, upload_id: str, job_id: str) -> bool:
        return bool(await tx.execute(
            "UPDATE uploads SET job_id=:job, used_at=:now WHERE id=:id AND job_id IS NULL"
            " AND upload_offset=upload_length AND expires_at > :now",
            {"job": job_id, "now": now, "id": upload_id}))

    async def use_upload(self, upload_id: str, job_id: str) -> bool:
        """Mark a finished upload as becoming this job; only the first caller wins (used once).
        A submission passes upload_id to submit() instead: used in the job's own transaction."""

        async def work(tx, now):
            return await self._use_upload(tx, now, upload_id, job_id)

        return await self._write(work)

    async def open_uploads(self, owner: str | None) -> tuple[int, int, int]:
        """(count, declared bytes, bytes still to come) of the uploads not yet used nor expired:
        one owner's, or everyone's (None)."""
        where = "" if owner is None else " AND owner=:owner"
        row = await self._read_one(
            "SELECT count(*), coalesce(sum(upload_length), 0), coalesce(sum(upload_length - upload_offset), 0)"
            f" FROM uploads WHERE job_id IS NULL AND expires_at > :now{where}", {"now": now_iso(), "owner": owner})
        return (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)

    async def delete_upload(self, upload_id: str) -> bool:
        """tus termination: forget an upload not yet used (False: none such)."""

        async def work(tx, now):
            return bool(await tx.execute("DELETE FROM uploads WHERE id=:id AND job_id IS NULL", {"id": upload_id}))

        return await self._write(work)

    async def expire_uploads(self, at_iso: str, limit: int = 500) -> list[str]:
        """Delete the rows whose expires_at has passed (used ones too: their bytes became a job's);
        returns their ids, for their bytes to be deleted."""

        async def work(tx, now):
            rows = await tx.fetchall(
                "DELETE FROM uploads WHERE id IN (SELECT id FROM uploads WHERE expires_at <= :at LIMIT :limit"
                f"{self.SKIP_LOCKED}) RETURNING id", {"at": at_iso, "limit": limit})
            return [row[0] for row in rows]

        return await self._write(work)

    # -- start-up and recovery: transactions the backends run synchronously, before any loop ---

    async def _take_back(self, tx: Tx, now: str, where: str, params: dict[str, Any], max_attempts: int,
                         why: str, queued_too: bool = False) -> Recovery:
        """Processing jobs matching `where` go back to the queue, fail after max_attempts, or, when
        their cancel was asked for, end Canceled: a crash never undoes a cancel (queued_too: also
        the Queued rows a graceful stop put back while their cancel was pending)."""
        report = Recovery()
        statuses = "('Processing', 'Queued')" if queued_too else "('Processing')"
        rows = await tx.fetchall(
            f"SELECT id, status, attempts, engine_pid, cancel_requested FROM jobs WHERE status IN {statuses}"
            f" AND (status='Processing' OR cancel_requested=1) AND {where} ORDER BY seq{self.SKIP_LOCKED}",
            params,
        )
        for row in rows:
            job_id = row["id"]
            if row["engine_pid"]:
                report.engine_pids[job_id] = row["engine_pid"]
            if row["cancel_requested"]:
                await tx.execute("UPDATE jobs SET status='Canceled', finished_at=:now, error='canceled by the client',"
                                 f" worker=NULL, lease=NULL, progress=NULL, stage=NULL, {_RUN_ENDS} WHERE id=:id",
                                 {"now": now, "id": job_id})
                await self._add_event(tx, job_id, now, "canceled", f"{why}; its cancel was asked for, so it ends here")
                report.canceled.append(job_id)
            elif row["attempts"] >= max_attempts:
                reason = (f"gave up after {row['attempts']} attempts: the server or the engine "
                          "stopped while running this job each time")
                await tx.execute("UPDATE jobs SET status='Failed', finished_at=:now, error=:reason, worker=NULL,"
                                 f" lease=NULL, progress=NULL, stage=NULL, {_RUN_ENDS} WHERE id=:id",
                                 {"now": now, "reason": reason, "id": job_id})
                await self._add_event(tx, job_id, now, "failed", reason)
                report.poisoned.append(job_id)
            else:
                await tx.execute(f"UPDATE jobs SET {_BACK_IN_QUEUE} WHERE id=:id", {"id": job_id})
                await self._add_event(tx, job_id, now, "requeued", why)
                report.requeued.append(job_id)
        return report

    async def _recover_at_start(self, tx: Tx, now: str, max_attempts: int) -> Recovery:
        """A (re)start: take back what this node's previous run left Processing (and Queued jobs
        whose cancel a graceful stop left pending), and report what the ledger holds."""
        why = f"node {self.node} restarted while processing" if self.shared else "server restarted while processing"
        report = await self._take_back(tx, now, self.RESTARTED, {"node": self.node}, max_attempts, why,
                                       queued_too=True)
        # The tus PATCHes of this node's previous life died with it: their claims ("<node>/<id>")
        # go now, not CLAIM_SECONDS later (a client resuming at once is not told to wait).
        prefix = f"{self.node}/"
        await tx.execute("UPDATE uploads SET patch_claim=NULL, patch_claim_until=NULL"
                         " WHERE substr(patch_claim, 1, :n) = :prefix", {"n": len(prefix), "prefix": prefix})
        report.job_rows = int((await tx.fetchone("SELECT count(*) FROM jobs", {}))[0])
        report.webhooks_pending = await self._mark_pending_webhooks(tx, now)
        report.live_tokens = int((await tx.fetchone(
            "SELECT count(*) FROM api_tokens WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > :now)",
            {"now": now}))[0])
        report.live_jobs = {row[0] for row in await tx.fetchall(
            "SELECT id FROM jobs WHERE delivered_at IS NULL AND expired_at IS NULL"
            " AND status IN ('Queued', 'Processing', 'Completed')", {})}
        return report

    async def _release_worker(self, tx: Tx, now: str, worker: str, max_attempts: int) -> Recovery:
        return await self._take_back(tx, now, "worker = :worker", {"worker": worker}, max_attempts,
                                     f"worker {worker} died while processing")

    async def _mark_pending_webhooks(self, tx: Tx, now: str) -> list[str]:
        """Finished jobs (of this node) whose notice never went out (it died first): send again.

        Only at a start, before any worker exists, so a delivery still under way in a live
        worker is never taken for an abandoned one (and never another node's)."""
        done = ", ".join(f"'{event}'" for event in WEBHOOK_DONE)
        ids = [row[0] for row in await tx.fetchall(
            f"SELECT id FROM jobs WHERE callback_url IS NOT NULL AND expired_at IS NULL AND {self.FINISHED_HERE}"
            f" AND status IN ('Completed', 'Failed', 'Canceled') AND NOT EXISTS (SELECT 1 FROM job_events e"
            f" WHERE e.job_id = jobs.id AND e.event IN ({done})) ORDER BY seq", {"node": self.node})]
        for job_id in ids:
            await self._add_event(tx, job_id, now, "webhook-pending",
                                  "the server restarted before the notice was delivered; it is sent again")
        return ids

    @staticmethod
    async def _known_jobs(tx: Tx, now: str, ids: Iterable[str]) -> set[str]:
        """Which of these ids the ledger has a row for (start-up: a directory of a known job that
        ended may go; one of an unknown job is quarantined)."""
        wanted, found = list(ids), set()
        for start in range(0, len(wanted), 500):
            marks, params = _in_list("i", wanted[start:start + 500])
            found.update(row[0] for row in await tx.fetchall(f"SELECT id FROM jobs WHERE id IN ({marks})", params))
        return found
