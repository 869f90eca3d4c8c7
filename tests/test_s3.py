"""Job files in S3-compatible object storage (issue 29), through real HTTP against a real S3
server: SeaweedFS started by tests/seaweed.py. The scratch directories hold copies only."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

from conftest import make_wav, wait_until
from harness import long_tone
from seaweed import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedServer, prefix_of


def s3_server(make_server, store: SeaweedServer, **env):
    return make_server(**{**store.storage_env(), **env})


def running_and_queued(make_server, store: SeaweedServer):
    """A server on S3 with a job running (slowly) and one queued behind it: (server, prefix, running, queued)."""
    server = s3_server(make_server, store, FAKE_WHISPERX_SLOW_SECONDS="30")
    running = server.submit_ok(prompt="fake:slow", diarize="false")
    queued = server.submit_ok(diarize="false")
    wait_until(lambda: server.status(running).json()["status"] == "Processing", 15, "the first job to run")
    return server, prefix_of(server.env), running, queued


def job_objects(store: SeaweedServer, prefix: str) -> list[str]:
    """The jobs' and the tus uploads' objects (the ledger's identity mark beside them aside)."""
    return store.keys(f"{prefix}jobs/") + store.keys(f"{prefix}uploads/")


def scratch_files(server) -> list[str]:
    """The node's own directories: what is there beside the store's objects."""
    return server.job_files(stored=False)


def test_a_job_lives_in_the_store_and_is_gone_after_delivery(make_server, seaweed):
    server = s3_server(make_server, seaweed)
    prefix = prefix_of(server.env)
    audio = make_wav(server.root / "meeting.wav", seconds=0.5)
    job_id = server.submit_ok(audio, diarize="false")
    assert server.wait_status(job_id)["status"] == "Completed"
    keys = seaweed.keys(f"{prefix}jobs/{job_id}/")
    assert f"{prefix}jobs/{job_id}/upload/audio.wav" in keys
    assert any(key.startswith(f"{prefix}jobs/{job_id}/output/") and key.endswith(".json") for key in keys), keys
    wait_until(lambda: not scratch_files(server), 10, "the run's scratch copies to go")  # copies only
    result = server.api("GET", f"/transcription/{job_id}/result")
    assert result.status_code == 200, result.text
    assert result.json()["text"].startswith("Fake transcript of ")
    assert server.files_gone(), server.job_files()  # objects deleted after delivery
    assert job_objects(seaweed, prefix) == []
    assert server.api("GET", f"/transcription/{job_id}/result").status_code == 410
    log = server.log()  # RUST_LOG=debug: boto3's own debug lines (request headers) stay out
    assert ACCESS_KEY not in log and SECRET_KEY not in log and "Signature" not in log


def test_sync_mode_and_the_openai_route_read_from_the_store(make_server, seaweed):
    server = s3_server(make_server, seaweed)
    response = server.submit(sync="true", diarize="false")
    assert response.status_code == 200, response.text
    assert response.json()["text"].startswith("Fake transcript of ")
    audio = server.default_audio
    openai = server.api("POST", "/v1/audio/transcriptions", files={"file": (audio.name, audio.read_bytes())},
                        data={"model": "whisper-1", "response_format": "json"})
    assert openai.status_code == 200, openai.text
    assert openai.json()["text"].startswith("Fake transcript of ")
    assert server.files_gone(), server.job_files()


def test_the_hf_token_and_speaker_options_travel_through_the_store(make_server, seaweed):
    secret = "hf_" + uuid.uuid4().hex
    server = s3_server(make_server, seaweed, WHISPER_OFFLINE="false")  # online: diarization can be attempted
    job_id = server.submit_ok(diarize="true", hf_token=secret, num_speakers="2")
    assert server.wait_status(job_id)["status"] == "Completed"
    (run,) = server.engine_runs()  # the engine ran on the node's copy of the stored files
    assert " ".join(run["argv"]).endswith("--min_speakers 2 --max_speakers 2 --vad_method silero --print_progress True")
    assert run["hf_token_sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    assert server.api("GET", f"/transcription/{job_id}/result").status_code == 200
    server.stop()
    assert secret not in server.log()
    assert server.files_gone(), server.job_files()


def test_cancel_and_retention_delete_the_objects(make_server, seaweed):
    server, prefix, running, queued = running_and_queued(make_server, seaweed)
    assert seaweed.keys(f"{prefix}jobs/{queued}/")
    assert server.api("DELETE", f"/transcription/{queued}").status_code == 200
    wait_until(lambda: not seaweed.keys(f"{prefix}jobs/{queued}/"), 10, "the canceled job's objects to go")
    assert server.api("DELETE", f"/transcription/{running}").status_code == 200
    wait_until(lambda: not server.job_files(), 15, "every object and scratch copy to go")


@pytest.fixture
def own_store():
    """A SeaweedFS of this test's own: the test stops and restarts it."""
    store = SeaweedServer().start()
    yield store
    store.destroy()


def test_store_down_submissions_503_nothing_left_and_back_when_it_returns(make_server, own_store):
    server = s3_server(make_server, own_store)
    prefix = prefix_of(server.env)
    own_store.stop()
    response = server.submit(diarize="false")
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) > 0
    assert "storage" in response.json()["error"]
    assert SECRET_KEY not in response.text
    health = server.api("GET", "/health")
    assert health.status_code == 503 and "object store" in health.json()["checks"]["storage"]
    assert server.rows("SELECT id FROM jobs") == []
    assert scratch_files(server) == []
    own_store.start()
    wait_until(lambda: server.api("GET", "/health").status_code == 200, 20, "the node to see the store back")
    assert job_objects(own_store, prefix) == []  # the refused upload left nothing
    job_id = server.submit_ok(diarize="false")
    assert server.wait_status(job_id)["status"] == "Completed"
    assert SECRET_KEY not in server.log()


def test_a_result_that_cannot_be_written_is_retried_never_completed_nor_counted(make_server, own_store):
    server = s3_server(make_server, own_store, FAKE_WHISPERX_SLOW_SECONDS="2")
    job_id = server.submit_ok(prompt="fake:slow", diarize="false")
    wait_until(lambda: server.engine_runs(), 15, "the engine to start")
    own_store.stop()  # the engine has the audio; its result has nowhere to go
    wait_until(lambda: "object store" in str(server.api("GET", "/health").json()["checks"].get("storage")), 30,
               "the node to say why")
    wait_until(lambda: server.status(job_id).json()["status"] == "Queued", 30, "the job to go back")
    (row,) = server.rows("SELECT status, attempts FROM jobs")
    assert row["status"] == "Queued" and row["attempts"] == 0  # the store's outage burnt no attempt
    own_store.start()
    assert server.wait_status(job_id, timeout=60)["status"] == "Completed"
    assert len(server.engine_runs()) == 2
    events = [r["event"] for r in server.rows("SELECT event FROM job_events ORDER BY id")]
    assert events.count("completed") == 1
    assert server.api("GET", f"/transcription/{job_id}/result").status_code == 200
    assert server.files_gone(), server.job_files()


def test_a_claimed_job_whose_audio_cannot_be_fetched_goes_back_uncounted(make_server, own_store):
    server = s3_server(make_server, own_store, FAKE_WHISPERX_SLOW_SECONDS="3")
    first = server.submit_ok(prompt="fake:slow", diarize="false")
    second = server.submit_ok(diarize="false")  # waits for the one slot
    wait_until(lambda: server.engine_runs(), 15, "the first engine to start")
    own_store.stop()
    wait_until(lambda: server.status(first).json()["status"] == "Queued", 30, "the first job to go back")
    assert server.status(second).json()["status"] == "Queued"  # never claimed while the store is away
    assert "object store" in server.log()
    own_store.start()
    for job_id in (first, second):
        assert server.wait_status(job_id, timeout=60)["status"] == "Completed"
    rows = server.rows("SELECT attempts FROM jobs")
    assert all(row["attempts"] <= 1 for row in rows), [dict(r) for r in rows]


@pytest.mark.parametrize("secret, bucket, words", [
    ("wrong-secret-value", BUCKET, "refused this server's credentials"),
    (None, "no-such-bucket-here", "does not exist"),
])
def test_wrong_credentials_or_a_missing_bucket_stop_the_server_with_one_line(make_server, seaweed, secret, bucket, words):
    env = seaweed.storage_env()
    env["WHISPER_STORAGE_URL"] = env["WHISPER_STORAGE_URL"].replace(f"s3://{BUCKET}/", f"s3://{bucket}/")
    if secret:
        env["AWS_SECRET_ACCESS_KEY"] = secret
    server = make_server(start=False, **env)
    server.start(wait=False)
    assert server.proc.wait(30) == 1
    last = server.log().strip().splitlines()[-1]
    assert last.startswith("whisperd: WHISPER_STORAGE_URL=") and words in last, last
    assert (secret or SECRET_KEY) not in server.log()


def test_startup_sweep_removes_orphans_and_stale_multipart_uploads_but_keeps_queued_jobs(make_server, seaweed):
    server, prefix, running, queued = running_and_queued(make_server, seaweed)
    server.kill9()  # mid-run
    orphan = str(uuid.uuid4())
    client = seaweed.client()
    client.put_object(Bucket=BUCKET, Key=f"{prefix}jobs/{orphan}/upload/audio.wav", Body=b"RIFF")
    stale = client.create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}jobs/{orphan}/output/big.json")
    server.env["FAKE_WHISPERX_SLOW_SECONDS"] = "0.2"
    server.start()
    assert seaweed.keys(f"{prefix}jobs/{orphan}/") == []
    assert all(u["UploadId"] != stale["UploadId"] for u in seaweed.multipart_uploads(prefix))
    for job_id in (running, queued):  # live jobs kept their objects, and run
        assert server.wait_status(job_id, timeout=60)["status"] == "Completed"
        assert server.api("GET", f"/transcription/{job_id}/result").status_code == 200
    assert server.files_gone(), server.job_files()


