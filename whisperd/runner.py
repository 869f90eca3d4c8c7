"""Runs one claimed job through the engine and records how it ended; never leaves it in limbo."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable

from . import capabilities, metrics
from .config import Config
from .engines import Engine, EngineOptions, EngineResult
from .faults import crash_point
from .jobfiles import JobFiles
from .languages import AUTO
from .jobs import Job
from .ledger import Ledger
from .results import EngineOutputError, load_engine_result, write_engine_result

log = logging.getLogger("whisperd.runner")
PROGRESS_EVERY_SECONDS = 1.0


class RunningJob:
    """A job this process is running; the handle through which it is canceled or stopped."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.engine: Engine | None = None  # set while the engine runs the job
        self.stop_reason: str | None = None
        self.t_start: float | None = None

    def ended(self, status: str) -> None:
        metrics.job_finished(status, None if self.t_start is None else time.monotonic() - self.t_start)

    async def stop(self, because: str) -> None:
        self.stop_reason = self.stop_reason or because
        if self.engine is not None:
            await self.engine.stop(self.job.id, because)


class JobRunner:
    def __init__(self, config: Config, ledger: Ledger, files: JobFiles, offline: bool,
                 notify: Callable[[str], None], threads: int | None, engine: Engine) -> None:
        self.config = config
        self.engine = engine
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
        # The engine does not wait for these ledger writes: they are made while it starts.
        warned: list[asyncio.Future] = []
        align, why_not = capabilities.alignment_available(language, self.config.WHISPER_MODELS_DIR, self.offline)
        if not align:
            if self.engine.times_words:
                why_not = why_not.replace("segment times come from the transcription itself",
                                          "word times come from Whisper's own cross-attention (faster-whisper)")
            warned.append(asyncio.ensure_future(self._warn(job, why_not)))
        diarize = job.diarize
        if diarize:
            diarize, why_not = capabilities.diarization_available(token, self.config.WHISPER_MODELS_DIR, self.offline)
            if not diarize:
                warned.append(asyncio.ensure_future(self._warn(job, why_not)))
        opts = EngineOptions(
            audio=audio, output_dir=self.files.output_dir(job.id), model=job.model, language=job.language,
            device=job.device, device_index=job.device_index, prompt=job.prompt, align=align,
            diarize=diarize, hf_token=token, offline=self.offline, threads=self.threads, temperature=job.temperature,
        )
        try:
            result = await self._attempt(running, opts)
        finally:
            await asyncio.gather(*warned)
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
        running.engine = self.engine
        timeout = self.config.WHISPER_JOB_TIMEOUT_SECONDS or None
        result = await self.engine.run(job.id, opts, self._progress(job), self._started(job), timeout)
        running.engine = None
        metrics.engine_exited(result.returncode, result.signal)  # a worker's answer: 0 done, 1 error
        return result

    def _started(self, job: Job):
        async def started(pid: int) -> None:
            await self.ledger.set_engine_pid(job.id, pid)
            crash_point("engine-started")

        return started

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
        if because == "canceled":
            await self.ledger.mark_canceled(job.id, "engine stopped while processing")
            running.ended("Canceled")
            self.files.remove_all(job.id)
        elif because == "shutdown":
            await self.ledger.requeue(job.id, "server shutting down; the job will run again at the next start")
            self.files.remove_output(job.id)
        elif because == "timeout":
            limit = self.config.WHISPER_JOB_TIMEOUT_SECONDS
            await self._fail(job, f"the engine ran longer than WHISPER_JOB_TIMEOUT_SECONDS ({limit:g} s) and was stopped")
        elif result.retry and not result.charge:
            # The engine died beside this job (the culprit is not known yet) or was restarted to
            # stop another job: run it again without using up one of its attempts.
            await self.ledger.requeue_uncounted(job.id, f"run again, no attempt counted: {_public(result.reason(), opts)}")
            self.files.remove_output(job.id)
        elif result.retry and job.attempts < self.config.WHISPER_MAX_ATTEMPTS:
            # The worker died under this job alone: run it again, counting the attempt (poison rules).
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
