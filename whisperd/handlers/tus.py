"""/uploads: resumable uploads by tus 1.0.0 (core, creation, termination, expiration, checksum/sha1).

A client creates an upload (POST, Upload-Length), sends its bytes in one or more PATCHes from
the offset HEAD reports, and names the finished upload in POST /transcription (`upload=<id>`).
The ledger's upload_offset is the truth: bytes stored past it do not count and the next PATCH
writes over them, so a PATCH cut off, a crash, or a restart between two PATCHes loses nothing
that was acknowledged. A PATCH body goes to disk chunk by chunk, as multipart uploads do (on the
S3 backend, to a spool the store turns into parts: store/s3_tus.py); resumable.py claims the
upload for it, cluster-wide, and counts what it wrote.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any

from tornado.web import stream_request_body

from ..jobfiles import display_name, new_job_id
from ..identity.limits import check_open_uploads, file_size_limit
from ..ratefloor import RateFloor
from ..jobs import UploadRecord, now_iso
from ..errors import Kind, ServiceError
from ..integers import BadInteger, strict_int
from ..resumable import Patch, idle_hours, iso_in
from ..tasks import spawn
from .base import BaseHandler
from .multipart_upload import slot_owner

log = logging.getLogger("whisperd.tus")

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,termination,expiration,checksum"
CHECKSUM_ALGORITHMS = "sha1"
OFFSET_TYPE = "application/offset+octet-stream"
MAX_METADATA_CHARS = 4096
MAX_BYTES = 10**18  # any larger Upload-Length or Upload-Offset is refused as a number, before any limit
REQUEST_HEADERS = ("Authorization, Content-Type, Tus-Resumable, Upload-Length, Upload-Metadata, Upload-Offset, "
                   "Upload-Checksum, Upload-Defer-Length, Upload-Concat, X-HTTP-Method-Override, X-Requested-With")
EXPOSED_HEADERS = ("Location, Upload-Offset, Upload-Length, Upload-Metadata, Upload-Expires, Tus-Resumable, "
                   "Tus-Version, Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm")


def parse_metadata(text: str) -> dict[str, str]:
    """Upload-Metadata: comma-separated `key base64value` pairs (the value may be absent)."""
    found: dict[str, str] = {}
    for pair in filter(None, (part.strip() for part in text.split(","))):
        key, _, encoded = pair.partition(" ")
        if not key or not key.isascii() or " " in key or key in found:
            raise ServiceError(Kind.INVALID, f"Upload-Metadata: bad or repeated key {key[:40]!r}")
        try:
            found[key] = base64.b64decode(encoded.strip(), validate=True).decode("utf-8") if encoded else ""
        except (binascii.Error, UnicodeDecodeError):
            raise ServiceError(Kind.INVALID, f"Upload-Metadata: the value of {key[:40]!r} is not base64 of UTF-8 text") from None
    return found


def http_date(stamp: str) -> str:
    moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return format_datetime(moment, usegmt=True)


def _number(value: str | None, name: str) -> int:
    try:
        return strict_int(value, name, maximum=MAX_BYTES)
    except BadInteger:
        raise ServiceError(Kind.INVALID, f"{name} must be a whole number of bytes >= 0 in digits 0-9, "
                                f"got {str(value)[:40]!r}") from None


class _Writing:
    """One PATCH as the handler sees it: its bytes (resumable.Patch) and the hash of its body."""

    def __init__(self, patch: Patch, algorithm: str | None, expected: bytes | None) -> None:
        self.patch = patch
        self.hasher = hashlib.new(algorithm) if algorithm else None
        self.expected = expected

    def write(self, chunk: bytes) -> None:
        self.patch.write(chunk)
        if self.hasher is not None:
            self.hasher.update(chunk)

    def verified(self) -> bool:
        return self.expected is None or self.hasher is None or self.hasher.digest() == self.expected


class _TusBase(BaseHandler):
    """What /uploads and /uploads/{id} share: the tus headers, discovery, the version check."""

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Tus-Resumable", TUS_VERSION)
        self.set_header("Access-Control-Expose-Headers", EXPOSED_HEADERS)

    def options(self, *args: Any) -> None:
        # Discovery (tus) and the browser's preflight in one answer; neither needs a token.
        methods = ", ".join(self.allowed_methods)
        self.set_header("Allow", methods)
        self.set_header("Access-Control-Allow-Methods", methods)
        self.set_header("Access-Control-Allow-Headers", REQUEST_HEADERS)
        self.set_header("Access-Control-Max-Age", "86400")
        self.set_header("Tus-Version", TUS_VERSION)
        self.set_header("Tus-Extension", EXTENSIONS)
        self.set_header("Tus-Max-Size", str(self.service.config.MAX_FILE_SIZE))
        self.set_header("Tus-Checksum-Algorithm", CHECKSUM_ALGORITHMS)
        self.set_status(204)
        self.finish()

    async def prepare(self) -> None:
        await super().prepare()
        method = self.request.method
        if method == "OPTIONS":
            return
        version = self.request.headers.get("Tus-Resumable")
        if version != TUS_VERSION:
            raise ServiceError(Kind.UNSUPPORTED_PROTOCOL, f"send 'Tus-Resumable: {TUS_VERSION}' (got {str(version)[:20]!r}): the only "
                                "tus version this server speaks", headers={"Tus-Version": TUS_VERSION})

    def _check_disk(self, needed: int) -> None:
        floor_mb = self.service.config.WHISPER_MIN_FREE_DISK_MB
        free_mb = self.service.resumable.free_disk_mb()
        if free_mb - needed / 2**20 < floor_mb:
            promised = f", {needed / 2**20:.0f} MB of it promised to open uploads and this one" if needed else ""
            raise ServiceError(Kind.STORAGE_FULL, f"the server is short of disk space for this upload ({free_mb:.0f} MB free"
                                f"{promised}; keeps at least WHISPER_MIN_FREE_DISK_MB={floor_mb}); try again later")


@stream_request_body  # a body sent here anyway is refused in prepare(), never buffered
class TusCreationHandler(_TusBase):
    """POST /uploads: the creation extension."""

    allowed_methods = ("OPTIONS", "POST")

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method == "POST":
            length = self.request.headers.get("Content-Length", "0")
            if length not in ("", "0") or "Transfer-Encoding" in self.request.headers:
                raise ServiceError(Kind.INVALID, "POST /uploads takes no body here (creation-with-upload is not offered): "
                                    "create the upload, then PATCH its bytes")

    def data_received(self, chunk: bytes) -> None:
        pass

    async def post(self) -> None:
        config = self.service.config
        if self.service.draining:
            raise ServiceError(Kind.UNAVAILABLE, "the server is shutting down; try again in a moment", 10)
        if "Upload-Defer-Length" in self.request.headers:
            raise ServiceError(Kind.INVALID, "Upload-Defer-Length is not supported: send Upload-Length")
        length = _number(self.request.headers.get("Upload-Length"), "Upload-Length")
        if length == 0:
            raise ServiceError(Kind.INVALID, "Upload-Length is 0: an empty file is no audio")
        # The caller's own limits first, from Upload-Length alone: nothing is stored for a refusal.
        limits = self.identity.limits.resolved(config)
        limit, limit_name = file_size_limit(limits, config.MAX_FILE_SIZE)
        if length > limit:
            raise ServiceError(Kind.TOO_LARGE, f"Upload-Length {length} is larger than {limit_name} ({limit} bytes)")
        metadata_text = self.request.headers.get("Upload-Metadata", "")
        if len(metadata_text) > MAX_METADATA_CHARS:
            raise ServiceError(Kind.INVALID, f"Upload-Metadata is longer than {MAX_METADATA_CHARS} characters")
        metadata = parse_metadata(metadata_text)
        count, declared, _pending = await self.service.resumable.open_uploads(self.identity.name)
        check_open_uploads(self.identity.name, limits, count, declared, length)
        # Reserve what this upload and every other open one have yet to write: twenty creations
        # against the same free space must not each be told it fits.
        _count, _declared, pending = await self.service.resumable.open_uploads(None)
        self._check_disk(self.service.resumable.disk_to_reserve(length, pending))
        stamp = now_iso()
        upload = UploadRecord(
            id=new_job_id(), owner=self.identity.name, upload_length=length, upload_offset=0,
            filename=display_name(metadata.get("filename") or metadata.get("name")), metadata=metadata_text,
            created_at=stamp, updated_at=stamp, expires_at=iso_in(idle_hours(config)),
        )
        await self.service.resumable.create(upload)
        log.info("upload %s created: %s, %d bytes expected", upload.id, upload.filename, length)
        self.set_header("Location", f"/uploads/{upload.id}")
        self.set_header("Upload-Expires", http_date(upload.expires_at))
        self.set_header("Upload-Offset", "0")
        self.set_status(201)
        self.finish()


@stream_request_body
class TusUploadHandler(_TusBase):
    """/uploads/{id}: HEAD reports the offset, PATCH appends, DELETE terminates."""

    allowed_methods = ("OPTIONS", "HEAD", "PATCH", "DELETE")
    _writing: _Writing | None = None
    _upload: UploadRecord | None = None
    _refused = False
    _slot: tuple[str, str | None] | None = None
    _rate: RateFloor | None = None

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method == "PATCH":
            await self._begin_patch()

    # -- core: HEAD and PATCH

    async def _own(self, upload_id: str | None) -> UploadRecord:
        """The caller's upload, or 404 (unknown and another token's look the same), or 410 (expired)."""
        upload = await self.service.resumable.get(upload_id)
        if upload is None or upload.owner != self.identity.name:
            raise ServiceError(Kind.NOT_FOUND, f"no upload with id {str(upload_id)[:60]!r}")
        if upload.expired(now_iso()):
            raise ServiceError(Kind.GONE, f"upload {upload.id} expired at {upload.expires_at}; upload the file again")
        return upload

    def _describe(self, upload: UploadRecord) -> None:
        self.set_header("Upload-Offset", str(upload.upload_offset))
        self.set_header("Upload-Length", str(upload.upload_length))
        if upload.job_id is None:
            self.set_header("Upload-Expires", http_date(upload.expires_at))

    async def head(self, upload_id: str) -> None:
        upload = await self._own(upload_id)
        self._describe(upload)
        if upload.metadata:
            self.set_header("Upload-Metadata", upload.metadata)
        self.set_status(200)
        self.finish()

    async def _begin_patch(self) -> None:
        upload = await self._own(self.path_args[0])
        content_type = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != OFFSET_TYPE:
            raise ServiceError(Kind.UNSUPPORTED_MEDIA, f"PATCH needs 'Content-Type: {OFFSET_TYPE}' (got {content_type[:40] or 'none'!r})")
        offset = _number(self.request.headers.get("Upload-Offset"), "Upload-Offset")
        if upload.job_id is not None:
            raise ServiceError(Kind.CONFLICT, f"upload {upload.id} was already used by job {upload.job_id}; it takes no more bytes")
        if offset != upload.upload_offset:
            raise ServiceError(Kind.CONFLICT, f"Upload-Offset {offset} does not match the upload's offset {upload.upload_offset}: "
                                "ask HEAD for it and send from there", headers={"Upload-Offset": str(upload.upload_offset)})
        length = self.request.headers.get("Content-Length")  # Tornado has checked its form
        if length is not None and offset + _number(length, "Content-Length") > upload.upload_length:
            raise ServiceError(Kind.TOO_LARGE, f"this PATCH would take the upload past its Upload-Length ({upload.upload_length} bytes)")
        algorithm, expected = self._checksum()
        self._check_disk(0)
        # A PATCH body is an upload in flight like any other: it takes a slot (the address's and
        # the identity's share of them) and is held to the same minimum rate.
        address = self.request.remote_ip or "?"
        owner = slot_owner(self.identity)
        self.service.take_upload_slot(address, owner)
        self._slot = (address, owner)
        patch = await self.service.resumable.begin_patch(upload, offset)  # 423 while another PATCH writes
        self._upload = upload
        self._writing = _Writing(patch, algorithm, expected)
        declared = _number(length, "Content-Length") if length is not None else None
        self._rate = RateFloor(self.service.config, self._too_slow, declared).start()

    def _too_slow(self, got: int) -> None:
        """Cut a PATCH slower than the floor; what came counts, as when the connection is cut."""
        if self._finished or self._rate is None:
            return
        log.warning("upload %s: PATCH from %s cut, too slow (%d bytes in %.0f s)",
                    self._upload.id if self._upload else "?", self.request.remote_ip, got, self._rate.window)
        message = f"the PATCH was too slow: {self._rate.message(got)}; the connection is closed (HEAD gives the offset)"
        self._keep_partial()
        self._refused = True
        self._release_slot()
        self.send_error(408, exc_info=(ServiceError, ServiceError(Kind.TOO_SLOW, message), None))

    def _release_slot(self) -> None:
        if self._rate is not None:
            self._rate.stop()
            self._rate = None
        slot, self._slot = self._slot, None
        if slot is not None:
            self.service.release_upload_slot(*slot)

    def on_finish(self) -> None:
        super().on_finish()
        self._release_slot()
        self._drop()  # an answer that came before the body was taken: its bytes do not count

    def _drop(self) -> None:
        writing, self._writing = self._writing, None
        if writing is not None:
            spawn(self.service.resumable.finish_patch(writing.patch, keep=False), "dropping a PATCH's bytes")

    def _checksum(self) -> tuple[str | None, bytes | None]:
        header = self.request.headers.get("Upload-Checksum")
        if header is None:
            return None, None
        algorithm, _, encoded = header.strip().partition(" ")
        if algorithm.lower() != "sha1":
            raise ServiceError(Kind.INVALID, f"Upload-Checksum algorithm {algorithm[:20]!r} is not supported; use sha1")
        try:
            return "sha1", base64.b64decode(encoded.strip(), validate=True)
        except binascii.Error:
            raise ServiceError(Kind.INVALID, "Upload-Checksum: the checksum is not base64") from None

    def data_received(self, chunk: bytes) -> None:
        writing = self._writing
        if writing is None or self._refused:
            return
        assert self._upload is not None
        if writing.patch.start + writing.patch.received + len(chunk) > self._upload.upload_length:
            self._refuse(ServiceError(Kind.TOO_LARGE, f"the PATCH goes past the upload's Upload-Length ({self._upload.upload_length} bytes)"))
            return
        try:
            writing.write(chunk)
            if self._rate is not None:
                self._rate.add(len(chunk))
        except OSError as exc:
            refusal = self.service.storage_refusal(exc)  # read-only or full storage, with Retry-After
            if refusal is not None:
                self._refuse(refusal)
                return
            self._refuse(ServiceError(Kind.INTERNAL, "could not write the upload (see the server log)"))
            log.error("upload %s: write failed: %s", self._upload.id, exc)

    def _refuse(self, error: ServiceError) -> None:
        """Answer now and drop this PATCH's bytes: the rest of the body is not worth reading."""
        self._refused = True
        self._release_slot()
        self._drop()
        self.answer_now(error)

    async def patch(self, upload_id: str) -> None:
        writing, upload = self._writing, self._upload
        if self._refused or writing is None or upload is None:
            return
        if self._rate is not None:
            self._rate.stop()  # the whole body is here
        self._writing = None
        verified = writing.verified()
        await self.service.resumable.finish_patch(writing.patch, keep=verified)
        if not verified:
            raise ServiceError(Kind.CHECKSUM_MISMATCH, "Upload-Checksum does not match the PATCH's body (sha1); the bytes were dropped: "
                                "send them again")
        self._describe(upload)
        self.set_status(204)
        self.finish()

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self._release_slot()
        self._keep_partial()

    def _keep_partial(self) -> None:
        # Cut off mid-PATCH: keep what came (tus core: the client resumes from HEAD's offset),
        # unless a checksum was asked for, which a part of the body cannot satisfy.
        writing, self._writing = self._writing, None
        if writing is not None:
            spawn(self._record_partial(writing), f"a cut-off PATCH of upload {writing.patch.upload.id}")

    async def _record_partial(self, writing: _Writing) -> None:
        upload = writing.patch.upload
        keep = writing.expected is None
        try:
            await self.service.resumable.finish_patch(writing.patch, keep=keep)
            if keep:
                log.info("upload %s: connection cut mid-PATCH; kept %d bytes, offset %d", upload.id,
                         writing.patch.received, upload.upload_offset)
        except Exception as exc:  # the next PATCH starts from the recorded offset anyway
            log.warning("upload %s: could not record a cut-off PATCH's bytes: %s", upload.id, exc)

    # -- termination

    async def delete(self, upload_id: str) -> None:
        upload = await self._own(upload_id)
        if upload.job_id is not None:
            raise ServiceError(Kind.CONFLICT, f"upload {upload.id} already became job {upload.job_id}; cancel the job instead")
        if not await self.service.resumable.terminate(upload.id):
            raise ServiceError(Kind.NOT_FOUND, f"no upload with id {upload.id!r}")
        log.info("upload %s terminated by the client", upload.id)
        self.set_status(204)
        self.finish()
