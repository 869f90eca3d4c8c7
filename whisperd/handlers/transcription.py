"""/transcription: submit (streamed multipart upload), status, result, cancel."""

from __future__ import annotations

import logging
from typing import Any

from tornado.iostream import StreamClosedError
from tornado.web import stream_request_body

from ..config import OUTPUT_FORMATS
from ..forms import parse_job_request
from ..jobfiles import is_job_id, new_job_id
from ..ledger import Job, NewJob
from ..probe import probe
from ..service import JobError
from ..uploads import FORM_OVERHEAD, MultipartReceiver, UploadError, boundary_of
from .base import ApiError, BaseHandler

log = logging.getLogger("whisperd.http")


def job_urls(job_id: str) -> dict[str, str]:
    return {"job_id": job_id, "status_url": f"/transcription/{job_id}"}


@stream_request_body
class SubmitHandler(BaseHandler):
    allowed_methods = ("OPTIONS", "POST", "GET", "DELETE")  # as the spec's preflight answer lists

    _receiver: MultipartReceiver | None = None
    _job_id: str | None = None
    _committed = False
    _holds_slot = False

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method != "POST":
            return
        if self.service.draining:
            raise ApiError(503, "the server is shutting down; try again in a moment", {"Retry-After": "10"})
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
        self._receiver = MultipartReceiver(boundary, staging, limit)

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
        if not self._committed:
            self._discard()

    def _discard(self) -> None:
        if self._receiver is not None:
            self._receiver.close_file()
            self._receiver = None
        if self._job_id is not None and not self._committed:
            self.service.files.remove_all(self._job_id)

    async def post(self) -> None:
        if self._finished or self._receiver is None:
            return
        try:
            form = self._receiver.finish()
            request = parse_job_request(form.fields, self.service.config, self.service.offline)
        except UploadError as exc:
            self._discard()
            raise ApiError(exc.status, exc.message) from None
        assert form.file_path is not None
        probed = await probe(self.service.config.WHISPER_FFPROBE, form.file_path)
        if not probed.ok:
            self._discard()
            raise ApiError(415, f"the uploaded file '{form.client_filename}' is not audio or video with sound: "
                                f"ffprobe found {probed.found}")
        if self._receiver is None:
            return  # the client left while the file was probed; on_connection_close cleaned up
        warnings = []
        hf_token = self.service.resolve_hf_token(request.hf_token) if request.diarize else None
        diarize = request.diarize
        if diarize and not hf_token:
            diarize = False
            warnings.append(
                "speaker diarization skipped: no Hugging Face token (form field hf_token, HF_TOKEN, "
                "or the file in WHISPER_HF_TOKEN_FILE)"
            )
            log.warning("job %s: diarization requested without a Hugging Face token; running without it", self._job_id)
        assert self._job_id is not None
        new_job = NewJob(
            id=self._job_id, owner=self.identity.name, filename=form.client_filename,
            upload_bytes=form.file_bytes, language=request.language, model=request.model,
            response_format=request.response_format, diarize=diarize, prompt=request.prompt,
            device=request.device, device_index=request.device_index, warnings=warnings,
        )
        try:
            job = await self.service.submit(new_job, hf_token)
        except Exception:
            self._discard()
            raise
        self._committed = True
        self._receiver = None
        log.info("job %s accepted: %s, %d bytes, %s", job.id, job.filename, job.upload_bytes,
                 "sync" if request.sync else "async")
        if request.sync:
            await self._answer_sync(job)
        else:
            self.set_header("Location", f"/transcription/{job.id}")
            self.send_json(job_urls(job.id), 202)

    async def _answer_sync(self, job: Job) -> None:
        timeout = self.service.config.SYNC_REQUEST_TIMEOUT_SECONDS or None
        ended = await self.service.wait_finished(job.id, timeout)
        if ended is None or not ended.finished:
            # The wait ran out (or the server is stopping): the job goes on, nothing is lost.
            self.set_header("Location", f"/transcription/{job.id}")
            body = job_urls(job.id)
            body["status"] = ended.status if ended else "Queued"
            body["message"] = "still running: poll status_url, then fetch the result"
            self.send_json(body, 202)
            return
        try:
            body = await self.service.result_of(ended, ended.response_format)
        except JobError as exc:
            raise ApiError(exc.status, exc.message) from None
        await _deliver(self, ended, body)


async def _deliver(handler: BaseHandler, job: Job, body: dict[str, Any]) -> None:
    """Send the result, and only once it is written out, delete every file of the job."""
    handler.set_status(200)
    handler.set_header("Content-Type", "application/json; charset=utf-8")
    handler.write(body)
    try:
        await handler.flush()
    except StreamClosedError:
        log.info("job %s: client left before the result was sent; result kept", job.id)
        return
    await handler.service.mark_delivered(job, handler.identity.name)
    handler.finish()


class _JobLookup(BaseHandler):
    async def _job(self, job_id: str) -> Job:
        job = await self.service.ledger.get(job_id) if is_job_id(job_id) else None
        return self.job_or_404(job, job_id)


class JobHandler(_JobLookup):
    allowed_methods = ("OPTIONS", "GET", "DELETE")

    async def get(self, job_id: str) -> None:
        job = await self._job(job_id)
        if job.status == "Canceled":
            raise ApiError(410, f"job {job.id} was canceled at {job.finished_at}")
        if job.expired_at:
            raise ApiError(410, f"job {job.id} expired at {job.expired_at} (retention period over); its files are deleted")
        body: dict[str, Any] = {"status": job.status}
        if job.status == "Queued":
            body["queue_position"] = await self.service.queue_position(job)
        elif job.status == "Processing":
            body["progress"] = job.progress
            body["stage"] = job.stage
        if job.status == "Failed":
            body["data"] = job.error
        elif job.delivered_at:
            body["data"] = f"result delivered at {job.delivered_at}; its files are deleted"
        elif job.warnings:
            body["data"] = "; ".join(job.warnings)
        if job.warnings:
            body["warnings"] = job.warnings
        self.send_json(body)

    async def delete(self, job_id: str) -> None:
        await self._job(job_id)
        outcome, job = await self.service.cancel(job_id, self.identity.name)
        if outcome == "canceled":
            self.send_json({"success": True, "message": "Job canceled successfully"})
        elif outcome == "missing" or job is None:
            raise ApiError(404, f"no job with id {job_id!r}")
        elif outcome == "pending":
            raise ApiError(409, f"job {job_id} is being stopped; check its status in a moment")
        else:
            raise ApiError(409, f"job {job_id} cannot be canceled: it is already {job.status}")


class ResultHandler(_JobLookup):
    allowed_methods = ("OPTIONS", "GET")

    async def get(self, job_id: str) -> None:
        job = await self._job(job_id)
        fmt = self.get_query_argument("response_format", "").strip().lower() or job.response_format
        if fmt not in OUTPUT_FORMATS:
            raise ApiError(400, f"'response_format' must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt[:40]!r}")
        try:
            body = await self.service.result_of(job, fmt)
        except JobError as exc:
            raise ApiError(exc.status, exc.message) from None
        await _deliver(self, job, body)
