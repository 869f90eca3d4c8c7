"""The streamed audio upload and job submission shared by /transcription and /v1/audio/transcriptions."""

from __future__ import annotations

import logging
from typing import Any

from tornado.ioloop import PeriodicCallback
from tornado.iostream import StreamClosedError
from tornado.web import stream_request_body

from .. import metrics
from ..faults import fail_point
from ..forms import is_ascii_number
from ..intake import CLIENT_LEFT, Intake, IntakeError, Media
from ..jobfiles import new_job_id
from ..jobs import Job, NewJob
from ..uploads import FORM_OVERHEAD, MultipartReceiver, ReceivedForm, UploadError, boundary_of
from .base import ApiError, BaseHandler

log = logging.getLogger("whisperd.http")
QUEUE_FULL_RETRY_SECONDS = 30


@stream_request_body
class UploadHandler(BaseHandler):
    """POST bodies stream to the job's staging dir; nothing is a job until submit() commits it."""

    repeatable_fields: frozenset[str] = frozenset()

    _receiver: MultipartReceiver | None = None
    _job_id: str | None = None
    _committed = False
    _slot_address: str | None = None
    _intake: Intake | None = None
    _rate_timer: object | None = None
    _received = 0
    _received_at_check = 0
    _declared: int | None = None

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method != "POST":
            return
        if self.service.draining:
            raise ApiError(503, "the server is shutting down; try again in a moment", {"Retry-After": "10"})
        limit = self.service.config.MAX_FILE_SIZE
        length = self.request.headers.get("Content-Length")
        if length is not None:
            if not is_ascii_number(length):
                raise ApiError(400, "Content-Length is not a number")
            if int(length) > limit + FORM_OVERHEAD:
                raise ApiError(413, f"request body of {length} bytes is larger than MAX_FILE_SIZE ({limit} bytes)")
            self._declared = int(length)
        await self._check_queue_room()
        self._take_upload_slot()
        self._check_disk()
        try:
            boundary = boundary_of(self.request.headers.get("Content-Type"))
        except UploadError as exc:
            raise ApiError(exc.status, exc.message) from None
        self._job_id = new_job_id()
        staging = self.service.files.staging_dir(self._job_id)
        self._receiver = MultipartReceiver(boundary, staging, limit, repeatable=self.repeatable_fields)
        self._watch_rate()

    # -- shared resources: the queue, upload slots, the body's pace

    async def _check_queue_room(self) -> None:
        cap = self.service.config.WHISPER_MAX_QUEUED_JOBS
        if not cap:
            return
        queued = (await self.service.ledger.counts())["Queued"]
        if queued >= cap:
            raise ApiError(429, f"the queue is full ({queued} jobs waiting, WHISPER_MAX_QUEUED_JOBS={cap}); "
                                "try again later", {"Retry-After": str(QUEUE_FULL_RETRY_SECONDS)})

    def _take_upload_slot(self) -> None:
        config = self.service.config
        cap = config.WHISPER_MAX_PENDING_UPLOADS
        if self.service.uploads_in_flight >= cap:
            raise ApiError(429, f"too many uploads in progress (limit {cap}); try again in a few seconds",
                           {"Retry-After": "5"})
        address = self.request.remote_ip or "?"
        held = self.service.uploads_by_address.get(address, 0)
        if held >= config.uploads_per_address:
            raise ApiError(429, f"this client address already has {held} upload{'s' if held > 1 else ''} in progress, "
                                f"its share of the "
                                f"server's {cap} (WHISPER_UPLOAD_SHARE_PER_ADDRESS={config.WHISPER_UPLOAD_SHARE_PER_ADDRESS:g});"
                                " wait for one to finish", {"Retry-After": "5"})
        self.service.uploads_in_flight += 1
        self.service.uploads_by_address[address] = held + 1
        self._slot_address = address

    def _release_upload_slot(self) -> None:
        self._stop_rate_watch()
        address = self._slot_address
        if address is not None:
            self._slot_address = None
            self.service.uploads_in_flight -= 1
            left = self.service.uploads_by_address.get(address, 1) - 1
            if left > 0:
                self.service.uploads_by_address[address] = left
            else:
                self.service.uploads_by_address.pop(address, None)

    def _watch_rate(self) -> None:
        """Cut a body that arrives slower than the floor: a trickle must not hold a slot for minutes."""
        config = self.service.config
        if not config.WHISPER_UPLOAD_MIN_BYTES_PER_SECOND:
            return
        self._rate_timer = PeriodicCallback(self._check_rate, config.WHISPER_UPLOAD_RATE_WINDOW_SECONDS * 1000)
        self._rate_timer.start()

    def _stop_rate_watch(self) -> None:
        if self._rate_timer is not None:
            self._rate_timer.stop()
            self._rate_timer = None

    def _check_rate(self) -> None:
        config = self.service.config
        window = config.WHISPER_UPLOAD_RATE_WINDOW_SECONDS
        floor = config.WHISPER_UPLOAD_MIN_BYTES_PER_SECOND
        got = self._received - self._received_at_check
        self._received_at_check = self._received
        wanted = floor * window
        if self._declared is not None:  # the last bytes of a body need not fill a whole window
            wanted = min(wanted, self._declared - self._received + got)
        if got >= wanted or self._finished:
            return
        log.warning("upload from %s cut: %d bytes in the last %.0f s, below WHISPER_UPLOAD_MIN_BYTES_PER_SECOND=%d",
                    self.request.remote_ip, got, window, floor)
        metrics.upload_cut()
        self._discard()
        message = (f"the upload was too slow: {got / window / 1024:.1f} KiB/s over the last {window:g} s, below the "
                   f"minimum of {floor / 1024:g} KiB/s (WHISPER_UPLOAD_MIN_BYTES_PER_SECOND); the connection is closed")
        self.send_error(408, exc_info=(ApiError, ApiError(408, message), None))

    def _check_disk(self) -> None:
        # The floor, not the upload's size: a disk that fills up during the write is refused
        # with 507 too (uploads.py), and the floor keeps room for the engine's output.
        floor_mb = self.service.config.WHISPER_MIN_FREE_DISK_MB
        free_mb = self.service.files.free_disk_mb()
        if free_mb < floor_mb:
            raise ApiError(507, f"the server is short of disk space ({free_mb:.0f} MB free, keeps at least "
                                f"WHISPER_MIN_FREE_DISK_MB={floor_mb}); try again later")

    # -- the body

    def on_finish(self) -> None:
        self._release_upload_slot()
        if not self._committed:  # whatever ended the request (a bug too), the staged files go
            self._discard()

    def data_received(self, chunk: bytes) -> None:
        if self._receiver is None or self._finished:
            return
        self._received += len(chunk)
        try:
            self._receiver.feed(chunk)
        except UploadError as exc:
            self._discard()
            # Answer now and close: the rest of an oversized or broken body is not worth reading.
            self.send_error(exc.status, exc_info=(ApiError, ApiError(exc.status, exc.message), None))

    def on_connection_close(self) -> None:
        self._release_upload_slot()
        if not self._committed:
            self._discard()

    def _discard(self) -> None:
        if self._intake is not None:
            self._intake.stop()
            self._intake = None
        if self._receiver is not None:
            self._receiver.close_file()
            self._receiver = None
        if self._job_id is not None and not self._committed:
            self.service.files.remove_all(self._job_id)

    @property
    def upload_pending(self) -> bool:
        """False when the body was already refused (and answered) while streaming."""
        return not self._finished and self._receiver is not None

    def received_form(self) -> ReceivedForm:
        """The finished form, or ApiError (and the staged file is gone)."""
        assert self._receiver is not None
        self._stop_rate_watch()  # the whole body is here
        try:
            return self._receiver.finish()
        except UploadError as exc:
            self._discard()
            raise ApiError(exc.status, exc.message) from None

    async def take_in(self, form: ReceivedForm) -> Media | None:
        """Probe, check and decode the staged file (intake.py); ApiError when refused, None when the client left."""
        assert form.file_path is not None and self._job_id is not None
        intake = self._intake = Intake(self.service.config)
        try:
            media = await intake.accept(form.file_path, form.file_path.parent, form.client_filename)
        except IntakeError as exc:
            self._discard()
            if exc.status == CLIENT_LEFT:
                return None
            metrics.upload_refused(exc.status)
            raise ApiError(exc.status, exc.message) from None
        if self._intake is None:  # the client left while its file was decoded; on_connection_close cleaned up
            return None
        self._intake = None
        form.file_path.unlink()  # the engine gets the canonical file only
        fail_point("intake-done")
        return media

    def refuse(self, error: Exception) -> None:
        """A form we will not run: drop the staged file before the error goes out."""
        self._discard()
        raise error

    def new_job(self, form: ReceivedForm, media: Media, **fields: Any) -> NewJob:
        assert self._job_id is not None
        return NewJob(id=self._job_id, owner=self.identity.name, filename=form.client_filename,
                      upload_bytes=form.file_bytes, audio_seconds=round(media.duration, 3), **fields)

    async def submit(self, new_job: NewJob, hf_token: str | None) -> Job:
        try:
            await self._check_queue_room()  # again: others may have filled it while this body arrived
            job = await self.service.submit(new_job, hf_token)
        except Exception:
            self._discard()
            raise
        self._committed = True
        self._receiver = None
        metrics.upload_received(new_job.upload_bytes)
        return job


async def deliver(handler: BaseHandler, job: Job, body: dict[str, Any] | str,
                  content_type: str = "application/json; charset=utf-8") -> None:
    """Send the result, and only once it is written out, delete every file of the job."""
    handler.set_status(200)
    handler.set_header("Content-Type", content_type)
    handler.write(body)
    try:
        await handler.flush()
    except StreamClosedError:
        log.info("job %s: client left before the result was sent; result kept", job.id)
        return
    await handler.service.mark_delivered(job, handler.identity.name)
    handler.finish()
