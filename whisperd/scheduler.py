"""The queue's scheduler: claims the next Queued jobs (fifo or fair, WHISPER_SCHEDULING) from the ledger and runs them.

It is woken by a submission and by a finished job, so a job starts without a polling delay; a
slow tick also picks up what other worker processes freed and cancels asked for elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from .ledger import Ledger, LedgerError
from .runner import JobRunner, RunningJob

log = logging.getLogger("whisperd.scheduler")
OUTCOME_WAIT_SECONDS = 15.0  # at shutdown, how long stopped jobs may retry recording their end


class Scheduler:
    def __init__(self, ledger: Ledger, runner: JobRunner, max_running: int, tick_seconds: float = 1.0,
                 policy: str = "fifo", may_claim: Callable[[], bool] = lambda: True) -> None:
        self.ledger = ledger
        self.policy = policy  # WHISPER_SCHEDULING: the ledger's claim applies it
        self.runner = runner
        self.max_running = max_running
        self.tick_seconds = tick_seconds
        self.running: dict[str, RunningJob] = {}
        self.accepting = True
        self.may_claim = may_claim  # nodes.py: False while this node cannot renew its leases
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        self._loop_task = asyncio.ensure_future(self._loop())

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while self.accepting:
            try:
                await asyncio.wait_for(self._wake.wait(), self.tick_seconds)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._claim_what_fits()
                await self._honour_remote_cancels()
            except LedgerError as exc:  # held or full: the next tick tries again
                log.warning("scheduler pass skipped, the ledger is busy: %s", exc)
            except Exception:  # the loop must survive a bug in one pass
                log.exception("scheduler pass failed; retrying")

    async def _claim_what_fits(self) -> None:
        while self.accepting and self.may_claim() and len(self.running) < self.max_running:
            job = await self.ledger.claim(self.max_running, self.policy)
            if job is None:
                return
            running = RunningJob(job)
            self.running[job.id] = running
            task = asyncio.ensure_future(self._run(running))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, running: RunningJob) -> None:
        # The slot is freed only when run() returns, that is after the job's end is in the
        # ledger (runner.py retries it): the ledger's count of Processing rows and ours agree.
        try:
            await self.runner.run(running)
        finally:
            self.running.pop(running.job.id, None)
            self.wake()

    def stalled(self, limit_seconds: float) -> list[str]:
        """Running jobs whose engine showed no life (progress, CPU time) for limit_seconds."""
        found = []
        for job_id, running in list(self.running.items()):
            quiet = running.quiet_seconds()
            if running.engine is not None and quiet >= limit_seconds:
                found.append(f"job {job_id}: the engine made no progress for {quiet:.0f} s")
        return found

    async def _honour_remote_cancels(self) -> None:
        if not self.running:
            return
        for job_id in await self.ledger.cancel_requests():
            await self.cancel_local(job_id)

    async def cancel_local(self, job_id: str) -> bool:
        """Stop a job this process runs; False when it runs elsewhere (or not at all)."""
        running = self.running.get(job_id)
        if running is None:
            return False
        await running.stop("canceled")
        return True

    async def shutdown(self, grace_seconds: float) -> None:
        """Take no new job; give running ones the grace period, then stop them (they are requeued)."""
        self.accepting = False
        self.wake()
        if self._tasks:
            done, pending = await asyncio.wait(list(self._tasks), timeout=grace_seconds)
            if pending:
                await asyncio.gather(*(r.stop("shutdown") for r in list(self.running.values())))
                done, pending = await asyncio.wait(pending, timeout=OUTCOME_WAIT_SECONDS)
            if pending:
                # The ledger will not take the jobs' ends (held, disk full): leave them Processing,
                # files intact; the next start requeues them.
                self.runner.outcomes.abandon()
                await asyncio.wait(pending)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
