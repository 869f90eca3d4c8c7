"""tus uploads on the S3 backend: one S3 multipart upload per tus upload, PATCHes onto its parts.

An upload's bytes live under <prefix>/uploads/<id>/: the parts of one multipart upload (key
`data`), each PART_BYTES long, and the bytes past the last whole part (fewer than PART_BYTES:
S3 refuses a part under 5 MiB unless it is the last) in an object `tail-<random>`. The ledger's
`stored` column records which: {"mpu": its id, "parts": [[number, etag], ...], "tail": name}.
Any node may take the next PATCH: it spools the tail and the body in its scratch, sends the
whole parts it now has under part numbers reserved in the ledger (never handed out twice, so a
PATCH that lost its claim cannot overwrite one that counts), puts the rest as a new tail, and
the ledger's offset update (compare-and-set) decides whether any of it counts. Nothing is
overwritten in place: what lost is deleted, or never listed when the upload is completed.

Parts are numbered in the order PATCHes counted them, which is the order of their bytes: a PATCH
reserves its numbers after it read the record of every PATCH that counted before it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..jobfiles import _remove_tree
from ..jobs import UploadRecord
from .s3_errors import client_errors, missing_as_gone

if TYPE_CHECKING:
    from .s3 import S3JobFiles

log = logging.getLogger("whisperd.store")
PART_BYTES = 8 * 2**20  # S3's floor for a part that is not the last is 5 MiB
DATA = "data"


def record_of(upload: UploadRecord) -> dict[str, Any]:
    state = json.loads(upload.stored) if upload.stored else {}
    return {"mpu": state.get("mpu"), "parts": [list(part) for part in state.get("parts", [])],
            "tail": state.get("tail")}


class S3Patch:
    """One PATCH on the S3 backend (store.PatchBytes): spooled in the node's scratch, then parts."""

    def __init__(self, store: "S3JobFiles", upload: UploadRecord, offset: int, spool: Path) -> None:
        self.store = store
        self.upload = upload
        self.start = offset
        self.received = 0
        self.record = record_of(upload)
        self.head = offset - len(self.record["parts"]) * PART_BYTES  # the tail's bytes, first in the spool
        self.spool = spool
        self.handle = open(spool, "w+b")
        os.chmod(spool, 0o600)
        self.written: tuple[str | None, str | None] = (None, None)  # (multipart upload made, tail put)

    def fill(self) -> None:
        """The tail that counts, first in the spool (in the store's thread pool)."""
        if self.head:
            key = self.store.upload_key(self.upload.id, self.record["tail"])
            with missing_as_gone(key):
                body = self.store.client.get_object(Bucket=self.store.bucket, Key=key, Range=f"bytes=0-{self.head - 1}")["Body"]
            for chunk in iter(lambda: body.read(2**20), b""):
                self.handle.write(chunk)
            if self.handle.tell() != self.head:
                raise FileNotFoundError(f"the tail of upload {self.upload.id} is shorter than the ledger says")

    def write(self, chunk: bytes) -> None:
        self.handle.write(chunk)
        self.received += len(chunk)

    async def settle(self, keep: bool, reserve) -> tuple[int, str | None]:
        try:
            self.handle.flush()
            if not keep or not self.received:
                self.received = self.received if keep else 0
                return self.received, None
            return self.received, json.dumps(await self._send(reserve))
        except BaseException:
            await self._forget()  # what a failed PATCH wrote counts for nothing: it goes now
            raise
        finally:
            self.handle.close()
            _remove_tree(self.spool)

    async def _send(self, reserve) -> dict[str, Any]:
        """The whole parts the spool now holds, then the rest as a new tail: the upload's new record."""
        whole, rest = divmod(self.head + self.received, PART_BYTES)
        record = dict(self.record, parts=list(self.record["parts"]))
        if whole:
            if record["mpu"] is None:
                record["mpu"] = await self.store._run("start the upload's multipart upload", self._create)
                self.written = (record["mpu"], None)
            first = await reserve(whole)
            sending = asyncio.Semaphore(4)

            async def send(index: int) -> list:
                async with sending:
                    etag = await self.store._run("store a part of the upload", self._part, record["mpu"],
                                                 first + index, index * PART_BYTES, PART_BYTES)
                return [first + index, etag]

            record["parts"] += await asyncio.gather(*(send(index) for index in range(whole)))
        record["tail"] = None
        if rest:
            record["tail"] = f"tail-{uuid.uuid4().hex}"
            self.written = (self.written[0], record["tail"])
            await self.store._run("store the end of the upload", self._put_tail, record["tail"],
                                  whole * PART_BYTES, rest)
        return record

    def _create(self) -> str:
        return self.store.client.create_multipart_upload(Bucket=self.store.bucket, Key=self.store.upload_key(self.upload.id, DATA),
                                                         **self.store.extra)["UploadId"]

    def _part(self, mpu: str, number: int, at: int, size: int) -> str:
        body = os.pread(self.handle.fileno(), size, at)
        with missing_as_gone(f"the multipart upload of {self.upload.id}"):  # aborted: terminated or expired
            return self.store.client.upload_part(Bucket=self.store.bucket, Key=self.store.upload_key(self.upload.id, DATA),
                                             UploadId=mpu, PartNumber=number, Body=body)["ETag"]

    def _put_tail(self, name: str, at: int, size: int) -> None:
        body = os.pread(self.handle.fileno(), size, at)
        self.store.client.put_object(Bucket=self.store.bucket, Key=self.store.upload_key(self.upload.id, name), Body=body,
                                     **self.store.extra)

    async def undo(self) -> None:
        await self._forget()

    async def _forget(self) -> None:
        """Delete the tail this PATCH put and abort the multipart upload it started; parts it sent
        to one that counts are never listed when the upload is completed. Best effort: what
        stays goes with the upload's other objects when it ends."""
        made, tail = self.written
        if made or tail:
            try:
                await self.store._run("remove what a PATCH that did not count wrote", self._undo, made, tail)
            except OSError as exc:
                log.warning("upload %s: what a PATCH that did not count wrote stays until the upload ends: %s",
                            self.upload.id, exc)

    def _undo(self, made: str | None, tail: str | None) -> None:
        if tail:
            self.store.client.delete_object(Bucket=self.store.bucket, Key=self.store.upload_key(self.upload.id, tail))
        if made:
            self.store.client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.store.upload_key(self.upload.id, DATA),
                                                     UploadId=made)

    async def done(self) -> None:
        """The ledger counts the new tail: the old one goes (a failure only leaves it until the upload ends)."""
        old = self.record["tail"]
        if old and self.received:
            try:
                await self.store._run("remove the upload's old tail", lambda: self.store.client.delete_object(
                    Bucket=self.store.bucket, Key=self.store.upload_key(self.upload.id, old)))
            except OSError as exc:
                log.warning("upload %s: its old tail stays until the upload ends: %s", self.upload.id, exc)


