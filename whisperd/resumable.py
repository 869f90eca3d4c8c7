"""Resumable uploads (tus): their rows in the ledger and their bytes on disk, kept in step.

The tus handler and the submission that turns a finished upload into a job ask this, through
the service; neither touches the ledger or the job directories itself.
"""

from __future__ import annotations

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

    async def take_for_job(self, upload_id: str, owner: str, job_id: str) -> tuple[Path, int, str]:
        """A finished upload of `owner` becomes job `job_id`'s staged file, once: (path, bytes,
        file name), or ServiceError saying why not."""
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
        if not await self.ledger.use_upload(upload_id, job_id):
            raise ServiceError(Kind.CONFLICT, f"upload {upload_id} was just used by another request (or expired)")
        try:
            path = self.files.stage_resumable(upload_id, job_id, upload.filename)
        except FileNotFoundError:
            raise ServiceError(Kind.GONE, f"the bytes of upload {upload_id} are gone from the server; upload again") from None
        return path, upload.upload_length, upload.filename
