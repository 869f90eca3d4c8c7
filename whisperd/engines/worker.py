"""The server's side of the warm engine: starts, feeds, watches and restarts one engine worker process.

The worker (whisperd/engine_worker.py, in the engine venv) speaks JSON lines on its stdin and
stdout. It runs in its own session; stopping it means TERM then KILL to its whole group.

A job's troubles stay its own:
- A cancel or a time-out of a job the worker is running kills the worker (CTranslate2 cannot be
  interrupted safely mid-batch) and a fresh one starts at once; the other jobs it was running
  come back with `retry` and `charge=False` (run again, no attempt counted), and a deliberate
  kill never counts toward the restart back-off. A job still waiting for the worker (while it
  starts, say) is simply dropped: nothing is killed.
- A crash under one job charges that job an attempt. A crash with several jobs in flight
  charges none of them: each becomes a suspect and runs again alone (nothing else runs beside
  it), so the culprit is found and only it is charged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import signal
import time
from collections import deque
from typing import Any

from tornado.iostream import StreamClosedError
from tornado.process import Subprocess

from ..config import Config
from ..languages import AUTO
from ..models import local_model_dir
from ..segment_feed import FEED
from ..tasks import spawn
from .base import (EngineOptions, EngineResult, ProgressCallback, StartedCallback, diarization_request, engine_env,
                   kill_group, killed_reason, last_meaningful_line)

log = logging.getLogger("whisperd.worker")
BACKOFF_SECONDS = (0.5, 1, 2, 5, 10, 30)


class WorkerUnavailable(Exception):
    """The worker could not be started; the message is the reason a job shows."""


def worker_argv(config: Config) -> list[str]:
    if config.WHISPER_WORKER_CMD:
        return shlex.split(config.WHISPER_WORKER_CMD)
    return [config.WHISPER_CMD, "--whisperd-worker"]


def model_spec(config: Config, model: str, device: str, device_index: str, threads: int | None) -> dict[str, Any]:
    local = local_model_dir(config.WHISPER_MODELS_DIR, model)
    compute_type = config.WHISPER_CPU_COMPUTE_TYPE if device == "cpu" else config.WHISPER_CUDA_COMPUTE_TYPE
    return {"model": str(local) if local else model, "model_dir": config.WHISPER_MODELS_DIR, "device": device,
            "device_index": int(device_index), "compute_type": compute_type or "default", "threads": threads or 0,
            "vad": config.WHISPER_VAD}


class WorkerJob:
    """One job for the worker: waits for its turn, is sent, and ends with the worker's answer."""

    def __init__(self, worker: "EngineWorker", job_id: str, message: dict[str, Any]) -> None:
        self.worker = worker
        self.job_id = job_id
        self.message = message
        self.killed_because: str | None = None
        self.on_progress: ProgressCallback | None = None
        self.sent = False
        self.alone = False  # a suspect: runs with nothing beside it
        self.outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    async def run(self, on_progress: ProgressCallback | None = None, timeout: float | None = None) -> EngineResult:
        self.on_progress = on_progress
        submitting = asyncio.ensure_future(self._submit())
        # The time limit counts from the job's sending: waiting for the worker to start or for
        # a suspect ahead of it is not the job's engine time.
        await asyncio.wait([submitting, self.outcome], return_when=asyncio.FIRST_COMPLETED)
        try:
            await asyncio.wait_for(asyncio.shield(self.outcome), timeout)
        except asyncio.TimeoutError:
            await self.stop("timeout")
        submitting.cancel()  # still waiting for its turn only if the job was stopped meanwhile
        result: EngineResult = await self.outcome
        result.killed_because = self.killed_because or result.killed_because
        return result

    async def _submit(self) -> None:
        try:
            await self.worker.submit(self)
        except WorkerUnavailable as exc:
            self.finish(EngineResult(127, stderr_tail=[str(exc)]))
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must end the job, not leave run() waiting
            log.exception("job %s: could not be sent to the engine worker", self.job_id)
            self.finish(EngineResult(1, stderr_tail=["internal error while sending the job to the engine worker"]))

    async def stop(self, because: str) -> None:
        if self.outcome.done():
            return
        self.killed_because = self.killed_because or because
        if not self.sent:  # still waiting for its turn or for the worker to start: nothing to kill
            self.worker.forget(self)
            self.finish(EngineResult(None, killed_because=because))
            return
        await self.worker.kill(f"job {self.job_id} {because}", spare=self)

    def finish(self, result: EngineResult) -> None:
        if not self.outcome.done():
            self.outcome.set_result(result)


