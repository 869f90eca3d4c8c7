"""Resumable uploads (tus): their rows in the ledger and their bytes in the store, kept in step.

The tus handler and the submission that turns a finished upload into a job ask this, through
the service; neither touches the ledger or the store itself. The ledger's upload_offset is the
truth: bytes the store holds past it do not count. One PATCH of an upload writes at a time,
cluster-wide: it claims the upload in the ledger (renewed while it runs, so that a claim of a
node that died lapses after CLAIM_SECONDS), and the claim goes in the write that counts its bytes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from .clock import iso, seconds_since, utc_now
from .errors import Kind, ServiceError
from .jobfiles import is_job_id
from .jobs import UploadRecord, now_iso
from .ledger import Ledger
from .store import JobStore, PatchBytes
from .tasks import spawn

log = logging.getLogger("whisperd.tus")

CLAIM_SECONDS = 20.0  # how long a PATCH's claim outlives the last renewal of its node
RENEW_SECONDS = 5.0
MAX_PARTS = 10_000  # S3's last part number


def iso_in(hours: float) -> str:
    return iso(utc_now() + timedelta(hours=hours))


def idle_hours(config: Any) -> float:
    """How long an unfinished upload lives past its last byte: abandoned ones must not hold the
    disk for the day a finished one is kept."""
    return min(config.WHISPER_UPLOAD_IDLE_HOURS, config.WHISPER_UPLOAD_EXPIRY_HOURS)


def _claim_until() -> str:
    return iso(utc_now() + timedelta(seconds=CLAIM_SECONDS))


class Patch:
    """One PATCH in progress: its claim on the upload and its bytes on their way to the store."""

    def __init__(self, upload: UploadRecord, claim: str, bytes_: PatchBytes) -> None:
        self.upload = upload
        self.claim = claim
        self.bytes = bytes_
        self.renewal: asyncio.Task | None = None
        self.finished = False

    @property
    def start(self) -> int:
        return self.bytes.start

    @property
    def received(self) -> int:
        return self.bytes.received

    def write(self, chunk: bytes) -> None:
        self.bytes.write(chunk)


class ResumableUploads:
    def __init__(self, ledger: Ledger, files: JobStore, config: Any,
                 refusal: Callable[[BaseException], ServiceError | None] = lambda exc: None) -> None:
        self.ledger = ledger
        self.files = files
        self.config = config
        self.refusal = refusal  # a storage error as the client's 503/507, or None

    def free_disk_mb(self) -> float:
        return self.files.free_disk_mb()

    def disk_to_reserve(self, length: int, pending: int) -> int:
        """What a new upload must find free on this node's disk: its bytes and those still to come
        of every open upload where they are kept on disk; nothing where an object store keeps
        them (a PATCH spools only its own body there)."""
        return length + pending if self.files.resumable_on_disk else 0

    async def create(self, upload: UploadRecord) -> None:
        """The row first (retention removes bytes that have none), then the store's empty start."""
        await self.ledger.create_upload(upload)
        try:
            self.files.create_resumable(upload.id)
        except OSError:
            await self.ledger.delete_upload(upload.id)
            raise

    async def get(self, upload_id: str | None) -> UploadRecord | None:
        return await self.ledger.get_upload(upload_id) if upload_id and is_job_id(upload_id) else None

    # -- a PATCH: claim, bytes, count

    async def begin_patch(self, upload: UploadRecord, offset: int) -> Patch:
        """Claim the upload and open its bytes at `offset` (the ledger's), or ServiceError: 423
        while another PATCH holds it (Retry-After: when its claim lapses), 410 when its bytes are gone."""
        claim = f"{self.config.node_name}/{uuid.uuid4().hex}"  # a restart of this node lets go of it
        held_until = await self.ledger.claim_upload(upload.id, claim, _claim_until())
        if held_until is not None:
            wait = max(1, math.ceil(-seconds_since(held_until)))
            raise ServiceError(Kind.LOCKED, f"another PATCH of upload {upload.id} is in progress; ask HEAD for the "
                                            "offset once it ends", min(wait, int(CLAIM_SECONDS)))
        try:
            bytes_ = await self.files.open_patch(upload, offset)
        except BaseException as exc:
            await self._release(upload.id, claim)
            if isinstance(exc, FileNotFoundError):
                raise ServiceError(Kind.GONE, f"the bytes of upload {upload.id} are gone from the server; "
                                              "upload again") from None
            if isinstance(exc, BlockingIOError):  # a PATCH whose claim lapsed still writes here
                raise ServiceError(Kind.LOCKED, f"another PATCH of upload {upload.id} is in progress; ask HEAD "
                                                "for the offset once it ends", int(CLAIM_SECONDS)) from None
            refusal = self.refusal(exc) if isinstance(exc, OSError) else None
            if refusal is not None:
                raise refusal from None
            raise
        patch = Patch(upload, claim, bytes_)
        patch.renewal = spawn(self._renew(patch), f"the claim of upload {upload.id}")
        return patch

    async def _renew(self, patch: Patch) -> None:
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            try:
                if not await self.ledger.renew_upload_claim(patch.upload.id, patch.claim, _claim_until()):
                    log.warning("upload %s: a PATCH lost its claim (it lapsed): another may take the upload, "
                                "and this one's bytes count only if none did", patch.upload.id)
                    return
            except Exception as exc:  # the ledger away: the claim may lapse, the offset check still holds
                log.warning("upload %s: could not renew a PATCH's claim: %s", patch.upload.id, exc)

    async def finish_patch(self, patch: Patch, keep: bool) -> None:
        """Make what came durable and count it (keep), or drop it; the claim goes either way.
        ServiceError(CONFLICT) when the upload changed meanwhile: what was written does not count."""
        if patch.finished:
            return
        patch.finished = True
        upload = patch.upload
        released = False
        try:
            try:
                received, stored = await patch.bytes.settle(keep, self._reserver(upload.id))
            except FileNotFoundError:
                raise ServiceError(Kind.GONE, f"the bytes of upload {upload.id} are gone from the server (terminated "
                                              "or expired meanwhile); upload again") from None
            except OSError as exc:
                refusal = self.refusal(exc)
                if refusal is not None:
                    raise refusal from None
                raise
            if not keep:
                return
            end = patch.start + received
            hours = self.config.WHISPER_UPLOAD_EXPIRY_HOURS if end == upload.upload_length else idle_hours(self.config)
            # Each byte pushes an unfinished upload's expiry back by the idle time; a finished one
            # keeps the full WHISPER_UPLOAD_EXPIRY_HOURS to be used.
            expires_at = iso_in(hours)
            if not await self.ledger.advance_upload(upload.id, patch.start, end, stored=stored, claim=patch.claim,
                                                    expires_at=expires_at):
                await patch.bytes.undo()
                raise ServiceError(Kind.CONFLICT, f"upload {upload.id} changed meanwhile (another PATCH, used, or "
                                                  "expired); ask HEAD for its offset")
            released = True
            upload.upload_offset, upload.expires_at = end, expires_at
            await patch.bytes.done()
            if upload.complete:
                log.info("upload %s finished: %d bytes", upload.id, upload.upload_length)
        finally:
            if patch.renewal is not None:
                patch.renewal.cancel()
            if not released:
                await self._release(upload.id, patch.claim)

    def _reserver(self, upload_id: str) -> Callable[[int], Any]:
        async def reserve(count: int) -> int:
            first = await self.ledger.reserve_upload_parts(upload_id, count, MAX_PARTS)
            if first is None:
                raise ServiceError(Kind.TOO_LARGE, f"upload {upload_id} was sent in too many small pieces for the "
                                                   "object store; upload the file again in fewer PATCHes")
            return first

        return reserve

    async def _release(self, upload_id: str, claim: str) -> None:
        try:
            await self.ledger.release_upload_claim(upload_id, claim)
        except Exception as exc:  # it lapses by itself after CLAIM_SECONDS
            log.warning("upload %s: could not let go of a PATCH's claim: %s", upload_id, exc)

    # -- the rest of an upload's life

    async def terminate(self, upload_id: str) -> bool:
        """Forget an upload not yet used, row and bytes; False when there is none such."""
        if not await self.ledger.delete_upload(upload_id):
            return False
        self.files.remove_resumable(upload_id)
        return True

    async def open_uploads(self, owner: str | None) -> tuple[int, int, int]:
        """(count, declared bytes, bytes still to come) of the open uploads of `owner` (None: all)."""
        return await self.ledger.open_uploads(owner)

    async def stage_for_job(self, upload_id: str, owner: str, job_id: str, max_bytes: int,
                            limit_name: str) -> tuple[Path, int, str]:
        """A finished upload of `owner` linked into job `job_id`'s staging dir: (path, bytes, file
        name), or ServiceError saying why not. Nothing is used up here: the upload stays usable
        until a job made of it is accepted (in that job's own ledger transaction) or use_up() (its content refused as media)."""
        upload = await self.get(upload_id)
        if upload is None or upload.owner != owner or upload.expired(now_iso()):
            raise ServiceError(Kind.NOT_FOUND, f"no resumable upload with id {upload_id[:60]!r} (unknown, another "
                                    "token's, or expired)")
        if upload.job_id is not None:
            raise ServiceError(Kind.CONFLICT, f"upload {upload_id} was already used by job {upload.job_id}; "
                                    "an upload becomes one job only: upload the file again")
        if not upload.complete:
            raise ServiceError(Kind.CONFLICT, f"upload {upload_id} is not finished: {upload.upload_offset} of "
                                    f"{upload.upload_length} bytes received; PATCH the rest first")
        # Not used up here: the job's own transaction does that (ledger.submit(upload_id=...)), so
        # a submission that never commits (killed, refused, database away) leaves it usable.
        if upload.upload_length > max_bytes:  # the token's limit may have been lowered since creation
            raise ServiceError(Kind.TOO_LARGE, f"upload {upload_id} is {upload.upload_length} bytes, larger than {limit_name} "
                                    f"({max_bytes} bytes)")
        try:
            # A second name for the same bytes, or their copy from the store (off the IOLoop);
            # intake reads and removes it, the upload's own name stays until a job is accepted.
            target = await self.files.stage_resumable(upload, job_id, self._reserver(upload.id))
        except FileNotFoundError:
            raise ServiceError(Kind.GONE, f"the bytes of upload {upload_id} are gone from the server; upload again") from None
        except OSError as exc:
            refusal = self.refusal(exc)
            if refusal is None:
                raise
            raise refusal from None
        return target, upload.upload_length, upload.filename

    async def use_up(self, upload_id: str) -> None:
        """Its content was refused as media (415): sending it again cannot help, so it goes."""
        await self.terminate(upload_id)
