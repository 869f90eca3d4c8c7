"""The service one worker process runs: ledger, files, scheduler, waiters and retention, wired."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tornado.ioloop import PeriodicCallback

from .auth import Authenticator, accept_any_token, load_validator
from .config import Config
from .faults import crash_point
from .jobfiles import JobFiles
from .jobs import Job, NewJob
from .ledger import Ledger, open_ledger
from .nodes import NodeKeeper
from .results import EngineOutputError, build_response, load_engine_result
from .retention import expire_old_jobs
from .runner import JobRunner
from .scheduler import Scheduler
from .tokens import LedgerTokens
from .worker_client import EngineWorker
from .webhooks import WebhookSender

log = logging.getLogger("whisperd.service")
WAIT_POLL_SECONDS = 0.5  # a waiter whose job runs in another process learns of its end this fast
# Job events (from any node) after which a scheduler may find work: a new job or a freed slot.
WAKES_SCHEDULER = {"accepted", "requeued", "completed", "failed", "canceled", "cancel-requested"}


class JobError(Exception):
    """A request about a job that cannot be served as asked: HTTP status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def make_authenticator(config: Config, ledger: Ledger) -> Authenticator:
    """A site's own validator, else the spec's any-token check if asked for, else the ledger's tokens."""
    if not config.ENABLE_AUTHORIZATION:
        return Authenticator(False)
    if config.WHISPER_TOKEN_VALIDATOR:
        return Authenticator(True, load_validator(config.WHISPER_TOKEN_VALIDATOR))
    if config.WHISPER_API_ALLOW_ANY_TOKEN:
        return Authenticator(True, accept_any_token)
    tokens = LedgerTokens(ledger)
    return Authenticator(True, tokens, tokens.none_exist)