class EngineWorker:
    """The box's one long-lived engine process and its life cycle (owned by the only HTTP process,
    or by the engine host that every HTTP process reaches over a socket: engines/shared.py)."""

    mode = "worker"

    def __init__(self, config: Config, offline: bool, jobs: int, threads: int | None,
                 device: tuple[str, str] | None = None) -> None:
        self.config = config
        # The device its preload goes to: one of WHISPER_DEVICES (engines/devices.py), else WHISPER_DEVICE.
        self.device = device or (config.WHISPER_DEVICE, config.WHISPER_DEVICE_INDEX)
        self.times_words = config.WHISPER_WORD_TIMES
        self.offline = offline
        self.jobs = jobs
        self.threads = threads
        self.state = "stopped"  # starting, ready, restarting, failed, stopped
        self.reason: str | None = None
        self.loaded: list[str] = []
        self.started_at: float | None = None
        self.restarts = 0
        self.proc: Subprocess | None = None
        self._inflight: dict[str, WorkerJob] = {}
        self._stderr: deque[str] = deque(maxlen=40)
        self._ready: asyncio.Future | None = None
        self._starting: asyncio.Task | None = None
        self._failures = 0
        self._closed = False
        self._killing: int | None = None  # the pid kill() is stopping: its exit is no crash
        self._killed_for: WorkerJob | None = None
        self._exits: dict[int, asyncio.Future] = {}
        self._waiting: dict[str, WorkerJob] = {}  # not sent yet: waiting for the worker or for their turn
        self._suspects: set[str] = set()  # were in flight when the worker died beside other jobs
        self._turn = asyncio.Condition()
        self._live: dict[int, asyncio.Future] = {}  # live: answers awaited from the live lane, by ref
        self._live_refs = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def snapshot(self) -> dict[str, Any]:
        """What /status shows under "engine"."""
        return {"mode": "worker", "state": self.state, "pid": self.pid, "loaded_models": list(self.loaded),
                "running_jobs": len(self._inflight), "restarts": self.restarts, "reason": self.reason}

    def status(self) -> dict[str, Any]:
        return self.snapshot()

    def healthy(self) -> tuple[bool, str | None]:
        if self.state in ("ready", "starting", "restarting") and self._failures < len(BACKOFF_SECONDS):
            return True, None
        return False, self.reason

    # -- the Engine interface

    async def run(self, job_id: str, opts: EngineOptions, on_progress: ProgressCallback | None = None,
                  on_started: StartedCallback | None = None, timeout: float | None = None) -> EngineResult:
        return await self.run_message(job_id, job_message(self.config, opts), on_progress, timeout)

    async def run_message(self, job_id: str, message: dict[str, Any], on_progress: ProgressCallback | None = None,
                          timeout: float | None = None) -> EngineResult:
        """Run one job line (the shared engine's host receives them ready-made)."""
        job = WorkerJob(self, job_id, with_batch_size(message, self.config.WHISPER_BATCH_SIZE))
        self._waiting[job_id] = job  # from now on a stop finds it
        result = await job.run(on_progress, timeout)
        log.info("job %s: worker answered: code %s %s", job_id, result.returncode,
                 result.killed_because or ("worker died" if result.retry else ""))
        return result

    async def stop(self, job_id: str, because: str) -> None:
        job = self._inflight.get(job_id) or self._waiting.get(job_id)
        if job is not None:
            await job.stop(because)

    # -- life cycle

    def start(self) -> asyncio.Task:
        """Start (or join the start under way); the task ends when the worker said hello."""
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._start())
            # A failed start is reported through state and reason, and to the job that waited.
            self._starting.add_done_callback(lambda task: task.cancelled() or task.exception())
        return self._starting

    async def _start(self) -> None:
        if self._failures:
            self.state = "restarting"
            await asyncio.sleep(BACKOFF_SECONDS[min(self._failures, len(BACKOFF_SECONDS)) - 1])
        if self._closed:
            raise WorkerUnavailable("the server is stopping")
        self.state = "starting"
        self._stderr.clear()
        argv = worker_argv(self.config)
        try:
            proc = Subprocess(argv, stdin=Subprocess.STREAM, stdout=Subprocess.STREAM, stderr=Subprocess.STREAM,
                              env=self._env(), start_new_session=True, close_fds=True)
        except OSError as exc:
            self._failures += 1
            self.state, self.reason = "failed", f"the engine worker could not be started ({exc.strerror})"
            log.error("cannot start the engine worker %s: %s", argv, exc)
            raise WorkerUnavailable(self.reason) from None
        self.proc = proc
        self._ready = asyncio.get_running_loop().create_future()
        exit_future = proc.wait_for_exit(raise_error=False)
        self._exits[proc.pid] = exit_future
        spawn(self._read_stdout(proc), "engine worker stdout reader")
        spawn(self._read_stderr(proc), "engine worker stderr reader")
        spawn(self._watch(proc, exit_future), "engine worker exit watch")
        log.info("engine worker starting, pid %s", proc.pid)
        limit = self.config.WHISPER_WORKER_START_SECONDS
        try:
            said_hello = await asyncio.wait_for(asyncio.shield(self._ready), limit)
        except asyncio.TimeoutError:
            self.reason = f"the engine worker did not start within WHISPER_WORKER_START_SECONDS ({limit:g} s)"
            log.error("%s: killing it", self.reason)
            self._failures += 1
            await self._stop_process(proc)
            raise WorkerUnavailable(self.reason) from None
        if not said_hello and (self._closed or self._killing == proc.pid):
            raise WorkerUnavailable("the engine worker was stopped while starting")  # on purpose: no failure
        if not said_hello:
            self._failures += 1
            self.state = "failed"
            self.reason = f"the engine worker ended while starting: {self._last_stderr() or 'no message'}"
            log.error("%s", self.reason)
            raise WorkerUnavailable(self.reason)
        self.started_at = time.monotonic()
        if self.config.WHISPER_PRELOAD_MODEL:
            spec = model_spec(self.config, self.config.WHISPER_DEFAULT_MODEL, self.device[0], self.device[1],
                              self.threads)
            self._send({"op": "load", **spec})

    def _env(self) -> dict[str, str]:
        return engine_env(self.offline, {
            "WHISPERD_WORKER_JOBS": str(self.jobs),
            "WHISPERD_WORKER_MAX_MODELS": str(self.config.WHISPER_WORKER_MAX_MODELS),
            "WHISPERD_WORKER_IDLE_SECONDS": str(self.config.WHISPER_MODEL_IDLE_SECONDS),
        })

    async def submit(self, job: WorkerJob) -> None:
        """Send the job once the worker runs and it is the job's turn (a suspect goes alone)."""
        self._waiting[job.job_id] = job
        job.alone = job.job_id in self._suspects
        try:
            while True:
                if job.outcome.done():
                    return  # stopped while it waited
                if self.state != "ready" or self.pid is None:
                    # Shielded: a job stopped while it waits must not cancel the start others wait for.
                    await asyncio.shield(self.start())
                    if self.proc is None or self.proc.returncode is not None:
                        raise WorkerUnavailable(self.reason or "the engine worker is not running")
                    continue
                if self._may_send(job):
                    break  # and sent below with no await in between: the turn cannot be taken meanwhile
                async with self._turn:
                    await self._turn.wait_for(lambda: job.outcome.done() or self._may_send(job))
            job.sent = True
            self._inflight[job.job_id] = job
        finally:
            self._waiting.pop(job.job_id, None)
        if job.alone:
            log.warning("job %s: run alone (it was in flight when the engine worker died)", job.job_id)
        self._send({"op": "job", "id": job.job_id, **job.message})

    def _may_send(self, job: WorkerJob) -> bool:
        if any(other.alone for other in self._inflight.values()):
            return False  # a suspect is running: nothing beside it
        if job.alone:
            return not self._inflight
        # Suspects waiting go first: otherwise a steady flow of jobs would keep them waiting forever.
        return not any(other.alone for other in self._waiting.values() if other is not job)

    def forget(self, job: WorkerJob) -> None:
        """A job stopped before it was sent: its turn goes to the next."""
        self._waiting.pop(job.job_id, None)
        self._suspects.discard(job.job_id)
        self._wake_turns()

    def _wake_turns(self) -> None:
        async def notify() -> None:
            async with self._turn:
                self._turn.notify_all()

        asyncio.ensure_future(notify())

    def _ended(self, job: WorkerJob, result: EngineResult) -> None:
        self._inflight.pop(job.job_id, None)
        if not result.retry:
            self._suspects.discard(job.job_id)
        job.finish(result)
        self._wake_turns()

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc is not None
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
        except StreamClosedError:
            log.warning("engine worker's stdin is closed; it is ending")

    async def kill(self, why: str, spare: WorkerJob | None = None) -> None:
        """Stop the worker's whole group to stop `spare`'s job; the other jobs it ran come back to
        be run again at no cost to them; a fresh worker starts right away (no back-off: this was
        no failure)."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        log.warning("killing engine worker pid %s: %s", proc.pid, why)
        self._killing = proc.pid
        self._killed_for = spare
        await self._stop_process(proc)
        if not self._closed:
            self.start()

    async def _stop_process(self, proc: Subprocess) -> None:
        kill_group(proc.pid, signal.SIGTERM)
        exit_future = self._exits[proc.pid]
        try:
            await asyncio.wait_for(asyncio.shield(exit_future), self.config.WHISPER_KILL_GRACE_SECONDS)
        except asyncio.TimeoutError:
            log.warning("engine worker pid %s ignored SIGTERM: killing its group", proc.pid)
        kill_group(proc.pid, signal.SIGKILL)
        await exit_future

    async def close(self) -> None:
        self._closed = True
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        if self.proc is not None and self.proc.returncode is None:
            await self._stop_process(self.proc)
        self.state = "stopped"

    # -- the process's output

    async def _watch(self, proc: Subprocess, exit_future: asyncio.Future) -> None:
        status = await exit_future
        kill_group(proc.pid, signal.SIGKILL)  # whatever it left in its group goes too
        self._exits.pop(proc.pid, None)
        if self.proc is proc:
            self.proc = None
            self.loaded = []
        deliberate = self._closed or self._killing == proc.pid
        signalled = -status if status is not None and status < 0 else None
        how = f"signal {signal.Signals(signalled).name}" if signalled else f"exit status {status}"
        # A signal we did not send says more than the last line printed before it (which is
        # whatever the worker was logging when the kernel stopped it).
        reason = killed_reason(signalled) if signalled and not deliberate else \
            self._last_stderr() or f"the engine worker ended ({how})"
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(False)
        self._live_fail(reason)
        inflight = list(self._inflight.values())
        self._inflight.clear()
        spared = self._killed_for if self._killing == proc.pid else None
        blamed = [job for job in inflight if job.killed_because is None]
        for job in inflight:
            if job.killed_because is not None or job is spared:
                result = EngineResult(None, signalled, [reason])
            elif deliberate:  # stopped for a neighbour's cancel or time-out, or for shutdown
                why = f"the engine worker was restarted to stop job {spared.job_id}" if spared else reason
                result = EngineResult(None, None, [why], retry=True, charge=False)
            elif len(blamed) == 1 or job.alone:
                result = EngineResult(None, signalled, [reason], retry=True)  # it died under this job alone
            else:
                # Several jobs were in flight: charge none; each runs again alone to find the culprit.
                self._suspects.add(job.job_id)
                result = EngineResult(None, signalled, [reason], retry=True, charge=False)
            self._ended(job, result)
        if deliberate:
            return  # kill() starts the next one itself
        if self.state == "ready":  # a death while starting is _start's to report
            self._failures += 1
            self.restarts += 1
            self.state, self.reason = "restarting", f"the engine worker died ({reason})"
            log.error("engine worker pid %s died (%s); restarting", proc.pid, how)
            self.start()

    async def _read_stdout(self, proc: Subprocess) -> None:
        try:
            while True:
                line = await proc.stdout.read_until(b"\n", max_bytes=16 * 1024 * 1024)
                self._on_message(line)
        except StreamClosedError:
            return

    async def _read_stderr(self, proc: Subprocess) -> None:
        try:
            while True:
                line = (await proc.stderr.read_until(b"\n", max_bytes=1024 * 1024)).decode("utf-8", "replace")
                if line.strip():
                    self._stderr.append(line.rstrip())
                    log.debug("worker: %s", line.rstrip())
        except StreamClosedError:
            return

    def _last_stderr(self) -> str | None:
        return last_meaningful_line(self._stderr)

    def _on_message(self, raw: bytes) -> None:
        try:
            message = json.loads(raw)
        except json.JSONDecodeError:
            log.warning("engine worker wrote a line that is not JSON: %r", raw[:200])
            return
        event = message.get("event")
        if event == "live":
            self._live_answer(message)
            return
        if event == "hello":
            self.state, self.reason, self._failures = "ready", None, 0
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(True)
            return
        if event == "models":
            self.loaded = list(message.get("loaded") or [])
            return
        if event == "load_error":
            self.reason = f"preloading the default model failed: {message.get('reason')}"
            log.error("engine worker: %s", self.reason)
            return
        job = self._inflight.get(message.get("id"))
        if job is None:
            return
        if event == "segment":  # stream=true: to a handler of this process waiting on the job
            FEED.publish(job.job_id, int(message.get("index") or 0), str(message.get("text") or ""))
        elif event == "progress" and job.on_progress is not None:
            outcome = job.on_progress(min(100.0, float(message.get("percent", 0))),
                                      str(message.get("stage") or "transcribing")[:40])
            if asyncio.iscoroutine(outcome):
                spawn(outcome, "progress callback")
        elif event == "done":
            log.info("job %s: worker done in %s", job.job_id, message.get("seconds"))
            warnings = [str(w)[:600] for w in message.get("warnings") or []]
            self._ended(job, EngineResult(0, detected_language=message.get("language"), warnings=warnings))
        elif event == "error":
            self._ended(job, EngineResult(1, stderr_tail=[str(message.get("reason") or "the engine worker failed")]))


    # -- live: realtime sessions' passes, on the worker's live lane (engine_worker.py, live_lane.py)

    async def live(self, message: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """Send one live_* op and wait for its answer: {"probs": [...]} or {"text": ...} or
        {"error": ...}. A live op never waits for a batch job's turn: the lane has its own threads."""
        if self.state != "ready" or self.pid is None:
            await asyncio.shield(self.start())
            if self.proc is None or self.proc.returncode is not None:
                raise WorkerUnavailable(self.reason or "the engine worker is not running")
        self._live_refs += 1
        ref = self._live_refs
        future = asyncio.get_running_loop().create_future()
        self._live[ref] = future
        try:
            self._send({**message, "ref": ref})
            return await asyncio.wait_for(future, timeout)
        finally:
            self._live.pop(ref, None)

    def live_forget(self, session: str) -> None:
        if self.pid is not None:
            self._send({"op": "live_end", "session": session})

    def _live_answer(self, message: dict[str, Any]) -> None:
        future = self._live.get(message.get("ref"))
        if future is not None and not future.done():
            future.set_result(message)

    def _live_fail(self, reason: str) -> None:
        for future in list(self._live.values()):
            if not future.done():
                future.set_result({"error": f"the engine worker ended ({reason})"})


def with_batch_size(message: dict[str, Any], default: int) -> dict[str, Any]:
    """The job line with its batch size: the job's own, else `default` (its device's). Filled in
    where the job is placed, so that a line relayed by the shared engine host gets the default of
    the device that runs it there."""
    return message if message.get("batch_size") else {**message, "batch_size": default}


def job_message(config: Config, opts: EngineOptions) -> dict[str, Any]:
    """The job line: the CLI's options as JSON; the HF token only here, never on a command line."""
    message = model_spec(config, opts.model, opts.device, opts.device_index, opts.threads)
    message.update({
        "audio": str(opts.audio), "output_dir": str(opts.output_dir),
        "language": None if opts.language == AUTO else opts.language,
        "prompt": opts.prompt, "align": opts.align, "diarize": opts.diarize,
        "word_times": config.WHISPER_WORD_TIMES, "task": opts.task, "temperature": opts.temperature,
        "batch_size": opts.batch_size,  # None: the default of the device that runs it (with_batch_size)
    })
    if opts.diarize:
        message.update(diarization_request(opts))
    if opts.diarize and opts.hf_token:
        message["hf_token"] = opts.hf_token
    return message


