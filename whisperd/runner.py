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
from .intake import Intake, IntakeError
from .jobfiles import JobFiles
from .languages import AUTO
from .models import model_info
from .jobs import Job
from .ledger import Ledger, LedgerError
from .nodes import ABANDONED
from .outcomes import OutcomeAbandoned, OutcomeRecorder
from .results import EngineOutputError, load_engine_result, write_engine_result
from .tasks import spawn

log = logging.getLogger("whisperd.runner")
PROGRESS_EVERY_SECONDS = 1.0


class RunningJob:
    """A job this process is running; the handle through which it is canceled or stopped."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.engine: Engine | None = None  # set while the engine runs the job
        self.stop_reason: str | None = None
        self.t_start: float | None = None
        self.last_activity = time.monotonic()  # a progress line or CPU time spent (stall watch)
        self.cpu_ticks: int | None = None
        self.pid: int | None = None  # the job's own engine process, when it has one (the CLI engine)

    def ended(self, status: str) -> None:
        metrics.job_finished(status, None if self.t_start is None else time.monotonic() - self.t_start)

    def engine_pid(self) -> int | None:
        """The process whose CPU time shows life: the job's own, else the shared worker's."""
        if self.engine is None:
            return None
        return self.pid if self.pid is not None else getattr(self.engine, "pid", None)

    def quiet_seconds(self) -> float:
        """Seconds since the engine last showed life; CPU time spent counts as life."""
        ticks = _cpu_ticks(self.engine_pid())
        if ticks is not None and ticks != self.cpu_ticks:
            self.cpu_ticks = ticks
            self.last_activity = time.monotonic()
        return time.monotonic() - self.last_activity

    async def stop(self, because: str) -> None:
        self.stop_reason = self.stop_reason or because
        if self.engine is not None:
            await self.engine.stop(self.job.id, because)


class ProgressWriter:
    """Progress goes to the ledger one write at a time, newest value only: values that arrive
    while a write is under way replace each other, and a write the ledger refuses is dropped.
    So no backlog of progress writes ever queues ahead of the job's final write."""

    def __init__(self, ledger: Ledger, running: RunningJob) -> None:
        self.ledger = ledger
        self.running = running
        self._newest: tuple[float, str] | None = None  # (percent, stage)
        self._writing = False
        self.closed = False

    def offer(self, percent: float, stage: str = "transcribing") -> None:
        """The engines' progress callback (engine.ProgressCallback: percent, stage)."""
        self.running.last_activity = time.monotonic()
        if self.closed:
            return
        self._newest = (percent, stage)
        if not self._writing:
            self._writing = True
            spawn(self._write(), f"progress of job {self.running.job.id}")

    async def _write(self) -> None:
        try:
            while self._newest is not None and not self.closed:
                (percent, stage), self._newest = self._newest, None
                began = time.monotonic()
                try:
                    await self.ledger.set_progress(self.running.job.id, percent, stage)
                except LedgerError as exc:
                    log.debug("job %s: progress %.0f%% not recorded (ledger busy): %s",
                              self.running.job.id, percent, exc)
                # At most one write a second; what arrives meanwhile merges into the next one.
                await asyncio.sleep(max(0.0, PROGRESS_EVERY_SECONDS - (time.monotonic() - began)))
        finally:
            self._writing = False


