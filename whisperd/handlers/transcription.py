"""/transcription: submit (streamed multipart upload, a finished resumable upload, or a URL), list, status,
result, cancel."""

from __future__ import annotations

import logging
from typing import Any

from ..config import OUTPUT_FORMATS
from ..errors import Kind, ServiceError
from ..forms import parse_job_request
from ..forms import JobRequest
from ..jobs import Job
from ..multipart import ReceivedForm
from .base import BaseHandler
from .tenants import list_jobs
from .multipart_upload import MultipartUploadHandler, deliver

log = logging.getLogger("whisperd.http")


def job_urls(job_id: str) -> dict[str, str]:
    return {"job_id": job_id, "status_url": f"/transcription/{job_id}"}


class SubmitHandler(MultipartUploadHandler):
    allowed_methods = ("OPTIONS", "POST", "GET", "DELETE")  # as the spec's preflight answer lists

    async def get(self) -> None:
        await list_jobs(self)

    async def post(self) -> None:
        if not self.upload_pending:
            return
        form = self.received_form(file_required=False)
        try:
            request = parse_job_request(form.fields, self.service.config, self.service.offline)
        except ServiceError as exc:
            self.refuse(exc)
        if form.file_path is not None and (request.upload or request.url):
            self.refuse(ServiceError(Kind.INVALID, "give one source of audio: 'file', 'upload' or 'url', not several"))
        if request.upload:
            await self.stage_resumable(form, request.upload)
        elif request.url:
            if not await self.stage_fetched(form, request.url):
                return  # the client left during the fetch; its files are gone
        elif form.file_path is None:
            self.refuse(ServiceError(Kind.INVALID, "the form field 'file' (the audio file) is missing; or name a finished "
                                      "resumable upload with 'upload', or media to fetch with 'url'"))
        await self.intake(form, request)

    async def intake(self, form: ReceivedForm, request: JobRequest) -> None:
        """A staged file, whatever brought it, becomes a job: intake (probe, allow-list, duration,
        canonical audio), webhook check, submit, answer. The one path for every source
        (multipart file, resumable upload, URL)."""
        media = await self.take_in(form)
        if media is None:
            return  # the client left while its file was taken in
        if request.callback_url:
            try:
                await self.service.check_callback(request.callback_url)
            except ServiceError as exc:
                self.refuse(exc)
            if not self.upload_pending:
                return  # the client left while its callback host was looked up
        # The row records what was asked; whether diarization can run (a token, the pipeline at
        # hand) is decided once, by the runner, with the token this resolves now.
        hf_token = self.service.resolve_hf_token(request.hf_token) if request.diarize else None
        if self.client_left():
            log.info("submission dropped: the client left before its job was accepted")
            return
        new_job = self.new_job(
            form, media, language=request.language, model=request.model,
            response_format=request.response_format, diarize=request.diarize, prompt=request.prompt,
            device=request.device, device_index=request.device_index, callback_url=request.callback_url,
            task=request.task, batch_size=request.batch_size,
        )
        if request.diarize and request.speakers:
            self.stage_speakers(request.speakers, [])
        job = await self.submit(new_job, hf_token)
        log.info("job %s accepted: %s, %d bytes, %s", job.id, job.filename, job.upload_bytes,
                 "sync" if request.sync else "async")
        if request.sync:
            await self._answer_sync(job)
        else:
            self.set_header("Location", f"/transcription/{job.id}")
            self.send_json(job_urls(job.id), 202)

    async def _answer_sync(self, job: Job) -> None:
        timeout = self.service.config.SYNC_REQUEST_TIMEOUT_SECONDS or None
        # The job is accepted: a ledger outage meanwhile ends the wait with 202 and the job id
        # (below), never with a 503 that would have the client submit the work again.
        ended = await self.service.wait_finished(job.id, timeout, known=job)
        if ended is None or not ended.finished:
            # The wait ran out (or the server is stopping): the job goes on, nothing is lost.
            self.set_header("Location", f"/transcription/{job.id}")
            body = job_urls(job.id)
            body["status"] = ended.status if ended else "Queued"
            body["message"] = "still running: poll status_url, then fetch the result"
            self.send_json(body, 202)
            return
        body = await self.service.result_of(ended, ended.response_format)
        await deliver(self, ended, body)


async def status_body(service, job: Job, position: int | None = None) -> dict[str, Any]:
    """GET /transcription/{id}'s body for a job that is not canceled or expired; `position`: a
    Queued job's queue_position when the caller read it with the job (else it is read here)."""
    body: dict[str, Any] = {"status": job.status}
    if job.status == "Queued":
        body["queue_position"] = position if position is not None else await service.queue_position(job)
    elif job.status == "Processing":
        body["progress"] = job.progress
        body["stage"] = job.stage
    if job.detected_language:
        body["detected_language"] = job.detected_language  # the spoken language, also for a translation
    if job.task != "transcribe":
        body["task"] = job.task  # a plain transcription's status keeps the spec's shape
    if job.status == "Failed":
        body["data"] = job.error
    elif job.delivered_at:
        body["data"] = f"result delivered at {job.delivered_at}; its files are deleted"
    elif job.warnings:
        body["data"] = "; ".join(job.warnings)
    if job.warnings:
        body["warnings"] = job.warnings
    return body


class _JobLookup(BaseHandler):
    async def _job(self, job_id: str) -> Job:
        return self.job_or_404(await self.service.job(job_id), job_id)


class JobHandler(_JobLookup):
    allowed_methods = ("OPTIONS", "GET", "DELETE")

    async def get(self, job_id: str) -> None:
        job, position = await self.service.job_and_position(job_id)
        job = self.job_or_404(job, job_id)
        if job.status == "Canceled":
            raise ServiceError(Kind.GONE, f"job {job.id} was canceled at {job.finished_at}")
        if job.expired_at:
            raise ServiceError(Kind.GONE, f"job {job.id} expired at {job.expired_at} (retention period over); its files are deleted")
        self.send_json(await status_body(self.service, job, position))

    async def delete(self, job_id: str) -> None:
        await self._job(job_id)
        outcome, job = await self.service.cancel(job_id, self.identity.name)
        if outcome == "canceled":
            self.send_json({"success": True, "message": "Job canceled successfully"})
        elif outcome == "missing" or job is None:
            raise ServiceError(Kind.NOT_FOUND, f"no job with id {job_id!r}")
        elif outcome == "pending":
            raise ServiceError(Kind.CONFLICT, f"job {job_id} is being stopped; check its status in a moment")
        else:
            raise ServiceError(Kind.CONFLICT, f"job {job_id} cannot be canceled: it is already {job.status}")


class ResultHandler(_JobLookup):
    allowed_methods = ("OPTIONS", "GET")

    async def get(self, job_id: str) -> None:
        job = await self._job(job_id)
        fmt = self.get_query_argument("response_format", "").strip().lower() or job.response_format
        if fmt not in OUTPUT_FORMATS:
            raise ServiceError(Kind.INVALID, f"'response_format' must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt[:40]!r}")
        body = await self.service.result_of(job, fmt, self.identity.name)
        await deliver(self, job, body)
