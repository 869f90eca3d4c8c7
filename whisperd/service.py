"""The service one worker process runs: ledger, files, scheduler, waiters and retention, wired.

Its life cycle is here and nowhere else: Service.start() starts its parts in the order of
Service.parts(), Service.stop() drains and stops them in reverse. serve(), the cluster roles
(WHISPER_NODE_ROLE: the parts that run jobs are left out of an api node) and the fast tests
all use these two.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from datetime import datetime
from typing import Any, Awaitable, Callable, Iterator

from tornado.ioloop import PeriodicCallback

from . import metrics
from .identity.auth import Authenticator, Identity, accept_any_token, load_validator
from .config import Config
from .engines import make_engine, worker_threads
from .realtime import registry as realtime_registry
from .errors import Kind, ServiceError
from .faults import crash_point, fail_point
from .fetch import MediaFetcher
from .jobfiles import is_job_id
from .clock import utc_now
from .jobs import Job, NewJob, Quota, TokenRecord
from .identity.limits import Limits, check_usage
from .ledger import Ledger, LedgerError, QuotaExceeded, Recovery, UploadUnusable, open_ledger
from .outcomes import OutcomeRecorder
from .resumable import ResumableUploads
from .nodes import NodeKeeper
from .results import EngineOutputError, build_response
from .retention import Retention, expire_uploads
from .runner import JobRunner
from .scheduler import Scheduler
from .settle import settle
from .storage import StorageWatch
from .store import open_files
from .identity.guard import FailureGuard
from .tasks import spawn
from .identity.tokens import LedgerTokens, prefix_of
from .urlpolicy import PolicyError
from .webhooks import WebhookSender

log = logging.getLogger("whisperd.service")
QUEUE_FULL_RETRY_SECONDS = 30
DATABASE_DRIVERS = ("asyncpg", "sqlite3", "aiosqlite")  # errors of these the ledger should have classified
WAIT_POLL_SECONDS = 0.5  # a waiter whose job runs in another process learns of its end this fast
# Job events (from any node) after which a scheduler may find work: a new job or a freed slot.
WAKES_SCHEDULER = {"accepted", "requeued", "completed", "failed", "canceled", "cancel-requested"}


@dataclass
class Part:
    """One part of the service: started in order by Service.start, stopped in reverse by stop."""

    name: str
    start: Callable[[], Awaitable[None] | None] | None = None
    stop: Callable[[], Awaitable[None] | None] | None = None


async def _call(step: Callable[[], Awaitable[None] | None] | None) -> None:
    if step is not None:
        result = step()
        if result is not None:
            await result


def make_authenticator(config: Config, ledger: Ledger) -> Authenticator:
    """A site's own validator, else the spec's any-token check if asked for, else the ledger's tokens."""
    if not config.ENABLE_AUTHORIZATION:
        return Authenticator(False)
    guard = FailureGuard(config.WHISPER_AUTH_FAILURES_PER_MINUTE)
    if config.WHISPER_TOKEN_VALIDATOR:
        return Authenticator(True, load_validator(config.WHISPER_TOKEN_VALIDATOR), guard=guard)
    if config.WHISPER_API_ALLOW_ANY_TOKEN:
        return Authenticator(True, accept_any_token)
    tokens = LedgerTokens(ledger)
    return Authenticator(True, tokens, tokens.none_exist, guard=guard, prefix_of=prefix_of,
                         verified_before=tokens.verified_before)


