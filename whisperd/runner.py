"""Runs one claimed job through the engine and records how it ended; never leaves it in limbo."""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from . import capabilities, metrics
from .config import Config
from .engine import EngineOptions, EngineProcess, EngineResult, build_argv, build_env
from .faults import crash_point
from .jobfiles import JobFiles
from .languages import AUTO
from .jobs import Job
from .ledger import Ledger
from .nodes import ABANDONED
from .results import EngineOutputError, load_engine_result, write_engine_result
from .worker_client import EngineWorker, WorkerJob, job_message

log = logging.getLogger("whisperd.runner")
PROGRESS_EVERY_SECONDS = 1.0


class RunningJob:
    """A job this process is running; the handle through which it is canceled or stopped."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.engine: EngineProcess | WorkerJob | None = None
        self.stop_reason: str | None = None
        self.t_start: float | None = None

    def ended(self, status: str) -> None:
        metrics.job_finished(status, None if self.t_start is None else time.monotonic() - self.t_start)

    async def stop(self, because: str) -> None:
        self.stop_reason = self.stop_reason or because
        if self.engine is not None:
            await self.engine.stop(because)


class JobRunner:
    def __init__(self, config: Config, ledger: Ledger, files: JobFiles, offline: bool,
                 notify: Callable[[str], None], threads: int | None, worker: EngineWorker | None = None) -> None:
        self.config = config
        self.worker = worker  # None: the spec's CLI per job (WHISPER_ENGINE=cli)
        self.ledger = ledger
        self.files = files
        self.offline = offline
        self.notify = notify
        self.threads = threads

    async def run(self, running: RunningJob) -> None:
        job = running.job
        try:
            await self._run(running)
        except Exception:  # a bug here must not strand the job as Processing forever
            if running.stop_reason == ABANDONED:  # the ledger is gone too; the job's next runner writes
                log.warning("job %s: abandoned (lease lost)", job.id)
                return
            log.exception("job %s: unexpected error", job.id)
            await self._fail(job, "internal error while running the job (see the server log)")
        finally:
            self.notify(job.id)

    async def _run(self, running: RunningJob) -> None:
        job = running.job
        metrics.job_started(job.created_at, job.started_at)
        running.t_start = time.monotonic()
        audio = self.files.audio_path(job.id)
        if audio is None:
            await self._fail(job, "the uploaded audio is missing from the server's disk")
            return
        token = self.files.read_token(job.id)
        language = None if job.language == AUTO else job.language
        align, why_not = capabilities.alignment_available(language, self.config.WHISPER_MODELS_DIR, self.offline)
        if not align:
            if self.worker is not None and self.config.WHISPER_WORD_TIMES:
                why_not = why_not.replace("segment times come from the transcription itself",
                                          "word times come from Whisper's own cross-attention (faster-whisper)")
            await self._warn(job, why_not)
        diarize = job.diarize
        if diarize:
            diarize, why_not = capabilities.diarization_available(token, self.config.WHISPER_MODELS_DIR, self.offline)
            if not diarize:
                await self._warn(job, why_not)
        opts = EngineOptions(
            audio=audio, output_dir=self.files.output_dir(job.id), model=job.model, language=job.language,
            device=job.device, device_index=job.device_index, prompt=job.prompt, align=align,
            diarize=diarize, hf_token=token, offline=self.offline, threads=self.threads,
        )
        result = await self._attempt(running, opts)
        if not result.ok and not result.retry and running.stop_reason is None and (opts.align or opts.diarize):
            stages = " and ".join(s for s, on in (("alignment", opts.align), ("diarization", opts.diarize)) if on)
            await self._warn(job, f"{stages} failed ({_public(result.reason(), opts)}); "
                                  f"the transcript was made again without {stages}")
            opts.align = opts.diarize = False
            result = await self._attempt(running, opts)
        await self._record(running, opts, result)

    async def _attempt(self, running: RunningJob, opts: EngineOptions) -> EngineResult:
        job = running.job
        if running.stop_reason:
            return EngineResult(None, killed_because=running.stop_reason)
        self.files.remove_output(job.id)
        opts.output_dir.mkdir(parents=True, exist_ok=True)
        if self.worker is not None:
            return await self._on_worker(running, opts)
        engine = EngineProcess(build_argv(self.config, opts), build_env(opts), self.config.WHISPER_KILL_GRACE_SECONDS)
        try:
            pid = engine.start()
        except OSError as exc:
            log.error("job %s: cannot start WHISPER_CMD=%s: %s", job.id, self.config.WHISPER_CMD, exc)
            return EngineResult(127, stderr_tail=[f"the transcription engine could not be started ({exc.strerror})"])
        running.engine = engine
        log.info("job %s: engine started, pid %s", job.id, pid)
        await self.ledger.set_engine_pid(job.id, pid)
        crash_point("engine-started")
        timeout = self.config.WHISPER_JOB_TIMEOUT_SECONDS or None
        result = await engine.run(self._progress(job), timeout)
        running.engine = None
        metrics.engine_exited(result.returncode, result.signal)
        log.info("job %s: engine ended: code %s signal %s %s", job.id, result.returncode, result.signal,
                 result.killed_because or "")
        return result

    async def _on_worker(self, running: RunningJob, opts: EngineOptions) -> EngineResult:
        job = running.job
        engine = WorkerJob(self.worker, job.id, job_message(self.config, opts))
        running.engine = engine
        timeout = self.config.WHISPER_JOB_TIMEOUT_SECONDS or None
        result = await engine.run(self._progress(job), timeout)
        running.engine = None
        metrics.engine_exited(result.returncode, result.signal)  # a worker's answer: 0 done, 1 error
        log.info("job %s: worker answered: code %s %s", job.id, result.returncode,
                 result.killed_because or ("worker died" if result.retry else ""))
        return result

    def _progress(self, job: Job):
        last = 0.0

        async def progress(percent: float) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_SECONDS or percent >= 100:
                last = now
                await self.ledger.set_progress(job.id, percent, "transcribing")

        return progress

    async def _record(self, running: RunningJob, opts: EngineOptions, result: EngineResult) -> None:
        job = running.job
        because = result.killed_because or running.stop_reason
        if because == ABANDONED:
            # Another node runs it again (or already does): its files and its row are not ours now.
            log.warning("job %s: abandoned without a result: this node lost its lease", job.id)
        elif because == "canceled":
            await self.ledger.mark_canceled(job.id, "engine stopped while processing")
            running.ended("Canceled")
            self.files.remove_all(job.id)
        elif because == "shutdown":
            await self.ledger.requeue(job.id, "server shutting down; the job will run again at the next start")
            self.files.remove_output(job.id)
        elif because == "timeout":
            limit = self.config.WHISPER_JOB_TIMEOUT_SECONDS
            await self._fail(job, f"the engine ran longer than WHISPER_JOB_TIMEOUT_SECONDS ({limit:g} s) and was stopped")
        elif result.retry and job.attempts < self.config.WHISPER_MAX_ATTEMPTS:
            # The worker died under this job (or under a neighbour's cancel): run it again.
            await self.ledger.requeue(job.id, f"the engine worker died: {_public(result.reason(), opts)}")
            self.files.remove_output(job.id)
        elif result.retry:
            await self._fail(job, f"gave up after {job.attempts} attempts: the engine worker died each time "
                                  f"({_public(result.reason(), opts)})")
        elif not result.ok:
            await self._fail(job, _public(result.reason(), opts))
        else:
            try:
                engine_result = load_engine_result(opts.output_dir)
            except EngineOutputError as exc:
                await self._fail(job, str(exc))
                return
            if not engine_result["segments"]:
                await self._warn(job, "no speech was detected in the audio; the transcript is empty")
            language = result.detected_language or engine_result.get("language")
            if result.detected_language and engine_result.get("language") != language:
                engine_result["language"] = language  # keep the canonical copy truthful
                write_engine_result(opts.output_dir, engine_result)
            await self.ledger.complete(job.id, language)
            running.ended("Completed")

    async def _warn(self, job: Job, warning: str) -> None:
        if warning not in job.warnings:
            job.warnings.append(warning)
            log.warning("job %s: %s", job.id, warning)
            await self.ledger.add_warning(job.id, warning)

    async def _fail(self, job: Job, reason: str) -> None:
        log.warning("job %s failed: %s", job.id, reason)
        await self.ledger.fail(job.id, reason)
        metrics.job_finished("Failed", metrics.seconds_since(job.started_at))
        self.files.remove_all(job.id)


def _public(reason: str, opts: EngineOptions) -> str:
    """The engine's words without the server's paths (clients never see where files live)."""
    for path, shown in ((str(opts.audio), opts.audio.name), (str(opts.output_dir), "output")):
        reason = reason.replace(path, shown)
    return reason.replace(os.sep.join(str(opts.audio).split(os.sep)[:-1]) + os.sep, "")
