"""The streamed audio upload and job submission shared by /transcription and /v1/audio/transcriptions.

The audio of a job arrives in the staging dir by one of three ways (a multipart file part, a
finished resumable upload moved there, a URL fetched there); from then on every source takes
the same path: probe, then service.submit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from tornado.ioloop import PeriodicCallback
from tornado.iostream import StreamClosedError
from tornado.web import stream_request_body

from .. import metrics
from ..errors import ServiceError
from ..faults import fail_point
from ..fetch import FetchError
from ..forms import is_ascii_number
from ..intake import CLIENT_LEFT, Intake, IntakeError, Media
from ..jobfiles import new_job_id
from ..jobs import Job, NewJob
from ..ledger import QuotaExceeded
from ..limits import LimitExceeded, Limits, file_size_limit, quota, refusal
from ..uploads import FORM_OVERHEAD, MultipartReceiver, ReceivedForm, boundary_of
from ..urlpolicy import PolicyError
from .base import BaseHandler

log = logging.getLogger("whisperd.http")

# The queue's room is checked before a body is read, and again before its job is written if the
# body took longer than this to arrive (the cap is approximate across processes anyway).
QUEUE_RECHECK_SECONDS = 1.0


@stream_request_body
class UploadHandler(BaseHandler):
    """POST bodies stream to the job's staging dir; nothing is a job until submit() commits it."""

    repeatable_fields: frozenset[str] = frozenset()

    _receiver: MultipartReceiver | None = None
    _job_id: str | None = None
    _committed = False
    _slot_address: str | None = None
    _fetching: "asyncio.Future | None" = None
    _intake: Intake | None = None
    _rate_timer: PeriodicCallback | None = None
    _received = 0
    _received_at_check = 0
    _declared: int | None = None
    _room_checked_at = 0.0
    limits: Limits
    field_limits: dict[str, int] = {}  # text fields allowed more than uploads.MAX_FIELD_BYTES

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method != "POST":
            return
        self.limits = self.identity.limits.resolved(self.service.config)
        limit, limit_name = file_size_limit(self.limits, self.service.config.MAX_FILE_SIZE)
        length = self.request.headers.get("Content-Length")
        if length is not None:
            if not is_ascii_number(length):
                raise ServiceError(400, "Content-Length is not a number")
            if int(length) > limit + FORM_OVERHEAD:
                raise ServiceError(413, f"request body of {length} bytes is larger than {limit_name} ({limit} bytes)")
            self._declared = int(length)
        # Before a byte is stored: a refused upload leaves nothing.
        await self.service.check_queue_room()
        self._room_checked_at = time.monotonic()
        await self.check_limits()
        address = self.request.remote_ip or "?"
        self.service.take_upload_slot(address)
        self._slot_address = address
        self.service.check_disk()
        boundary = boundary_of(self.request.headers.get("Content-Type"))
        self._job_id = new_job_id()
        staging = self.service.staging_dir(self._job_id)
        self._receiver = MultipartReceiver(boundary, staging, limit, repeatable=self.repeatable_fields,
                                           limit_name=limit_name, field_limits=self.field_limits)
        self._watch_rate()

    async def check_limits(self, adding_seconds: float = 0.0) -> None:
        """ServiceError 429 (with Retry-After) when the caller is over its queue or daily audio limit."""
        try:
            await self.service.check_usage(self.identity.name, self.limits, adding_seconds)
        except LimitExceeded as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
            raise ServiceError(exc.status, exc.message, headers) from None

    def _release_upload_slot(self) -> None:
        self._stop_rate_watch()
        address, self._slot_address = self._slot_address, None
        if address is not None:
            self.service.release_upload_slot(address)

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
        self.send_error(408, exc_info=(ServiceError, ServiceError(408, message), None))

    def on_finish(self) -> None:
        super().on_finish()
        self._release_upload_slot()
        if not self._committed:  # whatever ended the request (a bug too), the staged files go
            self._discard()

    def data_received(self, chunk: bytes) -> None:
        if self._receiver is None or self._finished:
            return
        self._received += len(chunk)
        try:
            self._receiver.feed(chunk)
        except ServiceError as exc:
            self._discard()
            # Answer now and close: the rest of an oversized or broken body is not worth reading.
            self.send_error(exc.status, exc_info=(ServiceError, exc, None))

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self._release_upload_slot()
        if self._fetching is not None:
            self._fetching.cancel()  # the client left: stop downloading for nobody
        if not self._committed:
            if self._receiver is not None:
                log.info("upload cut short by the client; its staged file is removed")
            self._discard()

    def _discard(self) -> None:
        if self._intake is not None:
            self._intake.stop()
            self._intake = None
        if self._receiver is not None:
            self._receiver.close_file()
            self._receiver = None
        if self._job_id is not None and not self._committed:
            self.service.discard_upload(self._job_id)

    @property
    def upload_pending(self) -> bool:
        """False when the body was already refused (and answered) while streaming."""
        return not self._finished and self._receiver is not None

    def received_form(self, file_required: bool = True) -> ReceivedForm:
        """The finished form, or ServiceError (and the staged file is gone)."""
        assert self._receiver is not None
        self._stop_rate_watch()  # the whole body is here
        try:
            return self._receiver.finish(file_required)
        except ServiceError:
            self._discard()
            raise

    async def stage_resumable(self, form: ReceivedForm, upload_id: str) -> None:
        """A finished tus upload becomes this request's staged file (used once), or ServiceError."""
        assert self._job_id is not None
        try:
            staged = await self.service.resumable.take_for_job(upload_id, self.identity.name, self._job_id)
        except ServiceError as exc:
            self.refuse(exc)
        form.file_path, form.file_bytes, form.client_filename = staged

    async def stage_fetched(self, form: ReceivedForm, url: str) -> bool:
        """Download `url` into this request's staging dir, or ServiceError; False when the client left."""
        assert self._job_id is not None
        fetcher = self.service.fetcher
        try:
            await fetcher.check(url)  # refused by policy: a 400 before any connection is made
            self._fetching = asyncio.ensure_future(fetcher.fetch(url, self.service.staging_dir(self._job_id)))
            path, size, name = await self._fetching
        except PolicyError as exc:
            self.refuse(ServiceError(400, str(exc)))
        except FetchError as exc:
            self.refuse(ServiceError(exc.status, exc.message))
        except asyncio.CancelledError:
            self._discard()
            if self.request.connection.stream.closed():  # type: ignore[union-attr]
                return False
            raise
        finally:
            self._fetching = None
        if self._finished or self.request.connection.stream.closed():  # type: ignore[union-attr]
            self._discard()
            return False
        form.file_path, form.file_bytes, form.client_filename = path, size, name
        return True

    async def take_in(self, form: ReceivedForm) -> Media | None:
        """Probe, check and decode the staged file (intake.py), then weigh its audio against the
        caller's daily budget; ServiceError when refused, None when the client left meanwhile."""
        assert form.file_path is not None and self._job_id is not None
        intake = self._intake = Intake(self.service.config)
        try:
            media = await intake.accept(form.file_path, form.file_path.parent, form.client_filename)
        except IntakeError as exc:
            self._discard()
            if exc.status == CLIENT_LEFT:
                return None
            metrics.upload_refused(exc.status)
            raise ServiceError(exc.status, exc.message) from None
        if self._intake is None:  # the client left while its file was decoded; on_connection_close cleaned up
            return None
        self._intake = None
        form.file_path.unlink()  # the engine gets the canonical file only
        fail_point("intake-done")
        try:
            await self.check_limits(media.duration)  # now that the daily budget can be weighed
        except ServiceError as exc:
            self.refuse(exc)
        return media

    def stage_speakers(self, options: dict, references: list[tuple[str, str]]) -> None:
        """The job's diarization options (and reference samples already in its staging dir) beside its audio."""
        assert self._job_id is not None
        try:
            self.service.files.stage_speakers(self._job_id, options, references)
        except OSError as exc:
            self.refuse(ServiceError(500, f"the server could not write this job's speaker options ({exc.strerror})"))

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
            # Checked again in the transaction that writes the row: other uploads of this caller
            # (in this process or another) may have been accepted since the checks above.
            if time.monotonic() - self._room_checked_at > QUEUE_RECHECK_SECONDS:
                await self.service.check_queue_room()  # again: others may have filled it while this body arrived
            job = await self.service.submit(new_job, hf_token, quota(self.limits))
        except QuotaExceeded as exc:
            self._discard()
            over = refusal(self.identity.name, self.limits, exc.limit, exc.used, new_job.audio_seconds or 0.0)
            raise ServiceError(over.status, over.message, {"Retry-After": str(over.retry_after)}) from None
        except Exception:
            self._discard()
            raise
        self._committed = True
        self._receiver = None
        return job


async def deliver(handler: BaseHandler, job: Job, body: dict[str, Any] | str,
                  content_type: str = "application/json; charset=utf-8") -> None:
    """Send the result; only once the whole response is written out is the delivery recorded
    (the files then stay for the grace window, in case the client's read was cut short)."""
    handler.set_status(200)
    handler.set_header("Content-Type", content_type)
    handler.write(body)
    stream = handler.request.connection.stream  # type: ignore[union-attr]
    try:
        await handler.finish()
    except StreamClosedError:
        stream = None
    # Tornado resolves finish()'s future even when the write failed (its HTTP/1 connection
    # swallows StreamClosedError); the stream keeps the error.
    if stream is None or stream.error is not None:
        log.info("job %s: client left before the whole result was sent; result kept", job.id)
        return
    # The response is finished, so the handler no longer counts as in flight: count this
    # last write, so that a shutdown waits for it before closing the ledger.
    handler.service.requests_in_flight += 1
    try:
        await handler.service.mark_delivered(job, handler.identity.name)
    finally:
        handler.service.requests_in_flight -= 1