class Service:
    """Everything a handler may ask of the server; handlers reach nothing behind it."""

    def __init__(self, config: Config, offline: bool, authenticator: Authenticator | None = None,
                 clock: Callable[[], datetime] = utc_now, shared_engine: str | None = None) -> None:
        self.config = config
        self.clock = clock  # what retention calls "now" (tests move it)
        self.offline = offline
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        self.ledger = open_ledger(config, self.actor)
        self.files = open_files(config)  # local directories or S3 (store/): nothing here knows which
        self.auth = authenticator or make_authenticator(config, self.ledger)
        self.uploads_in_flight = 0  # this process's uploads still streaming (take_upload_slot)
        self.uploads_by_address: dict[str, int] = {}  # a share of the slots per client address
        self.uploads_by_owner: dict[str, int] = {}  # ... and per identity (holes: issue 23)
        # shared_engine: the socket of the box's one engine worker (several HTTP processes).
        self.engine = make_engine(config, offline, shared_engine)
        self.outcomes = OutcomeRecorder()
        # Read-only or full job storage: claim nothing, refuse uploads, until a probe write works.
        self.storage = StorageWatch([self.files.tmp_root, self.files.output_root],
                                    f"{config.node_name}-{os.getpid()}", lambda: self.scheduler.wake(),
                                    self.files.probe)
        self.runner = JobRunner(config, self.ledger, self.files, offline, self.notify, self.delete_job_files,
                                worker_threads(config), self.engine, self.outcomes, self.storage)
        self.keeper = NodeKeeper(config, self.ledger, lambda: self.scheduler.running, lambda: self.scheduler.wake(),
                                 self._taken_back)
        self.scheduler = Scheduler(self.ledger, self.runner, config.max_running, policy=config.WHISPER_SCHEDULING,
                                   may_claim=lambda: self.keeper.connected and self.storage.healthy)
        self.webhooks = WebhookSender(config, self.ledger)
        self.fetcher = MediaFetcher(config)
        self.resumable = ResumableUploads(self.ledger, self.files, config, self.storage_refusal)
        self.draining = False  # set once, by stop(): new requests get 503 from then on
        self.requests_in_flight = 0  # handlers count themselves (request_began/ended): shutdown waits for them
        self._no_requests = asyncio.Event()
        self._no_requests.set()
        self._grace_seconds = 0.0  # what stop() gives running jobs
        self._requests_grace = 0.0  # ... and the answers under way
        self._close_http: Callable[[], Awaitable[None]] | None = None
        self._started: list[Part] = []
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._retention: PeriodicCallback | None = None
        self._retention_lock = asyncio.Lock()  # stop() waits for a pass in flight before closing the ledger
        self.retention = Retention(self.ledger, self.delete_job_files, config.WHISPER_JOB_RETENTION_HOURS, clock)
        self._checkpoint: PeriodicCallback | None = None
        self._checkpointing: asyncio.Task | None = None
        self._grace_timers: dict[str, asyncio.TimerHandle] = {}

    def parts(self) -> list[Part]:
        """The service's parts in start order; stop() goes through them backwards. The requests
        part stops (waits for the answers under way, then closes the HTTP server) only once no
        job runs and the waiters are woken, and before the node and the ledger go."""
        runs_jobs = self.config.runs_jobs  # WHISPER_NODE_ROLE=api: answers, runs nothing
        return [
            Part("ledger", self.ledger.open, self._close_ledger),
            Part("node", self.keeper.start, self.keeper.stop),  # registered before anything is claimed
            Part("requests", None, self._stop_requests),
            Part("webhooks", self._resume_webhooks, self.webhooks.stop),
            Part("waiters", None, self._wake_all_waiters),
            Part("storage", None, self.storage.close),
            *([Part("engine", self._start_engine, self.engine.close),
               # open live sessions get their completed transcripts before the engine goes (docs/realtime.md)
               Part("live", None, lambda: realtime_registry.drain(self, max(self._grace_seconds, 5.0)))]
              if runs_jobs else []),
            Part("notifications", lambda: self.ledger.listen(self._changed_elsewhere), None),  # close() ends them
            *([Part("scheduler", self.scheduler.start, lambda: self.scheduler.shutdown(self._grace_seconds))]
              if runs_jobs else []),
            Part("timers", self._start_timers, self._stop_timers),
        ]

    async def start(self) -> None:
        for part in self.parts():
            await _call(part.start)
            self._started.append(part)

    async def stop(self, grace_seconds: float = 0.0, requests_grace: float = 0.0,
                   close_http: Callable[[], Awaitable[None]] | None = None) -> None:
        """Take no new work (new requests get 503); running jobs get `grace_seconds`, then are
        stopped and requeued; answers under way get `requests_grace`, then `close_http` closes
        the HTTP server; then the node and the ledger close."""
        self.draining = True
        self._grace_seconds, self._requests_grace, self._close_http = grace_seconds, requests_grace, close_http
        while self._started:
            await _call(self._started.pop().stop)

    async def _close_ledger(self) -> None:
        # Last of all: the deliveries of the requests answered just before still delete objects.
        await self.files.close()  # the store's deletions under way end first
        await self.ledger.close()

    def _start_engine(self) -> None:
        # In the background, not awaited: a warm engine imports and loads its model while we
        # serve (a start that fails or hangs is its jobs' to report, and /health's).
        self.engine.start()

    async def _resume_webhooks(self) -> None:
        await self.webhooks.resume(await self.ledger.claim_pending_webhooks())

    def _start_timers(self) -> None:
        interval_ms = self.config.WHISPER_CLEANUP_INTERVAL_HOURS * 3600 * 1000
        self._retention = PeriodicCallback(self.run_retention, interval_ms)
        self._retention.start()
        spawn(self.run_retention(), "retention pass")
        if self.config.WHISPER_DB_CHECKPOINT_SECONDS:
            self._checkpoint = PeriodicCallback(self._start_checkpoint, self.config.WHISPER_DB_CHECKPOINT_SECONDS * 1000)
            self._checkpoint.start()

    async def _stop_timers(self) -> None:
        if self._retention is not None:
            self._retention.stop()
        if self._checkpoint is not None:
            self._checkpoint.stop()
        await self._retention_lock.acquire()  # a pass in flight ends first
        if self._checkpointing is not None:
            await asyncio.gather(self._checkpointing, return_exceptions=True)
        for job_id, timer in list(self._grace_timers.items()):
            timer.cancel()
            self.delete_job_files(job_id, "delivered")  # the grace window ends with this process

    def _wake_all_waiters(self) -> None:
        for events in self._waiters.values():
            for event in events:
                event.set()

    async def _stop_requests(self) -> None:
        still_open = await self.wait_requests(self._requests_grace)
        if still_open:
            log.warning("%d request(s) still open after %.0f s; closing their connections", still_open,
                        self._requests_grace)
        if self._close_http is not None:
            await self._close_http()

    def request_began(self) -> None:
        self.requests_in_flight += 1
        self._no_requests.clear()

    def request_ended(self) -> None:
        self.requests_in_flight -= 1
        if self.requests_in_flight == 0:
            self._no_requests.set()

    async def wait_requests(self, timeout: float) -> int:
        """Wait (woken by the last request's end, not polling) for the requests under way to be
        answered; returns how many are still open."""
        try:
            await asyncio.wait_for(self._no_requests.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return self.requests_in_flight

    def engine_status(self) -> dict[str, Any]:
        """The engine's part of /status (and of a health probe): mode, state, loaded models."""
        return self.engine.status()

    def engine_healthy(self) -> tuple[bool, str | None]:
        """False (with the reason) when the engine cannot run jobs: for a health probe."""
        return self.engine.healthy()

    def problems(self) -> list[str]:
        """What /health must report besides the ledger and the engine command: job ends the
        ledger has not taken, and engines that stopped making progress."""
        found = self.outcomes.pending()
        if self.config.WHISPER_STALL_SECONDS:
            found += self.scheduler.stalled(self.config.WHISPER_STALL_SECONDS)
        return found

    async def run_retention(self) -> None:
        if self._retention_lock.locked():
            return  # a pass is running (or the service is stopping)
        try:
            async with self._retention_lock:
                await self.retention.run_pass()
                await expire_uploads(self.ledger, self.files)
        except Exception:  # retried at the next interval; the failure is logged
            log.exception("retention pass failed")

    async def identify(self, authorization: str | None, address: str | None = None) -> Identity:
        """The caller named by the Authorization header; AuthError, or Throttled after too many failures."""
        return await self.auth.identify(authorization, address)

    def _start_checkpoint(self) -> None:
        # Off the request path: a timer's task; one at a time.
        if self._checkpointing is None or self._checkpointing.done():
            self._checkpointing = spawn(self.checkpoint(), "ledger checkpoint")

    async def checkpoint(self) -> None:
        try:
            busy, wal_pages, copied = await self.ledger.checkpoint()
        except LedgerError as exc:
            log.warning("ledger checkpoint skipped: %s", exc)
            return
        if busy:
            log.info("ledger checkpoint incomplete (readers busy): %d of %d WAL pages copied", copied, wal_pages)
        else:
            log.debug("ledger checkpointed: %d WAL pages", copied)

    # -- submission

    async def check_queue_room(self) -> None:
        """429 while WHISPER_MAX_QUEUED_JOBS jobs wait (0: no cap). Approximate across processes:
        a few uploads racing past a nearly full queue are accepted."""
        cap = self.config.WHISPER_MAX_QUEUED_JOBS
        if not cap:
            return
        queued = (await self.ledger.counts())["Queued"]
        if queued >= cap:
            raise ServiceError(Kind.OVER_LIMIT, f"the queue is full ({queued} jobs waiting, WHISPER_MAX_QUEUED_JOBS={cap}); "
                                    "try again later", QUEUE_FULL_RETRY_SECONDS)

    def take_upload_slot(self, address: str, owner: str | None = None) -> None:
        """Count one more upload streaming in this process (a multipart body, a url= fetch, a tus
        PATCH), or 429: when WHISPER_MAX_PENDING_UPLOADS are, or when this client address or this
        identity holds its share of them already."""
        cap = self.config.WHISPER_MAX_PENDING_UPLOADS
        if self.uploads_in_flight >= cap:
            raise ServiceError(Kind.OVER_LIMIT, f"too many uploads in progress (limit {cap}); try again in a few seconds",
                               5)
        held = self.uploads_by_address.get(address, 0)
        if held >= self.config.uploads_per_address:
            raise ServiceError(Kind.OVER_LIMIT, f"this client address already has {held} upload{'s' if held > 1 else ''} in "
                                    f"progress, its share of the server's {cap} (WHISPER_UPLOAD_SHARE_PER_ADDRESS="
                                    f"{self.config.WHISPER_UPLOAD_SHARE_PER_ADDRESS:g}); wait for one to finish",
                               5)
        mine = self.uploads_by_owner.get(owner, 0) if owner is not None else 0
        if owner is not None and mine >= self.config.uploads_per_token:
            raise ServiceError(Kind.OVER_LIMIT, f"{owner!r} already has {mine} upload{'s' if mine > 1 else ''} in progress, its "
                                    f"share of the server's {cap} (WHISPER_UPLOAD_SHARE_PER_TOKEN="
                                    f"{self.config.WHISPER_UPLOAD_SHARE_PER_TOKEN:g}); wait for one to finish",
                               5)
        self.uploads_in_flight += 1
        self.uploads_by_address[address] = held + 1
        if owner is not None:
            self.uploads_by_owner[owner] = mine + 1

    def release_upload_slot(self, address: str, owner: str | None = None) -> None:
        self.uploads_in_flight -= 1
        for counts, key in ((self.uploads_by_address, address), (self.uploads_by_owner, owner)):
            if key is None:
                continue
            left = counts.get(key, 1) - 1
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)

    def storage_problem(self) -> str | None:
        """For /health: why the job storage cannot be written now (None: it can)."""
        return self.storage.problem()

    def storage_refusal(self, exc: BaseException) -> ServiceError | None:
        """A storage error met while serving a request (read-only, full, I/O): the node stops
        taking work until a probe write succeeds, and the client gets 503 or 507 with
        Retry-After; None for any other error."""
        return self.storage.refusal_for(exc)

    def refusal_for(self, exc: BaseException) -> ServiceError | None:
        """What a request that raised `exc` answers, when that is the box's trouble rather than a
        bug: the job storage refusing writes (503/507), or a database error the ledger let
        through unclassified (503: to a client that is the ledger being away). None otherwise."""
        refusal = self.storage_refusal(exc)
        if refusal is None and type(exc).__module__.split(".")[0] in DATABASE_DRIVERS:
            log.error("a request met a database error the ledger does not classify: %s: %s",
                      exc.__class__.__name__, exc)
            refusal = ServiceError(Kind.UNAVAILABLE, "the job ledger is not available; try again in a moment", 10)
        return refusal

    def check_disk(self) -> None:
        """507 below the floor (not the upload's size: a disk that fills up during the write is refused
        with 507 too, by multipart.py), so that the engine's output still finds room; 503 (or 507 when
        full) while the job storage refuses writes (storage.py)."""
        if not self.storage.healthy:
            raise self.storage.refusal()
        floor_mb = self.config.WHISPER_MIN_FREE_DISK_MB
        free_mb = self.files.free_disk_mb()
        if free_mb < floor_mb:
            raise ServiceError(Kind.STORAGE_FULL, f"the server is short of disk space ({free_mb:.0f} MB free, keeps at least "
                                    f"WHISPER_MIN_FREE_DISK_MB={floor_mb}); try again later")

    def staging_dir(self, job_id: str) -> Path:
        """Where an upload streams to before it is a job (a job it never becomes leaves nothing)."""
        return self.files.staging_dir(job_id)

    def discard_upload(self, job_id: str) -> None:
        """An upload that will not become a job: its staged files go."""
        self.delete_job_files(job_id, "refused")

    def delete_job_files(self, job_id: str, reason: str) -> None:
        """The one way a job's files go, whatever the reason: delivered, canceled, failed, expired,
        refused. Upload, token, engine output, staging and their directories; the row stays."""
        self.files.remove_all(job_id)
        log.debug("job %s: files deleted (%s)", job_id, reason)

    async def check_callback(self, url: str) -> None:
        """400 when the webhook's host is not one the server may call (resolved now, and again at sending)."""
        try:
            await self.webhooks.check_destination(url)
        except PolicyError as exc:
            raise ServiceError(Kind.INVALID, str(exc)) from None

    def resolve_hf_token(self, from_form: str | None) -> str | None:
        """The form's token, else HF_TOKEN, else the token file (spec order)."""
        if from_form:
            return from_form
        if self.config.HF_TOKEN:
            return self.config.HF_TOKEN
        try:
            return Path(self.config.WHISPER_HF_TOKEN_FILE).read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    async def submit(self, new_job: NewJob, hf_token: str | None, quota: Quota | None = None,
                     upload_id: str | None = None) -> Job:
        """Move the staged upload into place and commit the row; only then is the job accepted.

        With a quota, the ledger may refuse the row (QuotaExceeded): the files go, nothing stays.
        upload_id: the tus upload this job is made of, used up in the row's own transaction
        (UploadUnusable when another submission took it first); its bytes go after the commit."""
        try:
            await self.files.publish_upload(new_job.id, hf_token if new_job.diarize else None)
        except OSError as exc:
            refusal = self.storage_refusal(exc)
            if refusal is None:
                raise
            self.delete_job_files(new_job.id, "refused")
            raise refusal from None
        crash_point("upload-committed")
        try:
            fail_point("ledger-submit")
            job = await self.ledger.submit(new_job, detail=f"{new_job.filename}, {new_job.upload_bytes} bytes",
                                           quota=quota, upload_id=upload_id)
        except BaseException as exc:
            self.delete_job_files(new_job.id, "refused")
            if isinstance(exc, Exception) and not isinstance(exc, (ServiceError, QuotaExceeded, UploadUnusable)):
                # The database failed in a way the ledger does not classify: the row may not be
                # written, so the job is not accepted; to the client that is the ledger being away.
                log.error("job %s not accepted: the ledger failed (%s: %s)", new_job.id, exc.__class__.__name__, exc)
                raise ServiceError(Kind.UNAVAILABLE, "the job ledger could not take the job; try again in a moment", 10) from None
            raise
        crash_point("job-accepted")
        if upload_id is not None:
            self.files.remove_resumable(upload_id)  # the job has its own name for those bytes
        metrics.upload_received(new_job.upload_bytes)
        self.scheduler.wake()
        return job

    # -- waiting

    def notify(self, job_id: str) -> None:
        """A job changed state here: wake its waiters and, if it ended, send its webhook."""
        self._wake_waiters(job_id)
        if self.webhooks.enabled:
            spawn(self._after_change(job_id), f"webhook of job {job_id}")

    def _wake_waiters(self, job_id: str) -> None:
        for event in self._waiters.get(job_id, ()):
            event.set()

    def _changed_elsewhere(self, event: str, job_id: str | None) -> None:
        """A NOTIFY from the shared ledger (any node, this one included): wake who cares.

        Webhooks are not sent from here: only the process that ended a job sends its notice.
        """
        if job_id is not None:
            self._wake_waiters(job_id)
        if event in WAKES_SCHEDULER or job_id is None or job_id in self.scheduler.running:
            self.scheduler.wake()  # a new job, a freed slot, or a cancel of a job running here

    def _taken_back(self, report: Recovery) -> None:
        """Jobs of a dead node: the requeued run again anywhere; those that ended (failed as
        poison, or canceled as asked) lose their files (settle), and their waiters learn it."""
        ended = settle(report, lambda job_id: self.delete_job_files(job_id, "ended after its node died"),
                       stop_engines=False)  # that node's engines: not ours to stop
        for job_id in ended:
            self.notify(job_id)

    async def _after_change(self, job_id: str) -> None:
        try:
            job = await self.ledger.get(job_id)
        except Exception:  # the ledger is closing at shutdown
            log.warning("job %s: could not read its end for the webhook", job_id)
            return
        if job is not None and job.finished:
            self.webhooks.job_ended(job)

    @contextmanager
    def _watching(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event that notify(job_id) sets, registered before the caller first looks."""
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[job_id]

    async def wait_change(self, job_id: str, timeout: float) -> None:
        """Sleep until the job changes state in this process, or `timeout` seconds pass."""
        with self._watching(job_id) as event:
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def wait_finished(self, job_id: str, timeout: float | None, known: Job | None = None) -> Job | None:
        """Wait for the job to end; returns it as it stands when it ended or the wait ran out.

        With `known` (the job as accepted), a ledger that cannot be read does not end the wait:
        it is read again until the wait runs out, which then returns the last state seen (a
        sync waiter answers 202 with the job id: the job was accepted, and goes on)."""
        loop = asyncio.get_running_loop()
        deadline = None if not timeout else loop.time() + timeout
        with self._watching(job_id) as event:
            while True:
                try:
                    job = await self.ledger.get(job_id)
                except (LedgerError, ServiceError) as exc:
                    if known is None:
                        raise
                    log.warning("job %s: a waiter could not read its state (%s); waiting on", job_id, exc)
                    job = known
                else:
                    known = job if job is not None else known
                if job is None or job.finished or self.draining:
                    return job
                remaining = WAIT_POLL_SECONDS if deadline is None else min(WAIT_POLL_SECONDS, deadline - loop.time())
                if remaining <= 0:
                    return job
                try:
                    await asyncio.wait_for(event.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
                event.clear()

    # -- reading

    async def job(self, job_id: str) -> Job | None:
        """The job with this id, or None (also for text that is no job id at all)."""
        return await self.ledger.get(job_id) if is_job_id(job_id) else None

    async def queue_counts(self) -> dict[str, int]:
        """Queued and Processing, for /status."""
        return await self.ledger.counts()

    async def queue_counts_and_nodes(self) -> tuple[dict[str, int], list[dict[str, Any]]]:
        """queue_counts() and every node of the cluster, read together (an admin's /status)."""
        return await self.ledger.counts_and_nodes()

    async def status_counts(self) -> dict[str, int]:
        """Jobs by status, for /metrics."""
        return await self.ledger.status_counts()

    async def check_ledger_writable(self) -> None:
        """Raises when the ledger cannot be written (a health probe)."""
        await self.ledger.check_writable()

    async def list_jobs(self, owner: str | None, status: str | None, before_seq: int | None,
                        limit: int) -> list[Job]:
        """Newest first: one owner's jobs (None: everyone's), optionally of one status, below a cursor."""
        return await self.ledger.list_jobs(owner, status, before_seq, limit)

    async def usage(self, owner: str | None, day_start: str, window_start: str) -> dict[str, dict[str, Any]]:
        return await self.ledger.usage(owner, day_start, window_start)

    async def list_tokens(self) -> list[TokenRecord]:
        return await self.ledger.list_tokens()

    async def check_usage(self, owner: str, limits: Limits, adding_seconds: float = 0.0) -> None:
        """LimitExceeded when the caller is over its queue or daily audio limit (limits.py)."""
        await check_usage(self.ledger, owner, limits, adding_seconds)

    async def queue_position(self, job: Job) -> int:
        return self._place(await self.ledger.queue_position(job, self.config.WHISPER_SCHEDULING))

    async def job_and_position(self, job_id: str) -> tuple[Job | None, int | None]:
        """job(job_id) and, when it is Queued, its queue_position: one ledger read for a status."""
        if not is_job_id(job_id):
            return None, None
        job, position = await self.ledger.get_with_position(job_id, self.config.WHISPER_SCHEDULING)
        return job, None if position is None else self._place(position)

    def _place(self, position: int) -> int:
        """The ledger's place among Queued jobs as the client sees it: in rounds of
        MAX_CONCURRENT_JOBS when several run at once."""
        if self.config.ENABLE_CONCURRENCY:
            return math.ceil(position / self.config.MAX_CONCURRENT_JOBS)
        return position

    async def result_of(self, job: Job, response_format: str, identity: str | None = None) -> dict[str, Any]:
        """The result body of a Completed job whose files are still here, or ServiceError."""
        return build_response(await self.engine_result_of(job, identity), response_format, job.warnings)

    async def engine_result_of(self, job: Job, identity: str | None = None) -> dict[str, Any]:
        """WhisperX's JSON of a Completed job whose files are still here, or ServiceError."""
        if job.status in ("Queued", "Processing"):
            raise ServiceError(Kind.CONFLICT, f"job {job.id} is not finished yet (status {job.status}); poll its status URL")
        if job.status == "Failed":
            raise ServiceError(Kind.NO_RESULT, f"transcription failed: {job.error}")
        if job.status == "Canceled":
            raise ServiceError(Kind.GONE, f"job {job.id} was canceled; there is no result")
        if job.delivered_at and not self.in_grace(job, identity):
            raise ServiceError(Kind.GONE, f"the result of job {job.id} was already delivered at {job.delivered_at}; its files are deleted")
        if job.expired_at:
            raise ServiceError(Kind.GONE, f"job {job.id} expired at {job.expired_at} (retention period over); its files are deleted")
        try:
            return await self.files.read_result(job.id)
        except EngineOutputError:
            raise ServiceError(Kind.GONE, f"the result files of job {job.id} are gone") from None

    def in_grace(self, job: Job, identity: str | None) -> bool:
        """A delivered result the same identity may fetch again: its download may have been cut
        short after the server wrote the last byte (WHISPER_RESULT_GRACE_SECONDS)."""
        grace = self.config.WHISPER_RESULT_GRACE_SECONDS
        if not job.delivered_at or not grace or identity is None or identity != job.delivered_to:
            return False
        age = metrics.seconds_since(job.delivered_at)
        return age is not None and age < grace

    async def mark_delivered(self, job: Job, actor: str) -> None:
        """The whole response is written: record the delivery; the files go after the grace window."""
        crash_point("result-sent")
        if job.delivered_at:
            return  # a fetch again within the grace window: recorded the first time
        try:
            recorded = await self.ledger.mark_delivered(job.id, actor)
        except LedgerError as exc:
            # The client has its result; the files stay until retention (nothing is lost).
            log.warning("job %s: delivery not recorded (%s); retention removes its files", job.id, exc)
            return
        crash_point("delivery-recorded")
        if recorded:
            grace = self.config.WHISPER_RESULT_GRACE_SECONDS
            if grace:
                loop = asyncio.get_running_loop()
                self._grace_timers[job.id] = loop.call_later(grace, self._grace_over, job.id)
            else:
                self.delete_job_files(job.id, "delivered")

    def _grace_over(self, job_id: str) -> None:
        self._grace_timers.pop(job_id, None)
        self.delete_job_files(job_id, "delivered")

    async def cancel(self, job_id: str, actor: str) -> tuple[str, Job | None]:
        outcome, job = await self.ledger.cancel(job_id, actor)
        if outcome == "canceled":
            metrics.job_finished("Canceled", None)
            self.delete_job_files(job_id, "canceled")
            self.notify(job_id)
        elif outcome == "requested":
            await self.scheduler.cancel_local(job_id)
            ended = await self.wait_finished(job_id, self.config.WHISPER_KILL_GRACE_SECONDS + 10)
            if ended is not None and ended.status != "Canceled":
                return ("finished" if ended.finished else "pending"), ended
            outcome = "canceled"
        return outcome, job
