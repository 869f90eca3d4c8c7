"""Resumable uploads (tus): their rows in the ledger and their bytes on disk, kept in step.

The tus handler and the submission that turns a finished upload into a job ask this, through
the service; neither touches the ledger or the job directories itself.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from .errors import Kind, ServiceError
from .jobfiles import JobFiles, is_job_id
from .jobs import UploadRecord, now_iso
from .ledger import Ledger


class ResumableUploads:
    def __init__(self, ledger: Ledger, files: JobFiles) -> None:
        self.ledger = ledger
        self.files = files

    def free_disk_mb(self) -> float:
        return self.files.free_disk_mb()

    async def create(self, upload: UploadRecord) -> None:
        """The row first (retention removes bytes that have none), then the empty file."""
        await self.ledger.create_upload(upload)
        try:
            self.files.create_resumable(upload.id)
        except OSError:
            await self.ledger.delete_upload(upload.id)
            raise

    async def get(self, upload_id: str | None) -> UploadRecord | None:
        return await self.ledger.get_upload(upload_id) if upload_id and is_job_id(upload_id) else None

    def path(self, upload_id: str) -> Path:
        return self.files.resumable_path(upload_id)

    async def advance(self, upload_id: str, from_offset: int, to_offset: int) -> bool:
        """Count bytes already made durable; False when the upload changed meanwhile."""
        return await self.ledger.advance_upload(upload_id, from_offset, to_offset)

    async def terminate(self, upload_id: str) -> bool:
        """Forget an upload not yet used, row and bytes; False when there is none such."""
        if not await self.ledger.delete_upload(upload_id):
            return False
        self.files.remove_resumable(upload_id)
        return True

    async def open_uploads(self, owner: str | None) -> tuple[int, int, int]:
        """(count, declared bytes, bytes still to come) of the open uploads of `owner` (None: all)."""
        return await self.ledger.open_uploads(owner)

    async def set_expiry(self, upload_id: str, expires_at: str) -> bool:
        return await self.ledger.set_upload_expiry(upload_id, expires_at)

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
            # A second name for the same bytes (a copy without hard links: off the IOLoop); intake
            # reads and removes it, the upload's own name stays until a job is accepted.
            target = await asyncio.get_running_loop().run_in_executor(None, self.files.stage_resumable,
                                                                      upload_id, job_id)
        except FileNotFoundError:
            raise ServiceError(Kind.GONE, f"the bytes of upload {upload_id} are gone from the server; upload again") from None
        return target, upload.upload_length, upload.filename

    async def use_up(self, upload_id: str) -> None:
        """Its content was refused as media (415): sending it again cannot help, so it goes."""
        await self.terminate(upload_id)
