"""The local backend of the job files (store/): one directory per job on disk, and their removal."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import BinaryIO

from .clock import wall_time

log = logging.getLogger("whisperd.files")

STAGING = ".incoming"  # uploads in flight; a directory under it never has a job row
RESUMABLE = ".uploads"  # tus uploads' bytes, one file per upload row; they outlive a restart
TOKEN_FILE = ".hf_token"
SPEAKERS_FILE = ".speakers.json"  # a job's diarization options and reference samples (speakers)
QUARANTINE = ".quarantine"  # what start-up found and the ledger did not know; never deleted by us
MARKERS = ".nodes"  # the cluster's node markers (nodes.py), not a job
PROBE_PREFIX = ".probe-"  # storage.py's probe writes
CLUSTER_MARK = ".whisperd-cluster"  # in both roots: the identity of the cluster they belong to (nodes.py)
NODE_FILE = ".node"  # in a job's upload directory on shared storage: the node that accepted it
# The client's bytes as received, with no extension (nothing may take a hint from the client's
# name); removed once intake has decoded them into the canonical file the engine reads.
UPLOAD_NAME = "upload"
CANONICAL_NAME = "audio.wav"  # the same name as intake.CANONICAL_NAME


def new_job_id() -> str:
    return str(uuid.uuid4())


def is_job_id(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except (ValueError, TypeError, AttributeError):
        return False


def display_name(client_name: str | None) -> str:
    """The client's file name, for people to read: no directories, no control characters, short."""
    if not client_name:
        return "upload"
    base = client_name.replace("\\", "/").split("/")[-1]
    cleaned = "".join(ch if ch.isprintable() else "_" for ch in base).strip() or "upload"
    return cleaned[:200]