class JobRunner:
    def __init__(self, config: Config, ledger: Ledger, files: JobFiles, offline: bool,
                 notify: Callable[[str], None], delete_files: Callable[[str, str], None], threads: int | None,
                 engine: Engine, outcomes: OutcomeRecorder | None = None) -> None:
        self.config = config
        self.outcomes = outcomes or OutcomeRecorder()
        self.engine = engine
        self.ledger = ledger
        self.files = files
        self.offline = offline
        self.notify = notify
        self.delete_files = delete_files  # Service.delete_job_files: the one place a job's files go
        self.threads = threads

    async def run(self, running: RunningJob) -> None:
        job = running.job
        try:
            await self._run(running)
        except OutcomeAbandoned as exc:
            log.error("%s; the next start takes the job back", exc)
        except Exception:  # a bug here must not strand the job as Processing forever
            if running.stop_reason == ABANDONED:  # the ledger is gone too; the job's next runner writes
                log.warning("job %s: abandoned (lease lost)", job.id)
                return
            log.exception("job %s: unexpected error", job.id)
            try:
                await self._fail(job, "internal error while running the job (see the server log)")
            except OutcomeAbandoned as exc:
                log.error("%s; the next start takes the job back", exc)
        finally:
            self.notify(job.id)

    async def _run(self, running: RunningJob) -> None:
        job = running.job
        metrics.job_started(job.created_at, job.started_at)
        running.t_start = time.monotonic()
        audio = self.files.audio_path(job.id) or await self._take_in_legacy(job)
        if audio is None:
            return
        token = self.files.read_token(job.id)
        engine_language = job.language
        if engine_language == AUTO and not model_info(self.config.WHISPER_MODELS_DIR, job.model).multilingual:
            # An English-only model has nothing to detect (CTranslate2 refuses to), whatever its name.
            engine_language = "en"
        language = None if engine_language == AUTO else engine_language
        # The engine does not wait for these ledger writes: they are made while it starts.
        warned: list[asyncio.Future] = []
        align, why_not = capabilities.alignment_available(language, self.config.WHISPER_MODELS_DIR, self.offline)
        if job.task == "translate":
            # The English text has no source-language speech to align to (the CLI turns it off too).
            align, why_not = False, None
        if why_not:
            if self.engine.times_words:
                why_not = why_not.replace("segment times come from the transcription itself",
                                          "word times come from Whisper's own cross-attention (faster-whisper)")
            warned.append(asyncio.ensure_future(self._warn(job, why_not)))
        diarize, diarizer = job.diarize, "pyannote"
        if diarize:
            diarizer, why_not = capabilities.choose_diarizer(self.config.WHISPER_DIARIZATION, token,
                                                             self.config.WHISPER_MODELS_DIR, self.offline)
            diarize = diarizer is not None
            if not diarize:
                warned.append(asyncio.ensure_future(self._warn(job, why_not)))
        speakers = self.files.read_speakers(job.id) if diarize else {}
        opts = EngineOptions(
            audio=audio, output_dir=self.files.output_dir(job.id), model=job.model, language=engine_language,
            device=job.device, device_index=job.device_index, prompt=job.prompt, align=align,
            diarize=diarize, hf_token=token, offline=self.offline, threads=self.threads, task=job.task,
            temperature=job.temperature, diarizer=diarizer or "pyannote",
            speakers=speakers.get("options") or {}, references=speakers.get("references") or [],
            known_speakers=await self._voices(job) if diarize and diarizer == "senko" else [],
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
        for warning in result.warnings if result.ok else []:
            await self._warn(job, warning)
        await self._record(running, opts, result)

    async def _voices(self, job) -> list[dict]:
        """The voices the job's owner enrolled (POST /voices), for naming its speakers."""
        voices = getattr(self.ledger, "list_voices", None)
        if voices is None:
            return []
        try:
            return [{"name": v["name"], "embedding": v["embedding"]} for v in await voices(job.owner)]
        except LedgerError as exc:  # the names are a nicety: the job goes on with letters
            log.warning("job %s: enrolled voices not read: %s", job.id, exc)
            return []

    async def _attempt(self, running: RunningJob, opts: EngineOptions) -> EngineResult:
        job = running.job
        if running.stop_reason:
            return EngineResult(None, killed_because=running.stop_reason)
        self.files.remove_output(job.id)
        opts.output_dir.mkdir(parents=True, exist_ok=True)
        running.engine = self.engine
        timeout = self.config.job_timeout(job.audio_seconds)
        progress = ProgressWriter(self.ledger, running)
        try:
            result = await self.engine.run(job.id, opts, progress.offer, self._started(running), timeout)
        finally:
            progress.closed = True
        running.engine = running.pid = None
        metrics.engine_exited(result.returncode, result.signal)  # a worker's answer: 0 done, 1 error
        return result

    def _started(self, running: RunningJob):
        job = running.job

        async def started(pid: int) -> None:
            running.pid = pid
            try:
                await self.ledger.set_engine_pid(job.id, pid)
            except LedgerError as exc:  # only a crash's clean-up needs it: the job goes on
                log.warning("job %s: engine pid not recorded: %s", job.id, exc)
            crash_point("engine-started")

        return started

    async def _record(self, running: RunningJob, opts: EngineOptions, result: EngineResult) -> None:
        job = running.job
        because = result.killed_because or running.stop_reason
        if because == ABANDONED:
            # Another node runs it again (or already does): its files and its row are not ours now.
            log.warning("job %s: abandoned without a result: this node lost its lease", job.id)
        elif because == "canceled":
            if await self._outcome(job, "cancel", lambda: self.ledger.mark_canceled(job.id, "engine stopped while processing")):
                running.ended("Canceled")
                self.delete_files(job.id, "canceled")
        elif because == "shutdown":
            if await self._outcome(job, "requeue", lambda: self.ledger.requeue(
                    job.id, "server shutting down; the job will run again at the next start")):
                self.files.remove_output(job.id)
        elif because == "timeout":
            await self._fail(job, self._timeout_reason(job))
        elif result.retry and not result.charge:
            # The engine died beside this job (the culprit is not known yet) or was restarted to
            # stop another job: run it again without using up one of its attempts.
            why = f"run again, no attempt counted: {_public(result.reason(), opts)}"
            if await self._outcome(job, "requeue", lambda: self.ledger.requeue_uncounted(job.id, why)):
                self.files.remove_output(job.id)
        elif result.retry and job.attempts < self.config.WHISPER_MAX_ATTEMPTS:
            # The worker died under this job alone: run it again, counting the attempt (poison rules).
            why = f"the engine worker died: {_public(result.reason(), opts)}"
            if await self._outcome(job, "requeue", lambda: self.ledger.requeue(job.id, why)):
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
            if await self._outcome(job, "completion", lambda: self.ledger.complete(job.id, language)):
                metrics.audio_processed(job.audio_seconds)
                running.ended("Completed")

    async def _outcome(self, job: Job, what: str, write) -> bool:
        """The job's end, retried until the ledger takes it (outcomes.py); False when the row was
        no longer this runner's to change (then its files are not ours to delete either)."""
        changed = await self.outcomes.record(job.id, what, write)
        if not changed:
            log.warning("job %s: %s not recorded: the job is no longer Processing here", job.id, what)
        return changed

    def _timeout_reason(self, job: Job) -> str:
        limit = self.config.job_timeout(job.audio_seconds) or 0
        if self.config.WHISPER_JOB_TIMEOUT_SECONDS > 0:
            why = f"WHISPER_JOB_TIMEOUT_SECONDS ({limit:g} s)"
        else:
            audio = "its audio" if job.audio_seconds is None else f"{job.audio_seconds:g} s of audio"
            why = (f"its time limit ({limit:g} s: WHISPER_JOB_TIMEOUT_BASE_SECONDS + "
                   f"WHISPER_JOB_TIMEOUT_PER_AUDIO_SECOND x {audio})")
        return f"the engine ran longer than {why} and was stopped (its whole process group was killed)"

    async def _take_in_legacy(self, job: Job):
        """A job queued before intake existed: decode its upload now, under the same rules, or fail it."""
        legacy = self.files.legacy_upload(job.id)
        if legacy is None:
            await self._fail(job, "the uploaded audio is missing from the server's disk")
            return None
        try:
            media = await Intake(self.config).accept(legacy, legacy.parent, job.filename)
        except IntakeError as exc:
            await self._fail(job, exc.message)
            return None
        legacy.unlink()
        job.audio_seconds = media.duration
        return media.canonical_path

    async def _warn(self, job: Job, warning: str) -> None:
        if warning not in job.warnings:
            job.warnings.append(warning)
            log.warning("job %s: %s", job.id, warning)
            try:
                await self.ledger.add_warning(job.id, warning)
            except LedgerError as exc:  # a warning is worth less than the job: go on without it
                log.error("job %s: warning not recorded: %s", job.id, exc)

    async def _fail(self, job: Job, reason: str) -> None:
        log.warning("job %s failed: %s", job.id, reason)
        if await self._outcome(job, "failure", lambda: self.ledger.fail(job.id, reason)):
            metrics.job_finished("Failed", metrics.seconds_since(job.started_at))
            self.delete_files(job.id, "failed")


def _cpu_ticks(pid: int | None) -> int | None:
    """User plus system CPU ticks of a process (Linux /proc); None when it cannot be read."""
    if not pid:
        return None
    try:
        fields = open(f"/proc/{pid}/stat", "rb").read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    except (OSError, IndexError, ValueError):
        return None


def _public(reason: str, opts: EngineOptions) -> str:
    """The engine's words without the server's paths (clients never see where files live)."""
    for path, shown in ((str(opts.audio), opts.audio.name), (str(opts.output_dir), "output")):
        reason = reason.replace(path, shown)
    return reason.replace(os.sep.join(str(opts.audio).split(os.sep)[:-1]) + os.sep, "")
