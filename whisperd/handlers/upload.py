"""The streamed audio upload and job submission shared by /transcription and /v1/audio/transcriptions.

The audio of a job arrives in the staging dir by one of three ways (a multipart file part, a
finished resumable upload moved there, a URL fetched there); from then on every source takes
the same path: probe, then service.submit.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tornado.iostream import StreamClosedError
from tornado.web import stream_request_body

from .. import metrics
from ..fetch import FetchError
from ..jobfiles import is_job_id, new_job_id
from ..jobs import Job, NewJob, now_iso
from ..ledger import QuotaExceeded
from ..limits import LimitExceeded, Limits, check_usage, file_size_limit, quota, refusal
from ..probe import duration, probe
from ..uploads import FORM_OVERHEAD, MultipartReceiver, ReceivedForm, UploadError, boundary_of
from ..urlpolicy import PolicyError
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
    _fetching: "asyncio.Future | None" = None
    _audio_seconds: float | None = None
    limits: Limits

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method != "POST":
            return
        if self.service.draining:
            raise ApiError(503, "the server is shutting down; try again in a moment", {"Retry-After": "10"})
        self.limits = self.identity.limits.resolved(self.service.config)
        limit, limit_name = file_size_limit(self.limits, self.service.config.MAX_FILE_SIZE)
        length = self.request.headers.get("Content-Length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "Content-Length is not a number")
            if int(length) > limit + FORM_OVERHEAD:
                raise ApiError(413, f"request body of {length} bytes is larger than {limit_name} ({limit} bytes)")
        await self.check_limits()  # before a byte is stored: a refused upload leaves nothing
        self._take_upload_slot()
        self._check_disk()
        try:
            boundary = boundary_of(self.request.headers.get("Content-Type"))
        except UploadError as exc:
            raise ApiError(exc.status, exc.message) from None
        self._job_id = new_job_id()
        staging = self.service.files.staging_dir(self._job_id)
        self._receiver = MultipartReceiver(boundary, staging, limit, repeatable=self.repeatable_fields,
                                           limit_name=limit_name)

    async def check_limits(self, adding_seconds: float = 0.0) -> None:
        """ApiError 429 (with Retry-After) when the caller is over its queue or daily audio limit."""
        try:
            await check_usage(self.service.ledger, self.identity.name, self.limits, adding_seconds)
        except LimitExceeded as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
            raise ApiError(exc.status, exc.message, headers) from None

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
        self._release_upload_slot()
        if self._fetching is not None:
            self._fetching.cancel()  # the client left: stop downloading for nobody
        if not self._committed:
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

    def received_form(self, file_required: bool = True) -> ReceivedForm:
        """The finished form, or ApiError (and the staged file is gone)."""
        assert self._receiver is not None
        try:
            return self._receiver.finish(file_required)
        except UploadError as exc:
            self._discard()
            raise ApiError(exc.status, exc.message) from None

    async def stage_resumable(self, form: ReceivedForm, upload_id: str) -> None:
        """A finished tus upload becomes this request's staged file (used once), or ApiError."""
        ledger = self.service.ledger
        upload = await ledger.get_upload(upload_id) if is_job_id(upload_id) else None
        if upload is None or upload.owner != self.identity.name or upload.expired(now_iso()):
            self.refuse(ApiError(404, f"no resumable upload with id {upload_id[:60]!r} (unknown, another "
                                      "token's, or expired)"))
        if upload.job_id is not None:
            self.refuse(ApiError(409, f"upload {upload_id} was already used by job {upload.job_id}; "
                                      "an upload becomes one job only: upload the file again"))
        if not upload.complete:
            self.refuse(ApiError(409, f"upload {upload_id} is not finished: {upload.upload_offset} of "
                                      f"{upload.upload_length} bytes received; PATCH the rest first"))
        assert self._job_id is not None
        if not await ledger.use_upload(upload_id, self._job_id):
            self.refuse(ApiError(409, f"upload {upload_id} was just used by another request (or expired)"))
        try:
            path = self.service.files.stage_resumable(upload_id, self._job_id, upload.filename)
        except FileNotFoundError:
            self.refuse(ApiError(410, f"the bytes of upload {upload_id} are gone from the server; upload again"))
        form.file_path, form.file_bytes, form.client_filename = path, upload.upload_length, upload.filename

    async def stage_fetched(self, form: ReceivedForm, url: str) -> bool:
        """Download `url` into this request's staging dir, or ApiError; False when the client left."""
        assert self._job_id is not None
        fetcher = self.service.fetcher
        try:
            await fetcher.check(url)  # refused by policy: a 400 before any connection is made
            self._fetching = asyncio.ensure_future(fetcher.fetch(url, self.service.files.staging_dir(self._job_id)))
            path, size, name = await self._fetching
        except PolicyError as exc:
            self.refuse(ApiError(400, str(exc)))
        except FetchError as exc:
            self.refuse(ApiError(exc.status, exc.message))
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

    async def probe_upload(self, form: ReceivedForm) -> bool:
        """ffprobe the staged file: ApiError 415 when it holds no sound; False when the client left meanwhile."""
        assert form.file_path is not None
        probed = await probe(self.service.config.WHISPER_FFPROBE, form.file_path)
        if not probed.ok:
            self._discard()
            raise ApiError(415, f"the uploaded file '{form.client_filename}' is not audio or video with sound: "
                                f"ffprobe found {probed.found}")
        self._audio_seconds = await duration(self.service.config.WHISPER_FFPROBE, form.file_path)
        if self._receiver is None:
            return False  # the client left while the file was probed; on_connection_close cleaned up
        try:
            await self.check_limits(self._audio_seconds or 0.0)  # now that the daily budget can be weighed
        except ApiError as exc:
            self.refuse(exc)
        return self._receiver is not None

    def refuse(self, error: Exception) -> None:
        """A form we will not run: drop the staged file before the error goes out."""
        self._discard()
        raise error

    def new_job(self, form: ReceivedForm, **fields: Any) -> NewJob:
        assert self._job_id is not None
        return NewJob(id=self._job_id, owner=self.identity.name, filename=form.client_filename,
                      upload_bytes=form.file_bytes, audio_seconds=self._audio_seconds, **fields)

    async def submit(self, new_job: NewJob, hf_token: str | None) -> Job:
        try:
            # Checked again in the transaction that writes the row: other uploads of this caller
            # (in this process or another) may have been accepted since the checks above.
            job = await self.service.submit(new_job, hf_token, quota(self.limits))
        except QuotaExceeded as exc:
            self._discard()
            over = refusal(self.identity.name, self.limits, exc.limit, exc.used, new_job.audio_seconds or 0.0)
            raise ApiError(over.status, over.message, {"Retry-After": str(over.retry_after)}) from None
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