@pytest.mark.parametrize("point", ["upload-committed", "result-sent"])
def test_a_node_killed_mid_upload_or_mid_delivery_leaves_nothing_after_the_sweep(make_server, seaweed, point):
    server = s3_server(make_server, seaweed, WHISPERD_CRASH_AT=point)
    prefix = prefix_of(server.env)
    if point == "upload-committed":  # the objects are stored, the row never written
        with pytest.raises(Exception):
            server.submit(diarize="false", timeout=10)
        server.proc.wait(10)
        assert seaweed.keys(prefix)  # the node died holding them
        job_id = None
    else:  # the whole result written to the client, the delivery never recorded
        del server.env["WHISPERD_CRASH_AT"]
        server.stop()
        server.start()
        job_id = server.submit_ok(diarize="false")
        assert server.wait_status(job_id)["status"] == "Completed"
        server.stop()
        server.env["WHISPERD_CRASH_AT"] = point
        server.start()
        assert server.api("GET", f"/transcription/{job_id}/result").status_code == 200
        server.proc.wait(10)
    server._log_handle.close()
    server.env.pop("WHISPERD_CRASH_AT", None)
    server.start()
    if job_id is not None:  # not delivered as far as the ledger knows: kept, and delivered now
        assert server.api("GET", f"/transcription/{job_id}/result").status_code == 200
    assert server.files_gone(), server.job_files()
    assert job_objects(seaweed, prefix) == []
    assert seaweed.multipart_uploads(prefix) == []