class Service:
    def __init__(self, config: Config, offline: bool, authenticator: Authenticator | None = None) -> None:
        self.config = config
        self.offline = offline
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        self.ledger = open_ledger(config, self.actor)
        self.files = JobFiles.of(config)
        self.auth = authenticator or make_authenticator(config, self.ledger)
        self.uploads_in_flight = 0
        threads = max(1, (os.cpu_count() or 1) // config.max_running) if config.max_running > 1 else None
        # One warm worker serves every slot (docs/warm-engine.md: one shared model beats one per slot).
        self.worker = EngineWorker(config, offline, config.max_running, threads) \
            if config.WHISPER_ENGINE == "worker" and config.runs_jobs else None
        self.runner = JobRunner(config, self.ledger, self.files, offline, self.notify, threads, self.worker)
        self.scheduler = Scheduler(self.ledger, self.runner, config.max_running)
        self.webhooks = WebhookSender(config, self.ledger)
        self.keeper = NodeKeeper(config, self.ledger, lambda: self.scheduler.running, self.scheduler.wake,
                                 self._taken_back)
        self.scheduler.may_claim = lambda: self.keeper.connected
        self.draining = False
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._retention: PeriodicCallback | None = None
        self._retention_lock = asyncio.Lock()  # stop() waits for a pass in flight before closing the ledger

    async def start(self) -> None:
        await self.ledger.open()
        if self.worker is not None:
            self.worker.start()  # in the background: imports and the default model load while we serve
        await self.webhooks.resume(await self.ledger.claim_pending_webhooks())
        await self.ledger.listen(self._changed_elsewhere)
        if self.config.runs_jobs:  # WHISPER_NODE_ROLE=api: answers, runs nothing
            self.scheduler.start()
        await self.keeper.start()
        interval_ms = self.config.WHISPER_CLEANUP_INTERVAL_HOURS * 3600 * 1000
        self._retention = PeriodicCallback(self.run_retention, interval_ms)
        self._retention.start()
        asyncio.ensure_future(self.run_retention())

    async def stop(self, grace_seconds: float = 0.0) -> None:
        self.draining = True
        if self._retention is not None:
            self._retention.stop()
        await self.scheduler.shutdown(grace_seconds)
        await self._retention_lock.acquire()
        if self.worker is not None:
            await self.worker.close()
        for events in self._waiters.values():
            for event in events:
                event.set()
        await self.webhooks.stop()
        await self.keeper.stop()
        await self.ledger.close()

    def engine_status(self) -> dict[str, Any]:
        """The engine's part of /status (and of a health probe): mode, state, loaded models."""
        if self.worker is None:
            return {"mode": "cli", "state": "ready", "loaded_models": []}
        return self.worker.snapshot()

    def engine_healthy(self) -> tuple[bool, str | None]:
        """False (with the reason) when the worker cannot be started: for a health probe."""
        if self.worker is None or self.worker.healthy():
            return True, None
        return False, self.worker.reason

    async def run_retention(self) -> None:
        if self._retention_lock.locked():
            return  # a pass is running (or the service is stopping)
        try:
            async with self._retention_lock:
                await expire_old_jobs(self.ledger, self.files, self.config.WHISPER_JOB_RETENTION_HOURS)
        except Exception:  # retried at the next interval; the failure is logged
            log.exception("retention pass failed")

    # -- submission

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

    async def submit(self, new_job: NewJob, hf_token: str | None) -> Job:
        """Move the staged upload into place and commit the row; only then is the job accepted."""
        self.files.commit_upload(new_job.id, hf_token if new_job.diarize else None)
        crash_point("upload-committed")
        try:
            await self.ledger.submit(new_job, detail=f"{new_job.filename}, {new_job.upload_bytes} bytes")
        except BaseException:
            self.files.remove_all(new_job.id)
            raise
        crash_point("job-accepted")
        self.scheduler.wake()
        job = await self.ledger.get(new_job.id)
        assert job is not None
        return job

    # -- waiting

    def notify(self, job_id: str) -> None:
        """A job changed state here: wake its waiters and, if it ended, send its webhook."""
        self._wake_waiters(job_id)
        if self.webhooks.enabled:
            asyncio.ensure_future(self._after_change(job_id))

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

    def _taken_back(self, requeued: list[str], poisoned: list[str]) -> None:
        """Jobs of a dead node: the requeued run again anywhere; the failed lose their files."""
        for job_id in poisoned:
            self.files.remove_all(job_id)
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

    async def wait_finished(self, job_id: str, timeout: float | None) -> Job | None:
        """Wait for the job to end; returns it as it stands when it ended or the wait ran out."""
        loop = asyncio.get_running_loop()
        deadline = None if not timeout else loop.time() + timeout
        with self._watching(job_id) as event:
            while True:
                job = await self.ledger.get(job_id)
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

    async def queue_position(self, job: Job) -> int:
        position = await self.ledger.queue_position(job)
        if self.config.ENABLE_CONCURRENCY:
            return math.ceil(position / self.config.MAX_CONCURRENT_JOBS)
        return position

    async def result_of(self, job: Job, response_format: str) -> dict[str, Any]:
        """The result body of a Completed job whose files are still here, or JobError."""
        return build_response(await self.engine_result_of(job), response_format, job.warnings)

    async def engine_result_of(self, job: Job) -> dict[str, Any]:
        """WhisperX's JSON of a Completed job whose files are still here, or JobError."""
        if job.status in ("Queued", "Processing"):
            raise JobError(409, f"job {job.id} is not finished yet (status {job.status}); poll its status URL")
        if job.status == "Failed":
            raise JobError(422, f"transcription failed: {job.error}")
        if job.status == "Canceled":
            raise JobError(410, f"job {job.id} was canceled; there is no result")
        if job.delivered_at:
            raise JobError(410, f"the result of job {job.id} was already delivered at {job.delivered_at}; its files are deleted")
        if job.expired_at:
            raise JobError(410, f"job {job.id} expired at {job.expired_at} (retention period over); its files are deleted")
        try:
            return load_engine_result(self.files.output_dir(job.id))
        except EngineOutputError:
            raise JobError(410, f"the result files of job {job.id} are gone") from None

    async def mark_delivered(self, job: Job, actor: str) -> None:
        """After the result went out: record it and delete every file of the job."""
        crash_point("result-sent")
        await self.ledger.mark_delivered(job.id, actor)
        crash_point("delivery-recorded")
        self.files.remove_all(job.id)

    async def cancel(self, job_id: str, actor: str) -> tuple[str, Job | None]:
        outcome, job = await self.ledger.cancel(job_id, actor)
        if outcome == "canceled":
            self.files.remove_all(job_id)
            self.notify(job_id)
        elif outcome == "requested":
            await self.scheduler.cancel_local(job_id)
            ended = await self.wait_finished(job_id, self.config.WHISPER_KILL_GRACE_SECONDS + 10)
            if ended is not None and ended.status != "Canceled":
                return ("finished" if ended.finished else "pending"), ended
            outcome = "canceled"
        return outcome, job
