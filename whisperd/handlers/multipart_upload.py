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
from .. import clock
from ..identity.auth import ANONYMOUS, ANY_TOKEN, Identity
from ..errors import Kind, ServiceError
from ..faults import fail_point
from ..fetch import FetchError
from ..integers import integer_input
from ..intake import Intake, IntakeError, Media
from ..jobfiles import new_job_id
from ..jobs import Job, NewJob
from ..ledger import QuotaExceeded, UploadUnusable
from ..identity.limits import LimitExceeded, Limits, file_size_limit, quota, refusal
from ..multipart import FORM_OVERHEAD, MultipartReceiver, ReceivedForm, boundary_of
from ..ratefloor import RateFloor
from ..urlpolicy import PolicyError
from .base import BaseHandler, status_of

log = logging.getLogger("whisperd.http")

# The queue's room is checked before a body is read, and again before its job is written if the
# body took longer than this to arrive (the cap is approximate across processes anyway).
QUEUE_RECHECK_SECONDS = 1.0


def slot_owner(identity: Identity) -> str | None:
    """Whose share of the upload slots an upload counts against: None for the one identity every
    caller shares (WHISPER_API_ALLOW_ANY_TOKEN, authorization off), where a per-token share
    would only halve the server's slots for everyone."""
    return None if identity is ANY_TOKEN or identity is ANONYMOUS else identity.name