def needs_part(upload: UploadRecord) -> bool:
    """Whether staging the upload sends its tail as the multipart upload's last part."""
    record = record_of(upload)
    return bool(record["mpu"] and record["tail"])


def stage(store: "S3JobFiles", upload: UploadRecord, target: Path, tail_part: int | None) -> None:
    """A finished upload's bytes as one local file (in the store's thread pool): its multipart
    upload completed into `data` (once; a later staging finds `data`), then downloaded. tail_part:
    the part number the tail is sent under, reserved in the ledger like every PATCH's."""
    record = record_of(upload)
    data = store.upload_key(upload.id, DATA)
    if record["mpu"] is None:  # fewer bytes than one part: they are all in the tail
        if not record["tail"]:
            raise FileNotFoundError(upload.id)
        _download(store, store.upload_key(upload.id, record["tail"]), target, upload.upload_length)
        return
    if not _exists(store, data):
        try:
            _complete(store, upload, record, data, tail_part)
        except client_errors().ClientError:
            if not _exists(store, data):  # another staging completed it first: its object is here
                raise
    _download(store, data, target, upload.upload_length)


def _complete(store: "S3JobFiles", upload: UploadRecord, record: dict[str, Any], data: str,
              tail_part: int | None) -> None:
    parts = [{"PartNumber": number, "ETag": etag} for number, etag in record["parts"]]
    if record["tail"]:
        assert tail_part is not None
        # The tail becomes the last part, under a number of its own (after every counted part's).
        with missing_as_gone(record["tail"]):
            body = store.client.get_object(Bucket=store.bucket, Key=store.upload_key(upload.id, record["tail"]))["Body"].read()
        size = upload.upload_length - len(record["parts"]) * PART_BYTES
        etag = store.client.upload_part(Bucket=store.bucket, Key=data, UploadId=record["mpu"], PartNumber=tail_part,
                                        Body=body[:size])["ETag"]
        parts.append({"PartNumber": tail_part, "ETag": etag})
    store.client.complete_multipart_upload(Bucket=store.bucket, Key=data, UploadId=record["mpu"],
                                           MultipartUpload={"Parts": parts})


def _exists(store: "S3JobFiles", key: str) -> bool:
    bex = client_errors()
    try:
        store.client.head_object(Bucket=store.bucket, Key=key)
        return True
    except bex.ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return False
        raise


def _download(store: "S3JobFiles", key: str, target: Path, length: int) -> None:
    with missing_as_gone(key):
        store.client.download_file(store.bucket, key, str(target), Config=store._transfer())
    if target.stat().st_size != length:
        raise FileNotFoundError(f"{key} is shorter than the upload")


def upload_ids(store: "S3JobFiles") -> list[str]:
    """Every upload with objects or a multipart upload under <prefix>/uploads/."""
    root = f"{store.base}uploads/"
    found = set()
    for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=root, Delimiter="/"):
        found.update(item["Prefix"][len(root):].rstrip("/") for item in page.get("CommonPrefixes", []))
    for page in store.client.get_paginator("list_multipart_uploads").paginate(Bucket=store.bucket, Prefix=root):
        found.update(item["Key"][len(root):].split("/", 1)[0] for item in page.get("Uploads", []))
    return sorted(found)


def delete_upload(store: "S3JobFiles", upload_id: str) -> None:
    """Every object of the upload, and its multipart upload aborted (its parts go with it)."""
    root = store.upload_key(upload_id, "")
    store._delete_keys([item["Key"] for item in store._list(root)])
    for page in store.client.get_paginator("list_multipart_uploads").paginate(Bucket=store.bucket, Prefix=root):
        for item in page.get("Uploads", []):
            store.client.abort_multipart_upload(Bucket=store.bucket, Key=item["Key"], UploadId=item["UploadId"])

