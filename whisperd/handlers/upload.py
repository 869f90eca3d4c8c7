"""The streamed audio upload and job submission shared by /transcription and /v1/audio/transcriptions."""

from __future__ import annotations

import logging
from typing import Any

from tornado.iostream import StreamClosedError
from tornado.web import stream_request_body

from .. import metrics
from ..jobfiles import new_job_id
from ..jobs import Job, NewJob
from ..probe import probe
from ..uploads import FORM_OVERHEAD, MultipartReceiver, ReceivedForm, UploadError, boundary_of
from .base import ApiError, BaseHandler

log = logging.getLogger("whisperd.http")


@stream_request_body
class UploadHandler(BaseHandler):
    """POST bodies stream to the job's staging dir; nothing is a job until submit() commits it."""

    repeatable_fields: frozenset[str] = frozenset()

    _receiver: MultipartReceiver | None = None
    _job_id: str | None = None
    _committed = False
    _holds_slot = False

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method != "POST":
            return
        limit = self.service.config.MAX_FILE_SIZE
        length = self.request.headers.get("Content-Length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "Content-Length is not a number")
            if int(length) > limit + FORM_OVERHEAD:
                raise ApiError(413, f"request body of {length} bytes is larger than MAX_FILE_SIZE ({limit} bytes)")
        self._take_upload_slot()
        self._check_disk()
        try:
            boundary = boundary_of(self.request.headers.get("Content-Type"))
        except UploadError as exc:
            raise ApiError(exc.status, exc.message) from None
        self._job_id = new_job_id()
        staging = self.service.files.staging_dir(self._job_id)
        self._receiver = MultipartReceiver(boundary, staging, limit, repeatable=self.repeatable_fields)

    def _take_upload_slot(self) -> None:
        cap = self.service.config.WHISPER_MAX_PENDING_UPLOADS
        if self.service.uploads_in_flight >= cap:
            raise ApiError(429, f"too many uploads in progress (limit {cap}); try again in a few seconds",
                           {"Retry-After": "5"})
        self.service.uploads_in_flight += 1
        self._holds_slot = True

    def _release_upload_slot(self) -> None:
        if self._holds_slot:
            self._holds_slot = False
            self.service.uploads_in_flight -= 1

    def _check_disk(self) -> None:
        # The floor, not the upload's size: a disk that fills up during the write is refused
        # with 507 too (uploads.py), and the floor keeps room for the engine's output.
        floor_mb = self.service.config.WHISPER_MIN_FREE_DISK_MB
        free_mb = self.service.files.free_disk_mb()
        if free_mb < floor_mb:
            raise ApiError(507, f"the server is short of disk space ({free_mb:.0f} MB free, keeps at least "
                                f"WHISPER_MIN_FREE_DISK_MB={floor_mb}); try again later")

    def on_finish(self) -> None:
        super().on_finish()
        self._release_upload_slot()

    def data_received(self, chunk: bytes) -> None:
        if self._receiver is None or self._finished:
            return
        try:
            self._receiver.feed(chunk)
        except UploadError as exc:
            self._discard()
            # Answer now and close: the rest of an oversized or broken body is not worth reading.
            self.send_error(exc.status, exc_info=(ApiError, ApiError(exc.status, exc.message), None))

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self._release_upload_slot()
        if not self._committed:
            if self._receiver is not None:
                log.info("upload cut short by the client; its staged file is removed")
            self._discard()

    def _discard(self) -> None:
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
        try:
            return self._receiver.finish()
        except UploadError as exc:
            self._discard()
            raise ApiError(exc.status, exc.message) from None

    async def probe_upload(self, form: ReceivedForm) -> bool:
        """ffprobe the staged file: ApiError 415 when it holds no sound; False when the client left meanwhile."""
        assert form.file_path is not None
        probed = await probe(self.service.config.WHISPER_FFPROBE, form.file_path)
        if not probed.ok:
            self._discard()
            raise ApiError(415, f"the uploaded file '{form.client_filename}' is not audio or video with sound: "
                                f"ffprobe found {probed.found}")
        # The client left while the file was probed; on_connection_close cleaned up.
        return self._receiver is not None

    def refuse(self, error: Exception) -> None:
        """A form we will not run: drop the staged file before the error goes out."""
        self._discard()
        raise error

    def new_job(self, form: ReceivedForm, **fields: Any) -> NewJob:
        assert self._job_id is not None
        return NewJob(id=self._job_id, owner=self.identity.name, filename=form.client_filename,
                      upload_bytes=form.file_bytes, **fields)

    async def submit(self, new_job: NewJob, hf_token: str | None) -> Job:
        try:
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