@stream_request_body
class MultipartUploadHandler(BaseHandler):
    """POST bodies stream to the job's staging dir; nothing is a job until submit() commits it."""

    repeatable_fields: frozenset[str] = frozenset()

    _receiver: MultipartReceiver | None = None
    _job_id: str | None = None
    _committed = False
    _slot_address: str | None = None
    _fetching: "asyncio.Future | None" = None
    _intake: Intake | None = None
    _rate: RateFloor | None = None
    _resumable_id: str | None = None  # upload=<id>: the tus upload this request's audio comes from
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
            declared = integer_input(length, "Content-Length")
            if declared > limit + FORM_OVERHEAD:
                raise ServiceError(Kind.TOO_LARGE, f"request body of {length} bytes is larger than {limit_name} ({limit} bytes)")
            self._declared = declared
        else:
            # Chunked: Tornado checks each chunk's declared size against its own limit before our
            # count (MultipartReceiver) sees the bytes, which it hands over a chunk_size at a time,
            # and refuses with a bare 400. Ours must come first to answer 413 JSON: Tornado's stays
            # as a backstop, twice as far plus two hand-overs.
            connection = self.request.connection
            connection.set_max_body_size(2 * (self.service.config.MAX_FILE_SIZE + FORM_OVERHEAD +  # type: ignore[union-attr]
                                              connection.params.chunk_size))  # type: ignore[union-attr]
        # Before a byte is stored: a refused upload leaves nothing.
        await self.service.check_queue_room()
        self._room_checked_at = clock.monotonic()
        await self.check_limits()
        address = self.request.remote_ip or "?"
        self.service.take_upload_slot(address, slot_owner(self.identity))
        self._slot_address = address
        self.service.check_disk()
        boundary = boundary_of(self.request.headers.get("Content-Type"))
        self._job_id = new_job_id()
        staging = self.service.staging_dir(self._job_id)
        self._receiver = MultipartReceiver(boundary, staging, limit, repeatable=self.repeatable_fields,
                                           limit_name=limit_name, field_limits=self.field_limits)
        self._watch_rate()

    async def check_limits(self, adding_seconds: float = 0.0) -> None:
        """LimitExceeded (retry after a while) when the caller is over its queue or daily audio limit."""
        await self.service.check_usage(self.identity.name, self.limits, adding_seconds)

    def _release_upload_slot(self) -> None:
        self._stop_rate_watch()
        address, self._slot_address = self._slot_address, None
        if address is not None:
            self.service.release_upload_slot(address, slot_owner(self.identity))

    def _watch_rate(self) -> None:
        """Cut a body that arrives slower than the floor: a trickle must not hold a slot for minutes."""
        self._rate = RateFloor(self.service.config, self._too_slow, self._declared).start()

    def _stop_rate_watch(self) -> None:
        if self._rate is not None:
            self._rate.stop()

    def _too_slow(self, got: int) -> None:
        if self._finished:
            return
        assert self._rate is not None
        log.warning("upload from %s cut: %d bytes in the last %.0f s, below WHISPER_UPLOAD_MIN_BYTES_PER_SECOND=%d",
                    self.request.remote_ip, got, self._rate.window, self._rate.floor)
        metrics.upload_cut()
        self._discard()
        message = f"the upload was too slow: {self._rate.message(got)}; the connection is closed"
        self.answer_now(ServiceError(Kind.TOO_SLOW, message))

    def on_finish(self) -> None:
        super().on_finish()
        self._release_upload_slot()
        if not self._committed:  # whatever ended the request (a bug too), the staged files go
            self._discard()

    def data_received(self, chunk: bytes) -> None:
        if self._receiver is None or self._finished:
            return
        if self._rate is not None:
            self._rate.add(len(chunk))
        try:
            try:
                self._receiver.feed(chunk)
            except OSError as error:  # faults: read-only or full job storage is 503/507, never a 500
                refusal = self.service.storage_refusal(error)
                if refusal is None:
                    raise
                raise refusal from None
        except ServiceError as exc:
            self._discard()
            # Answer now and close: the rest of an oversized or broken body is not worth reading.
            self.answer_now(exc)

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
        """A finished tus upload becomes this request's staged file, or ServiceError. It is used up
        only when its job is accepted (submit) or its content is refused as media (415, take_in):
        any other refusal, or a client that leaves, leaves it as it was."""
        assert self._job_id is not None
        limit, limit_name = file_size_limit(self.limits, self.service.config.MAX_FILE_SIZE)
        try:
            staged = await self.service.resumable.stage_for_job(upload_id, self.identity.name, self._job_id,
                                                                limit, limit_name)
        except ServiceError as exc:
            self.refuse(exc)
        self._resumable_id = upload_id
        form.file_path, form.file_bytes, form.client_filename = staged

    async def stage_fetched(self, form: ReceivedForm, url: str) -> bool:
        """Download `url` into this request's staging dir, or ServiceError; False when the client left."""
        assert self._job_id is not None
        fetcher = self.service.fetcher
        try:
            await fetcher.check(url)  # refused by policy: a 400 before any connection is made
            limit, limit_name = file_size_limit(self.limits, self.service.config.MAX_FILE_SIZE)
            self._fetching = asyncio.ensure_future(fetcher.fetch(url, self.service.staging_dir(self._job_id),
                                                                 limit, limit_name))
            path, size, name = await self._fetching
        except PolicyError as exc:
            self.refuse(ServiceError(Kind.INVALID, str(exc)))
        except FetchError as exc:
            self.refuse(exc)
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
            if exc.kind is Kind.CLIENT_LEFT:
                return None
            metrics.upload_refused(status_of(exc))
            if exc.kind is Kind.UNSUPPORTED_MEDIA and self._resumable_id is not None:
                try:
                    await self.service.resumable.use_up(self._resumable_id)  # not media: no retry can help
                except Exception as failure:  # retention removes it when it expires
                    log.warning("upload %s: refused as media but not removed: %s", self._resumable_id, failure)
            raise
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

    def client_left(self) -> bool:
        """True (and the staged files gone) when the client hung up: nobody is there to be told of
        a job, so none is made (and a resumable upload stays unused)."""
        if self._finished or self.request.connection.stream.closed():  # type: ignore[union-attr]
            self._discard()
            return True
        return False

    def stage_speakers(self, options: dict, references: list[tuple[str, str]]) -> None:
        """The job's diarization options (and reference samples already in its staging dir) beside its audio."""
        assert self._job_id is not None
        try:
            self.service.files.stage_speakers(self._job_id, options, references)
        except OSError as exc:
            self.refuse(ServiceError(Kind.INTERNAL, f"the server could not write this job's speaker options ({exc.strerror})"))

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
            if clock.monotonic() - self._room_checked_at > QUEUE_RECHECK_SECONDS:
                await self.service.check_queue_room()  # again: others may have filled it while this body arrived
            job = await self.service.submit(new_job, hf_token, quota(self.limits), self._resumable_id)
        except UploadUnusable as exc:
            self._discard()
            raise ServiceError(Kind.CONFLICT, f"upload {exc.upload_id} was just used by another request (or expired)") from None
        except QuotaExceeded as exc:
            self._discard()
            over = refusal(self.identity.name, self.limits, exc.limit, exc.used, new_job.audio_seconds or 0.0)
            raise over from None
        except BaseException:
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
    handler.service.request_began()
    try:
        await handler.service.mark_delivered(job, handler.identity.name)
    finally:
        handler.service.request_ended()