TUS = {"Tus-Resumable": "1.0.0"}


def tus_patch(server, location: str, offset: int, data: bytes):
    return server.api("PATCH", location, data=data, headers={**TUS, "Upload-Offset": str(offset),
                                                             "Content-Type": "application/offset+octet-stream"})


def tus_create(server, size: int) -> str:
    response = server.api("POST", "/uploads", headers={**TUS, "Upload-Length": str(size)})
    assert response.status_code == 201, response.text
    return response.headers["Location"]


def test_a_tus_upload_survives_the_store_down_and_a_restart_and_becomes_a_job_of_its_bytes(make_server, own_store):
    from whisperd.store.s3_tus import PART_BYTES
    server = s3_server(make_server, own_store)
    prefix = prefix_of(server.env)
    data = long_tone(server.root / "long.wav", 300)  # 9.2 MiB: one whole part and a tail
    location = tus_create(server, len(data))
    assert tus_patch(server, location, 0, data[:PART_BYTES + 100]).status_code == 204
    assert len(own_store.multipart_uploads(f"{prefix}uploads/")) == 1
    server.kill9()  # a restart keeps the live upload's multipart upload (the sweep takes only jobs')
    server.start()
    assert len(own_store.multipart_uploads(f"{prefix}uploads/")) == 1

    own_store.stop()
    refused = tus_patch(server, location, PART_BYTES + 100, data[PART_BYTES + 100:])
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0, refused.text
    assert SECRET_KEY not in refused.text
    assert scratch_files(server) == []  # the PATCH's spool went with it
    own_store.start()
    wait_until(lambda: server.api("GET", "/health").status_code == 200, 20, "the node to see the store back")
    head = server.api("HEAD", location, headers=dict(TUS))
    assert head.headers["Upload-Offset"] == str(PART_BYTES + 100)  # nothing of the refused PATCH counted
    assert tus_patch(server, location, PART_BYTES + 100, data[PART_BYTES + 100:]).status_code == 204  # not 423
    job = server.api("POST", "/transcription", files={"upload": (None, location.rsplit("/", 1)[1])})
    assert job.status_code == 202, job.text
    job_id = job.json()["job_id"]
    assert server.wait_status(job_id, timeout=60)["status"] == "Completed"
    assert server.job_audio(job_id) == data
    assert server.api("GET", f"/transcription/{job_id}/result").status_code == 200
    assert server.files_gone(), server.job_files()
    assert SECRET_KEY not in server.log()


def test_a_reset_ledger_on_one_box_refuses_to_start_rather_than_sweep_the_bucket(make_server, seaweed):
    """SQLite and S3 on one box: a ledger that is not the one the bucket's jobs belong to (deleted,
    restored from elsewhere) would find every job object unknown and sweep it; the bucket carries
    the ledger's identity, and the server refuses to start instead."""
    server, prefix, running, queued = running_and_queued(make_server, seaweed)
    server.kill9()
    stored = seaweed.keys(f"{prefix}jobs/")
    ledger = Path(server.env["WHISPER_DB_PATH"])
    aside = ledger.parent / "aside"
    aside.mkdir()
    for path in ledger.parent.glob(ledger.name + "*"):
        path.rename(aside / path.name)
    server.start(wait=False)
    assert server.proc.wait(30) == 1
    assert "WHISPER_STORAGE_URL" in server.log() and "belongs to another cluster" in server.log()
    assert seaweed.keys(f"{prefix}jobs/") == stored  # nothing swept
    for path in ledger.parent.glob(ledger.name + "*"):
        path.unlink()
    for path in aside.iterdir():
        path.rename(ledger.parent / path.name)
    server.env["FAKE_WHISPERX_SLOW_SECONDS"] = "0.2"
    server.start()
    for job_id in (running, queued):
        assert server.wait_status(job_id, timeout=60)["status"] == "Completed"
