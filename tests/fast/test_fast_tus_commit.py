"""Issue 24 item 7 through HTTP: a tus upload is used up only by the transaction that inserts its
job. A submission the ledger could not commit (here: the ledger locked by someone else past the
wait limit, answered 503) leaves the upload whole, and the retry makes the job."""

from __future__ import annotations

import base64
import json
import sqlite3

import pytest

from .harness import WAV, body_of, multipart

gen_test = pytest.mark.gen_test(timeout=30)
TUS = {"Tus-Resumable": "1.0.0"}


async def finished_upload(api) -> str:
    created = await api.call("POST", "/uploads", headers={
        **TUS, "Upload-Length": str(len(WAV)), "Upload-Metadata": "filename " + base64.b64encode(b"a.wav").decode()})
    assert created.code == 201, created.body
    location = created.headers["Location"]
    patched = await api.call("PATCH", location, WAV, {**TUS, "Upload-Offset": "0",
                                                      "Content-Type": "application/offset+octet-stream"})
    assert patched.code == 204, patched.body
    return location.rsplit("/", 1)[1]


async def use(api, upload_id: str):
    body, content_type = multipart({"upload": upload_id}, None)
    return await api.call("POST", "/transcription", body, {"Content-Type": content_type})


@pytest.mark.settings(WHISPER_DB_BUSY_TIMEOUT_MS="200")
@gen_test
async def test_a_submission_that_never_commits_leaves_the_upload_whole_and_usable(api, service, monkeypatch):
    upload_id = await finished_upload(api)
    bytes_path = service.files.resumable_path(upload_id)
    blocker = sqlite3.connect(service.config.db_path, isolation_level=None)
    submit = service.submit

    async def locked_out(*args, **kwargs):
        # The upload is probed and decoded; now, as its row is to be written, the ledger is
        # locked by an operator's session past the wait limit.
        blocker.execute("BEGIN IMMEDIATE")
        return await submit(*args, **kwargs)

    monkeypatch.setattr(service, "submit", locked_out)
    try:
        refused = await use(api, upload_id)
    finally:
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
        monkeypatch.setattr(service, "submit", submit)
    assert refused.code == 503 and "Retry-After" in refused.headers, refused.body
    upload = await service.ledger.get_upload(upload_id)
    assert upload.job_id is None and upload.used_at is None
    assert bytes_path.read_bytes() == WAV  # whole
    assert await service.ledger.list_jobs(None, None, None, 10) == []

    accepted = await use(api, upload_id)
    assert accepted.code == 202, accepted.body
    job_id = json.loads(accepted.body)["job_id"]
    assert (await service.ledger.get_upload(upload_id)).job_id == job_id
    assert not bytes_path.exists()  # the job has its own name for them now
    assert service.files.audio_path(job_id) is not None
    again = await use(api, upload_id)
    assert again.code == 409 and f"already used by job {job_id}" in body_of(again)["error"]