class JobFiles:
    """The upload directory and the engine output directory of every job."""

    resumable_on_disk = True  # tus uploads' bytes live in tmp_root/.uploads (S3: in the store)

    def __init__(self, tmp_root: str, output_root: str, node: str | None = None) -> None:
        self.tmp_root = Path(tmp_root).resolve()
        self.output_root = Path(output_root).resolve()
        # On storage several nodes share, each node stages its uploads in a directory of its
        # own, which it alone may empty at start.
        self.staging_root = self.tmp_root / STAGING / node if node else self.tmp_root / STAGING
        self.node = node

    @classmethod
    def of(cls, config) -> "JobFiles":
        """The configured roots; per-node staging when the ledger (and so the disk) is shared."""
        return cls(config.WHISPER_TMP_FILES, config.WHISPER_OUTPUT_DIR,
                   config.node_name if config.WHISPER_DB_URL else None)

    def ensure_roots(self) -> None:
        for root in (self.tmp_root, self.output_root, self.tmp_root / STAGING, self.staging_root):
            root.mkdir(parents=True, exist_ok=True)
            os.chmod(root, 0o700)

    def free_disk_mb(self) -> float:
        """Free space on the fuller of the two roots, in MiB."""
        return min(shutil.disk_usage(root).free for root in (self.tmp_root, self.output_root)) / 2**20

    def staging_dir(self, job_id: str) -> Path:
        return self.staging_root / job_id

    def upload_dir(self, job_id: str) -> Path:
        return self.tmp_root / job_id

    def output_dir(self, job_id: str) -> Path:
        return self.output_root / job_id

    def audio_path(self, job_id: str) -> Path | None:
        """The canonical 16 kHz mono WAV intake made: the only file the engine is given."""
        path = self.upload_dir(job_id) / CANONICAL_NAME
        return path if path.is_file() else None

    def legacy_upload(self, job_id: str) -> Path | None:
        """An upload queued by a version that kept the client's file as `audio.<ext>` (no intake yet)."""
        directory = self.upload_dir(job_id)
        for candidate in sorted(directory.glob("audio.*")) if directory.is_dir() else []:
            if candidate.name != CANONICAL_NAME:
                return candidate
        return None

    def token_path(self, job_id: str) -> Path:
        return self.upload_dir(job_id) / TOKEN_FILE

    def read_token(self, job_id: str) -> str | None:
        try:
            return self.token_path(job_id).read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def commit_upload(self, job_id: str, hf_token: str | None) -> None:
        """Move a complete upload from staging to its job directory (atomic rename)."""
        staged = self.staging_dir(job_id)
        if hf_token:
            path = staged / TOKEN_FILE
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(hf_token)
        if self.node:  # whose upload this is, until its row is committed (see sweep)
            (staged / NODE_FILE).write_text(self.node, encoding="utf-8")
        os.rename(staged, self.upload_dir(job_id))

    # -- the store interface (store/__init__.py): on local directories these steps are (almost) free

    async def publish_upload(self, job_id: str, hf_token: str | None) -> None:
        self.commit_upload(job_id, hf_token)

    async def fetch_inputs(self, job_id: str) -> Path | None:
        return self.audio_path(job_id)

    async def save_output(self, job_id: str) -> None:
        return None  # the engine wrote the result where it is kept

    async def read_result(self, job_id: str) -> dict:
        from .results import load_engine_result
        return load_engine_result(self.output_dir(job_id))

    def drop_scratch(self, job_id: str) -> None:
        return None  # the job directories are the files themselves, not copies

    def probe(self) -> OSError | None:
        return None  # storage.StorageWatch probes the directories themselves

    def check(self) -> None:
        return None

    def sweep_store(self, live_jobs: set[str], min_age_seconds: float) -> list[str]:
        return []  # sweep() covers the directories

    def cluster_marks(self):
        return None  # nodes.check_cluster_identity marks the two directories themselves

    async def close(self) -> None:
        return None

    # speakers: a job's diarization options, beside its audio until the job's files go

    def stage_speakers(self, job_id: str, options: dict, references: list[tuple[str, str]]) -> None:
        """Before commit_upload: min/max/num speakers and [(name, file name in the staging dir)]."""
        data = {"options": options, "references": [{"name": name, "file": file} for name, file in references]}
        (self.staging_dir(job_id) / SPEAKERS_FILE).write_text(json.dumps(data), encoding="utf-8")

    def read_speakers(self, job_id: str) -> dict:
        """{"options": {...}, "references": [{"name", "audio": absolute path}]}; {} when none."""
        directory = self.upload_dir(job_id)
        try:
            data = json.loads((directory / SPEAKERS_FILE).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return {}
        references = [{"name": r["name"], "audio": str(directory / r["file"])} for r in data.get("references", [])
                      if (directory / r["file"]).is_file()]
        return {"options": data.get("options") or {}, "references": references}

    # -- resumable uploads

    def resumable_path(self, upload_id: str) -> Path:
        return self.tmp_root / RESUMABLE / upload_id

    def create_resumable(self, upload_id: str) -> None:
        """An empty file for a new upload (its directory made on first use, owner only)."""
        directory = self.tmp_root / RESUMABLE
        directory.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.resumable_path(upload_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)

    def resumable_ids(self) -> list[str]:
        """The uploads with bytes on disk (retention compares them with the ledger's rows)."""
        directory = self.tmp_root / RESUMABLE
        return [entry.name for entry in directory.iterdir()] if directory.is_dir() else []

    def remove_resumable(self, upload_id: str) -> None:
        _remove_tree(self.resumable_path(upload_id))

    async def open_patch(self, upload, offset: int) -> "LocalPatch":
        """The upload's file, locked against a writer in another process, cut back to `offset`:
        bytes past the ledger's offset (a PATCH cut off before it was counted) do not count."""
        handle = open(self.resumable_path(upload.id), "r+b")  # FileNotFoundError: the bytes are gone
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: another writes
            handle.truncate(offset)
            handle.seek(offset)
        except BaseException:
            handle.close()
            raise
        return LocalPatch(handle, offset)

    async def stage_resumable(self, upload, job_id: str, reserve=None) -> Path:
        """A finished upload's bytes in a new job's staging dir: a second name for the same file
        (no copy; a copy where the file system has no hard links), so that the upload stays whole
        until the job's row commits (issue 24); the upload's own name goes after that commit
        (Service.submit). FileNotFoundError when the upload's bytes are gone."""
        return await asyncio.get_running_loop().run_in_executor(None, self._link_resumable, upload.id, job_id)

    def _link_resumable(self, upload_id: str, job_id: str) -> Path:
        staged = self.staging_dir(job_id)
        staged.mkdir(parents=True, exist_ok=True)
        target = staged / UPLOAD_NAME  # the client's extension decides nothing (intake.py)
        source = self.resumable_path(upload_id)
        try:
            os.link(source, target)
        except FileNotFoundError:
            raise
        except OSError:
            shutil.copyfile(source, target)
        return target

    def remove_output(self, job_id: str) -> None:
        _remove_tree(self.output_dir(job_id))

    def remove_all(self, job_id: str) -> None:
        """Every file of the job: upload, token, engine output, staging, and their directories."""
        for path in (self.upload_dir(job_id), self.output_dir(job_id), self.staging_dir(job_id)):
            _remove_tree(path)

    def leftovers(self, live_jobs: set[str], min_age_seconds: float = 0.0) -> list[Path]:
        """Entries under both roots that belong to no live job (staging, quarantine, markers aside).

        min_age_seconds > 0 (a cluster: other nodes write here while this one starts): what
        is younger may be an upload whose row is about to be committed elsewhere, so it stays
        until a later start; the decision is the ledger's, never "no process of mine uses it".
        """
        found = []
        cutoff = wall_time() - min_age_seconds
        for root in (self.tmp_root, self.output_root):
            for entry in root.iterdir():
                # Resumable uploads answer to their ledger rows: retention removes the orphans.
                if entry.name in (STAGING, QUARANTINE, RESUMABLE, MARKERS, CLUSTER_MARK) or entry.name in live_jobs \
                        or entry.name.startswith(PROBE_PREFIX):  # a storage probe's file (storage.py)
                    continue
                if min_age_seconds > 0 and (entry.name.startswith(".") or is_job_id(entry.name)
                                            and _mtime(entry) > cutoff and _made_by(entry) != self.node):
                    # Another node's check file, or an upload another node may be committing
                    # right now; an upload this node made in its previous life is dead.
                    continue
                found.append(entry)
        return found

    def sweep(self, live_jobs: set[str], known_jobs: set[str],
              min_age_seconds: float = 0.0) -> tuple[list[str], Path | None]:
        """At start, before serving: unfinished uploads and the files of jobs that ended go;
        whatever the ledger does not know moves to WHISPER_TMP_FILES/.quarantine/<time>/.
        Returns (removed, the quarantine directory used or None)."""
        removed = []
        _remove_tree(self.staging_root)  # this node's uploads in flight died with its last run
        self.staging_root.mkdir(parents=True, exist_ok=True)
        quarantine = None
        for entry in self.leftovers(live_jobs, min_age_seconds):
            if entry.name in known_jobs:
                _remove_tree(entry)
                removed.append(str(entry))
                continue
            if quarantine is None:
                stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(wall_time()))
                quarantine = self.tmp_root / QUARANTINE / f"{stamp}-{os.getpid()}"
            side = quarantine / ("uploads" if entry.parent == self.tmp_root else "output")
            side.mkdir(parents=True, exist_ok=True)
            os.chmod(self.tmp_root / QUARANTINE, 0o700)
            try:
                shutil.move(str(entry), str(side / entry.name))
            except OSError as exc:
                log.error("could not quarantine %s: %s", entry, exc)
        return removed, quarantine


class LocalPatch:
    """One PATCH's bytes going straight into the upload's file (store.PatchBytes)."""

    def __init__(self, handle: BinaryIO, start: int) -> None:
        self.handle = handle
        self.start = start
        self.received = 0

    def write(self, chunk: bytes) -> None:
        self.handle.write(chunk)  # small sequential writes, as multipart uploads do
        self.received += len(chunk)

    async def settle(self, keep: bool, reserve) -> tuple[int, None]:
        await asyncio.get_running_loop().run_in_executor(None, self._close, keep)
        return self.received, None

    def _close(self, keep: bool) -> None:
        """Durable on disk (keep), or cut back to where this PATCH began; the lock goes with the file."""
        try:
            if not keep:
                self.handle.truncate(self.start)
                self.received = 0
            self.handle.flush()
            os.fsync(self.handle.fileno())
        finally:
            self.handle.close()

    async def undo(self) -> None:
        return None  # past the ledger's offset: the next PATCH cuts it off

    async def done(self) -> None:
        return None


def _made_by(directory: Path) -> str | None:
    try:
        return (directory / NODE_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0


def _remove_tree(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:  # keep going: one stuck file must not stop the cleanup of others
        log.error("could not remove %s: %s", path, exc)
