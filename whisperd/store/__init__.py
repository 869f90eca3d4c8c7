"""Where job files are kept: one narrow interface, a local-directory backend and an S3 one.

The rest of the server asks `open_files(config)` for the job files and never learns which
backend runs. Both stage uploads and run the engine in local directories (probing, decoding
and WhisperX need a file); they differ in where a job's files live between those steps:

- local (jobfiles.JobFiles, the default): WHISPER_TMP_FILES/<job>/ and WHISPER_OUTPUT_DIR/<job>/
  are the job's files; publishing an upload is a rename, fetching and saving cost nothing.
- S3 (store/s3.py, WHISPER_STORAGE_URL=s3://bucket/prefix): objects under
  <prefix>/jobs/<job>/{upload,output}/; those two directories are this node's scratch only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

from ..jobfiles import JobFiles
from ..jobs import UploadRecord


class StoreRefused(Exception):
    """The object store cannot be used at all (credentials, bucket): start-up stops with this line."""


class PatchBytes(Protocol):
    """One tus PATCH's bytes on their way to where the upload's bytes are kept (resumable.py
    claims the upload before, and counts what settle() made durable after)."""

    start: int  # the upload's offset this PATCH writes from
    received: int

    def write(self, chunk: bytes) -> None:
        """On the IOLoop, as the body comes: small sequential writes to a local file."""
    async def settle(self, keep: bool, reserve: Callable[[int], Awaitable[int]]) -> tuple[int, str | None]:
        """Make this PATCH's bytes durable (keep) or drop them: (bytes kept, the store's new record
        of the upload's bytes for the ledger, None: unchanged). reserve(n): n part numbers, first."""
    async def undo(self) -> None:
        """The ledger did not count what settle() wrote (another PATCH won): it goes."""
    async def done(self) -> None:
        """The ledger counted it: what it replaced goes."""


class JobStore(Protocol):
    """What the service, the runner, retention and start-up ask of the job files."""

    tmp_root: Path
    output_root: Path
    resumable_on_disk: bool  # whether tus uploads' bytes take this node's disk until used

    def ensure_roots(self) -> None: ...
    def free_disk_mb(self) -> float: ...
    def staging_dir(self, job_id: str) -> Path: ...
    def stage_speakers(self, job_id: str, options: dict, references: list[tuple[str, str]]) -> None: ...
    async def publish_upload(self, job_id: str, hf_token: str | None) -> None:
        """A staged upload becomes the job's files, durably, before the job's row commits."""
    async def fetch_inputs(self, job_id: str) -> Path | None:
        """The job's canonical audio (with its token and speakers files) as a local file; None when gone."""
    def read_token(self, job_id: str) -> str | None: ...
    def read_speakers(self, job_id: str) -> dict: ...
    def output_dir(self, job_id: str) -> Path: ...
    async def save_output(self, job_id: str) -> None:
        """The engine's result made durable: before the job is Completed in the ledger."""
    async def read_result(self, job_id: str) -> dict[str, Any]:
        """WhisperX's JSON of a finished job (results.EngineOutputError when it is gone)."""
    def drop_scratch(self, job_id: str) -> None:
        """This node's local copies of a job's files, after its run, whatever happened."""
    def remove_output(self, job_id: str) -> None: ...
    def remove_all(self, job_id: str) -> None:
        """Every file of the job, wherever it lives (the row stays)."""
    def probe(self) -> OSError | None:
        """A small write and delete where the job files live; the error, or None when it works."""
    def check(self) -> None:
        """At start: StoreRefused when the store cannot be used at all."""
    def sweep_store(self, live_jobs: set[str], min_age_seconds: float) -> list[str]:
        """At start: the stored files of no live job, older than min_age_seconds, removed."""
    # tus uploads: bytes that outlive a restart, written one PATCH at a time (resumable.py)
    def create_resumable(self, upload_id: str) -> None: ...
    async def open_patch(self, upload: UploadRecord, offset: int) -> PatchBytes:
        """FileNotFoundError when the upload's bytes are gone; BlockingIOError while another writes."""
    async def stage_resumable(self, upload: UploadRecord, job_id: str,
                              reserve: Callable[[int], Awaitable[int]] | None = None) -> Path:
        """A finished upload's bytes as job_id's staged file (FileNotFoundError when gone);
        reserve(n): part numbers, as for a PATCH."""
    def resumable_ids(self) -> list[str]:
        """The uploads that have bytes kept (retention compares them with the ledger's rows)."""
    def remove_resumable(self, upload_id: str) -> None: ...
    def cluster_marks(self):
        """Where a cluster's identity is marked (nodes.check_cluster_identity); None: the two directories."""
    async def close(self) -> None: ...


def open_files(config) -> JobFiles:
    """The configured backend: S3 when WHISPER_STORAGE_URL is set, else the local directories."""
    if getattr(config, "WHISPER_STORAGE_URL", ""):
        from .s3 import S3JobFiles
        return S3JobFiles.of(config)
    return JobFiles.of(config)
