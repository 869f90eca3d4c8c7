"""The S3 backend of the job files: objects under <prefix>/jobs/<job>/, local directories as scratch.

Layout: <prefix>/jobs/<job>/upload/{audio.wav,.hf_token,.speakers.json,<reference samples>} and
<prefix>/jobs/<job>/output/<the engine's files>. The node's WHISPER_TMP_FILES and
WHISPER_OUTPUT_DIR hold only copies: uploads staged before they are published, and a running
job's input and output, removed after its run (drop_scratch) whatever happened.

The client is boto3 on a thread pool of our own (not aiobotocore): a job costs a handful of S3
calls, all of them large transfers, and boto3's managed transfer (s3transfer) already streams
a file from disk in multipart parts with bounded memory and concurrent parts; aiobotocore has
no managed transfer (the multipart logic would be ours to write) and pins botocore exactly.

Every store failure reaches the caller as an OSError (EIO, or EACCES when refused), so that
storage.py's tripwire treats an unreachable store as it treats a read-only disk: the node
claims nothing, submissions get 503 with Retry-After, the job goes back uncounted.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from ..clock import wall_time
from ..jobfiles import (CANONICAL_NAME, CLUSTER_MARK, MARKERS, QUARANTINE, RESUMABLE, STAGING, TOKEN_FILE,
                        UPLOAD_NAME, JobFiles, _remove_tree, is_job_id)
from . import StoreRefused
from . import s3_tus
from .s3_errors import client_errors as _client_errors, from_the_store, missing_as_gone, store_error as _store_error

log = logging.getLogger("whisperd.store")
PART_BYTES = 8 * 2**20  # multipart threshold and part size: a 512 MiB upload is 64 parts, a few in memory
TRANSFER_THREADS = 4  # parts of one file in flight at once
PROBE_KEY = ".probe-"
OWNER = ".node-"  # upload/.node-<name>: the node that published the upload, readable from a listing


class S3JobFiles(JobFiles):
    """JobFiles whose job files are objects; the directories are this node's scratch."""

    resumable_on_disk = False

    def __init__(self, tmp_root: str, output_root: str, node: str | None, url: str, endpoint: str = "",
                 region: str = "", addressing: str = "auto", sse: str = "") -> None:
        super().__init__(tmp_root, output_root, node)
        bucket, _, prefix = url[len("s3://"):].partition("/")
        self.bucket = bucket
        self.base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.endpoint = endpoint or None
        self.region = region
        self.addressing = addressing
        self.extra = {"ServerSideEncryption": sse} if sse else {}
        self._client = None
        self._client_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="s3")
        self._pending: set[asyncio.Future] = set()
        self._closed = False

    @classmethod
    def of(cls, config) -> "S3JobFiles":
        return cls(config.WHISPER_TMP_FILES, config.WHISPER_OUTPUT_DIR,
                   config.node_name if config.WHISPER_DB_URL else None, config.WHISPER_STORAGE_URL,
                   config.WHISPER_S3_ENDPOINT, config.WHISPER_S3_REGION, config.WHISPER_S3_ADDRESSING,
                   config.WHISPER_S3_SSE)

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.base}" + (f" at {self.endpoint}" if self.endpoint else "")

    # -- the client

    @property
    def client(self):
        with self._client_lock:
            if self._client is None:
                import boto3
                from botocore.config import Config as BotoConfig
                session = boto3.session.Session()  # credentials: the AWS environment, files or role
                self._client = session.client(
                    "s3", endpoint_url=self.endpoint,
                    region_name=self.region or session.region_name or "us-east-1",
                    config=BotoConfig(s3={"addressing_style": self.addressing},
                                      retries={"mode": "standard", "max_attempts": 3},
                                      connect_timeout=5, read_timeout=60, max_pool_connections=16))
            return self._client

    def _transfer(self):
        from boto3.s3.transfer import TransferConfig
        config = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                                max_concurrency=TRANSFER_THREADS)
        # s3transfer reads up to 10 parts ahead by default; as many as are sent at once bound the memory.
        config.max_in_memory_upload_chunks = TRANSFER_THREADS
        return config

    async def _run(self, doing: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except Exception as exc:
            if not from_the_store(exc):
                raise
            raise _store_error(exc, doing) from None

    def _key(self, job_id: str, side: str, name: str = "") -> str:
        return f"{self.base}jobs/{job_id}/{side}/{name}"

    def upload_key(self, upload_id: str, name: str) -> str:
        """A tus upload's object (store/s3_tus.py)."""
        return f"{self.base}uploads/{upload_id}/{name}"

    def _list(self, prefix: str) -> list[dict]:
        found: list[dict] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            found += page.get("Contents", [])
        return found

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]
            answer = self.client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": key} for key in batch], "Quiet": True})
            if answer.get("Errors"):
                raise OSError(errno.EIO, f"the object store kept {len(answer['Errors'])} object(s) it was asked to delete")

    def _put_tree(self, directory: Path, job_id: str, side: str) -> list[str]:
        """Every file under directory, streamed from disk (multipart past PART_BYTES); the keys."""
        keys = []
        try:
            for path in sorted(p for p in directory.rglob("*") if p.is_file()):
                key = self._key(job_id, side, path.relative_to(directory).as_posix())
                self.client.upload_file(str(path), self.bucket, key, ExtraArgs=self.extra or None,
                                        Config=self._transfer())
                keys.append(key)
        except BaseException:
            try:
                self._delete_keys(keys)  # nothing half-published stays
            except Exception as exc:  # the original failure is what the caller must see; say this one
                log.warning("job %s: %d half-published %s object(s) stay for the start-up sweep: %s",
                            job_id, len(keys), side, _store_error(exc, "delete them"))
            raise
        return keys

    # -- the store interface

    async def publish_upload(self, job_id: str, hf_token: str | None) -> None:
        staged = self.staging_dir(job_id)
        if hf_token:
            fd = os.open(staged / TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(hf_token)
        if self.node:  # whose upload this is, until its row commits (sweep_store)
            (staged / f"{OWNER}{self.node}").touch()
        await self._run("store the upload", self._put_tree, staged, job_id, "upload")
        _remove_tree(staged)  # published: the staged copy is not needed any more

    async def fetch_inputs(self, job_id: str) -> Path | None:
        target = self.upload_dir(job_id)
        return await self._run("fetch the job's audio", self._fetch_tree, job_id, "upload", target, CANONICAL_NAME)

    def _fetch_tree(self, job_id: str, side: str, target: Path, wanted: str) -> Path | None:
        _remove_tree(target)  # a copy left by a run that died here is not trusted
        objects = self._list(self._key(job_id, side))
        if not objects:
            return None
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(target, 0o700)
        root = self._key(job_id, side)
        for item in objects:
            name = item["Key"][len(root):]
            path = (target / name).resolve()
            if not name or target.resolve() not in path.parents:
                continue  # only our own key names live here; never write outside the scratch
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with missing_as_gone(item["Key"]):
                    self.client.download_file(self.bucket, item["Key"], str(path), Config=self._transfer())
            except FileNotFoundError:  # deleted since the listing (the job canceled, delivered): gone
                return None
        found = target / wanted
        return found if found.is_file() else None

    async def save_output(self, job_id: str) -> None:
        await self._run("store the job's result", self._put_tree, self.output_dir(job_id), job_id, "output")

    async def read_result(self, job_id: str) -> dict:
        from ..results import load_engine_result
        scratch = self.output_root / f".read-{uuid.uuid4().hex}"
        try:
            await self._run("read the job's result", self._fetch_json, job_id, scratch)
            return load_engine_result(scratch)
        finally:
            _remove_tree(scratch)

    def _fetch_json(self, job_id: str, target: Path) -> None:
        keys = sorted(item["Key"] for item in self._list(self._key(job_id, "output")) if item["Key"].endswith(".json"))
        if keys:
            target.mkdir(parents=True, exist_ok=True)
            try:
                with missing_as_gone(keys[0]):
                    self.client.download_file(self.bucket, keys[0], str(target / keys[0].rsplit("/", 1)[-1]))
            except FileNotFoundError:  # deleted since the listing (delivered meanwhile): the result is gone
                return

    def drop_scratch(self, job_id: str) -> None:
        for path in (self.upload_dir(job_id), self.output_dir(job_id)):
            _remove_tree(path)

    def remove_all(self, job_id: str) -> None:
        super().remove_all(job_id)
        self._in_background(self._delete_job, job_id, f"job {job_id}")

    def _in_background(self, delete: Callable[..., None], key: str, what: str) -> None:
        """Deletions the caller does not wait for (close() does); at start-up, before any loop, or
        after close(), done at once. A failure leaves the objects to the next sweep, said in the log."""

        def run() -> None:
            try:
                delete(key)
            except Exception as exc:
                log.error("%s: its objects were not deleted: %s", what, _store_error(exc, "delete objects"))

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or self._closed:
            run()
            return
        future = loop.run_in_executor(self._pool, run)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    def _delete_job(self, job_id: str) -> None:
        self._delete_keys([item["Key"] for item in self._list(f"{self.base}jobs/{job_id}/")])

    # -- tus uploads (store/s3_tus.py): any node takes any PATCH

    def create_resumable(self, upload_id: str) -> None:
        return None  # the first PATCH makes the objects; until then the row is the whole upload

    async def open_patch(self, upload, offset: int) -> s3_tus.S3Patch:
        spool = self.staging_root / f".tus-{upload.id}-{uuid.uuid4().hex[:8]}"
        patch = s3_tus.S3Patch(self, upload, offset, spool)
        try:
            await self._run("read the upload's last bytes", patch.fill)
        except BaseException:
            patch.handle.close()
            _remove_tree(spool)
            raise
        return patch

    async def stage_resumable(self, upload, job_id: str, reserve) -> Path:
        staged = self.staging_dir(job_id)
        staged.mkdir(parents=True, exist_ok=True)
        target = staged / UPLOAD_NAME
        tail_part = await reserve(1) if s3_tus.needs_part(upload) else None
        await self._run("fetch the upload's bytes", s3_tus.stage, self, upload, target, tail_part)
        return target

    def resumable_ids(self) -> list[str]:
        try:
            return s3_tus.upload_ids(self)
        except Exception as exc:
            if not from_the_store(exc):
                raise
            raise _store_error(exc, "list the tus uploads") from None

    def remove_resumable(self, upload_id: str) -> None:
        self._in_background(functools.partial(s3_tus.delete_upload, self), upload_id, f"upload {upload_id}")

    def probe(self) -> OSError | None:
        key = f"{self.base}{PROBE_KEY}{uuid.uuid4().hex}"
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=b"\0" * 16, **self.extra)
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            return _store_error(exc, "write a probe object")
        return None

    def check(self) -> None:
        bex = _client_errors()
        where = self.describe()
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except bex.NoCredentialsError:
            raise StoreRefused(f"WHISPER_STORAGE_URL={where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY, or an AWS profile)") from None
        except bex.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                raise StoreRefused(f"WHISPER_STORAGE_URL={where}: the bucket {self.bucket} does not exist "
                                   "(create it first)") from None
            if status in (401, 403):
                raise StoreRefused(f"WHISPER_STORAGE_URL={where}: the object store refused this server's credentials "
                                   f"(HTTP {status}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the AWS profile") from None
            raise StoreRefused(f"WHISPER_STORAGE_URL={where}: the object store answered HTTP {status} "
                               "when asked for the bucket") from None
        except (bex.BotoCoreError, OSError) as exc:
            raise StoreRefused(f"WHISPER_STORAGE_URL={where}: the object store cannot be reached "
                               f"({exc.__class__.__name__})") from None
        failure = self.probe()
        if failure is not None:
            raise StoreRefused(f"WHISPER_STORAGE_URL={where}: a test write failed: {failure.strerror}")

    def sweep_store(self, live_jobs: set[str], min_age_seconds: float) -> list[str]:
        """Objects of no live job, and multipart uploads, older than min_age_seconds: gone.
        Younger ones may be an upload another node is publishing right now: a later start takes them."""
        cutoff = wall_time() - min_age_seconds
        by_job: dict[str, list[dict]] = {}
        removed: list[str] = []
        try:
            for item in self._list(f"{self.base}jobs/"):
                job_id = item["Key"][len(f"{self.base}jobs/"):].split("/", 1)[0]
                by_job.setdefault(job_id, []).append(item)
            doomed = []
            for job_id, items in by_job.items():
                if job_id in live_jobs and is_job_id(job_id):
                    continue
                owners = {item["Key"].rsplit(f"/{OWNER}", 1)[1] for item in items if f"/upload/{OWNER}" in item["Key"]}
                young = any(item["LastModified"].timestamp() > cutoff for item in items)
                if young and (self.node is None or owners != {self.node}):
                    continue  # another node may be publishing it right now: a later start decides
                doomed += [item["Key"] for item in items]  # an upload this node made in its last life is dead
            doomed += [item["Key"] for item in self._list(f"{self.base}{PROBE_KEY}")
                       if item["LastModified"].timestamp() <= cutoff]
            self._delete_keys(doomed)
            removed += doomed
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.base}jobs/"):  # tus: retention's
                for upload in page.get("Uploads", []):
                    if upload["Initiated"].timestamp() <= cutoff:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                           UploadId=upload["UploadId"])
                        removed.append(f"multipart upload of {upload['Key']}")
        except Exception as exc:
            log.error("the start-up sweep of the object store stopped: %s", _store_error(exc, "sweep"))
        return removed

    def cluster_marks(self):
        """The cluster's mark is an object beside the jobs: the store is what the nodes share."""
        key = f"{self.base}{CLUSTER_MARK}"

        def read() -> str | None:
            bex = _client_errors()
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except bex.ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return None
                raise _store_error(exc, "read the cluster's mark") from None
            return body.decode("utf-8", "replace").strip() or None

        def write(identity: str) -> None:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=(identity + "\n").encode(), **self.extra)

        return {"WHISPER_STORAGE_URL": (f"s3://{self.bucket}/{self.base}", f"s3://{self.bucket}/{key}", read, write)}

    def leftovers(self, live_jobs: set[str], min_age_seconds: float = 0.0) -> list[Path]:
        return []  # the scratch holds copies only: nothing there is the ledger's business

    def sweep(self, live_jobs: set[str], known_jobs: set[str],
              min_age_seconds: float = 0.0) -> tuple[list[str], Path | None]:
        """At start: this node's scratch is copies of a run that ended with the last process: all go
        (tus PATCHes' spools too, in the staging directory: their bytes never counted)."""
        removed = []
        _remove_tree(self.staging_root)
        self.staging_root.mkdir(parents=True, exist_ok=True)
        for root in (self.tmp_root, self.output_root):
            for entry in root.iterdir():
                if entry.name in (STAGING, QUARANTINE, RESUMABLE, MARKERS, CLUSTER_MARK) or entry.name.startswith(".probe-") \
                        or entry.name.startswith(".write-test-"):
                    continue
                if is_job_id(entry.name) or entry.name.startswith(".read-"):
                    _remove_tree(entry)
                    removed.append(str(entry))
        return removed, None

    async def close(self) -> None:
        self._closed = True
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        self._pool.shutdown(wait=False)


__all__ = ["S3JobFiles", "StoreRefused"]
