"""Runs one claimed job through the engine and records how it ended; never leaves it in limbo."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable

from . import capabilities, metrics
from .config import Config
from .engines import Engine, EngineOptions, EngineResult, kill_orphan_group
from .faults import crash_point, fail_point
from .intake import Intake, IntakeError
from .jobfiles import JobFiles
from .languages import AUTO
from .models import model_info
from .jobs import Job
from .ledger import Ledger, LedgerError
from .nodes import ABANDONED
from .outcomes import OutcomeAbandoned, OutcomeRecorder
from .results import EngineOutputError, load_engine_result, write_engine_result
from .storage import StorageWatch, is_storage_error
from .tasks import spawn

log = logging.getLogger("whisperd.runner")
PROGRESS_EVERY_SECONDS = 1.0
# The stop reason of a run whose ledger callback (engine pid, progress) raised an error the
# ledger did not classify: the engine is stopped at once and the job goes back, uncounted.
CALLBACK_FAILED = "ledger-callback-failed"


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

    def __init__(self, ledger: Ledger, running: RunningJob, on_broken=None) -> None:
        self.ledger = ledger
        self.running = running
        self.on_broken = on_broken  # awaited with the error a write raised that is no LedgerError
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
                    await self.ledger.set_progress(self.running.job.id, percent, stage, self.running.job.lease)
                except LedgerError as exc:
                    log.debug("job %s: progress %.0f%% not recorded (ledger busy): %s",
                              self.running.job.id, percent, exc)
                except Exception as exc:  # the database answered in a way the ledger does not know
                    self.closed = True
                    if self.on_broken is not None:
                        await self.on_broken(exc)
                    return
                # At most one write a second; what arrives meanwhile merges into the next one.
                await asyncio.sleep(max(0.0, PROGRESS_EVERY_SECONDS - (time.monotonic() - began)))
        finally:
            self._writing = False


class JobRunner:
    def __init__(self, config: Config, ledger: Ledger, files: JobFiles, offline: bool,
                 notify: Callable[[str], None], delete_files: Callable[[str, str], None], threads: int | None,
                 engine: Engine, outcomes: OutcomeRecorder | None = None, storage: StorageWatch | None = None) -> None:
        self.config = config
        self.storage = storage  # trips on a storage error; the scheduler claims nothing meanwhile
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
        except Exception as exc:  # must not strand the job as Processing forever, nor its engine running
            await self._stop_engine(running, "error")  # before anything else: nothing may outlive the run
            if running.stop_reason == ABANDONED:  # the ledger is gone too; the job's next runner writes
                log.warning("job %s: abandoned (lease lost)", job.id)
                return
            try:
                await self._after_error(job, exc)
            except OutcomeAbandoned as abandoned:
                log.error("%s; the next start takes the job back", abandoned)
        finally:
            self.files.drop_scratch(job.id)  # a store's local copies (store/): gone whatever happened
            self.notify(job.id)

    async def _stop_engine(self, running: RunningJob, because: str) -> None:
        try:
            if running.engine is not None:
                await running.stop(because)
        finally:
            if running.pid:  # the CLI engine forgets a run that raised: stop its group by pid
                kill_orphan_group(running.pid, running.job.id)

    async def _after_error(self, job: Job, exc: Exception) -> None:
        """A run that raised: the job is kept. Storage trouble and a ledger that failed in a way
        it does not classify are the box's fault (no attempt counted); anything else may be the
        job's (a bug it triggers): counted, so that it cannot loop forever."""
        if is_storage_error(exc):
            if self.storage is not None:
                self.storage.trip(exc)  # type: ignore[arg-type]
            await self._requeue_for_storage(job, exc.strerror or str(exc))  # type: ignore[union-attr]
        elif isinstance(exc, LedgerError) or _from_database(exc):
            log.error("job %s: the ledger failed under the run (%s: %s); the job goes back to the queue, "
                      "no attempt counted", job.id, exc.__class__.__name__, exc)
            await self._requeue_uncounted(job, "the job ledger failed during the run; run again, no attempt counted")
        elif job.attempts < self.config.WHISPER_MAX_ATTEMPTS:
            log.exception("job %s: unexpected error; the job goes back to the queue", job.id, exc_info=exc)
            if await self._outcome(job, "requeue", lambda: self.ledger.requeue(
                    job.id, "the server failed while running the job (see its log); run again", job.lease)):
                self.files.remove_output(job.id)
        else:
            log.exception("job %s: unexpected error", job.id, exc_info=exc)
            await self._fail(job, f"gave up after {job.attempts} attempts: the server failed while running the job "
                                  "each time (see the server log)")

    async def _requeue_uncounted(self, job: Job, why: str) -> bool:
        if await self._outcome(job, "requeue", lambda: self.ledger.requeue_uncounted(job.id, why, job.lease)):
            self.files.remove_output(job.id)
            return True
        return False

    async def _requeue_for_storage(self, job: Job, detail: str) -> None:
        log.error("job %s: the job storage failed (%s); the job goes back to the queue, no attempt counted",
                  job.id, detail)
        if await self._requeue_uncounted(job, f"the server's job storage failed ({detail}); "
                                              "run again when it works, no attempt counted"):
            metrics.storage_requeued()

    async def _storage_failed(self) -> bool:
        """After an engine failure: was it the disk (read-only, full)? A probe write decides."""
        return self.storage is not None and not await self.storage.check()

    async def _run(self, running: RunningJob) -> None:
        job = running.job
        metrics.job_started(job.created_at, job.started_at)
        running.t_start = time.monotonic()
        # From the store to this node's scratch (an OSError here: the store's outage, requeued uncounted).
        audio = await self.files.fetch_inputs(job.id) or await self._take_in_legacy(job)
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
            temperature=job.temperature, batch_size=job.batch_size, diarizer=diarizer or "pyannote",
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
        progress = ProgressWriter(self.ledger, running, lambda exc: self._callback_failed(running, "progress", exc))
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
                fail_point("engine-pid")
                await self.ledger.set_engine_pid(job.id, pid, job.lease)
            except LedgerError as exc:  # only a crash's clean-up needs it: the job goes on
                log.warning("job %s: engine pid not recorded: %s", job.id, exc)
            except Exception as exc:
                await self._callback_failed(running, "engine pid", exc)
                return
            crash_point("engine-started")

        return started

    async def _callback_failed(self, running: RunningJob, what: str, exc: Exception) -> None:
        """A ledger write during the run raised what the ledger does not classify: stop the
        engine first (nothing would stop it after a crash now), then the job goes back."""
        log.error("job %s: recording the %s failed (%s: %s); stopping the engine, the job goes back to the queue",
                  running.job.id, what, exc.__class__.__name__, exc)
        running.stop_reason = running.stop_reason or CALLBACK_FAILED
        await self.engine.stop(running.job.id, CALLBACK_FAILED)

    async def _record(self, running: RunningJob, opts: EngineOptions, result: EngineResult) -> None:
        job = running.job
        because = result.killed_because or running.stop_reason
        if because == ABANDONED:
            # Another node runs it again (or already does): its files and its row are not ours now.
            log.warning("job %s: abandoned without a result: this node lost its lease", job.id)
        elif because == "canceled":
            if await self._outcome(job, "cancel", lambda: self.ledger.mark_canceled(
                    job.id, "engine stopped while processing", job.lease)):
                running.ended("Canceled")
                self.delete_files(job.id, "canceled")
        elif because == "shutdown":
            # A graceful stop is no fault of the job's: its attempt is given back (issue 24).
            if await self._outcome(job, "requeue", lambda: self.ledger.requeue_uncounted(
                    job.id, "server shutting down; the job will run again at the next start", job.lease)):
                self.files.remove_output(job.id)
        elif because == "timeout" and not await self._still_ours(job):
            # Frozen past the limit (SIGSTOP, a stalled VM): the lease ran out meanwhile and the job
            # went back to the queue; its row and its files are the next runner's now.
            log.warning("job %s: time limit reached after its lease was lost; left to its next run", job.id)
        elif because == CALLBACK_FAILED:
            await self._requeue_uncounted(job, "the job ledger failed during the run; run again, no attempt counted")
        elif because == "timeout":
            await self._fail(job, self._timeout_reason(job))
        elif result.retry and not result.charge:
            # The engine died beside this job (the culprit is not known yet) or was restarted to
            # stop another job: run it again without using up one of its attempts.
            why = f"run again, no attempt counted: {_public(result.reason(), opts)}"
            if await self._outcome(job, "requeue", lambda: self.ledger.requeue_uncounted(job.id, why, job.lease)):
                self.files.remove_output(job.id)
        elif result.retry and job.attempts < self.config.WHISPER_MAX_ATTEMPTS:
            # The worker died under this job alone: run it again, counting the attempt (poison rules).
            why = f"the engine worker died: {_public(result.reason(), opts)}"
            if await self._outcome(job, "requeue", lambda: self.ledger.requeue(job.id, why, job.lease)):
                self.files.remove_output(job.id)
        elif result.retry:
            await self._fail(job, f"gave up after {job.attempts} attempts: the engine worker died each time "
                                  f"({_public(result.reason(), opts)})")
        elif not result.ok and await self._storage_failed():
            await self._requeue_for_storage(job, f"{self.storage.reason}; the engine said: "  # type: ignore[union-attr]
                                                 f"{_public(result.reason(), opts)}")
        elif not result.ok:
            await self._fail(job, _public(result.reason(), opts))
        else:
            try:
                engine_result = load_engine_result(opts.output_dir)
            except EngineOutputError as exc:
                if await self._storage_failed():
                    await self._requeue_for_storage(job, f"{self.storage.reason}; {exc}")  # type: ignore[union-attr]
                else:
                    await self._fail(job, str(exc))
                return
            if not engine_result["segments"]:
                await self._warn(job, "no speech was detected in the audio; the transcript is empty")
            language = result.detected_language or engine_result.get("language")
            if result.detected_language and engine_result.get("language") != language:
                engine_result["language"] = language  # keep the canonical copy truthful
                write_engine_result(opts.output_dir, engine_result)
            # Durable in the store before the ledger says Completed; an OSError here sends the
            # job back uncounted (run()), never Completed, never lost.
            await self.files.save_output(job.id)
            if await self._outcome(job, "completion", lambda: self.ledger.complete(job.id, language, job.lease)):
                metrics.audio_processed(job.audio_seconds)
                running.ended("Completed")

    async def _outcome(self, job: Job, what: str, write) -> bool:
        """The job's end, retried until the ledger takes it (outcomes.py); False when the row was
        no longer this runner's to change (then its files are not ours to delete either)."""
        changed = await self.outcomes.record(job.id, what, write)
        if not changed:
            log.warning("job %s: %s not recorded: the job is no longer Processing here", job.id, what)
        return changed

    async def _still_ours(self, job: Job) -> bool:
        """Whether this process still holds the job's claim (a write refused later means the same;
        this asks before acting on a clock that may have been frozen). Unknown: assume so, and let
        the lease-guarded write decide."""
        try:
            return await self.ledger.holds(job.id, job.lease)
        except LedgerError:
            return True

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
                await self.ledger.add_warning(job.id, warning, job.lease)
            except LedgerError as exc:  # a warning is worth less than the job: go on without it
                log.error("job %s: warning not recorded: %s", job.id, exc)

    async def _fail(self, job: Job, reason: str) -> None:
        log.warning("job %s failed: %s", job.id, reason)
        if await self._outcome(job, "failure", lambda: self.ledger.fail(job.id, reason, job.lease)):
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


def _from_database(exc: BaseException) -> bool:
    """An error a database driver raised that the ledger let through unclassified."""
    return type(exc).__module__.split(".")[0] in ("asyncpg", "sqlite3", "aiosqlite")  # service.DATABASE_DRIVERS
