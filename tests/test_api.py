"""The spec's API through real HTTP against a real server with the fake engine."""

from __future__ import annotations

import hashlib
import re
import socket
import time
import uuid

import pytest
import requests

from conftest import TOKEN, alive, make_wav, wait_until

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def no_jobs_and_no_files(server):
    assert server.rows("SELECT id FROM jobs") == []
    assert server.files_gone()


# -- preflight and auth ---------------------------------------------------------------------


@pytest.mark.parametrize("path,methods", [
    ("/transcription", "OPTIONS, POST, GET, DELETE"),
    (f"/transcription/{uuid.uuid4()}", "OPTIONS, GET, DELETE"),
    (f"/transcription/{uuid.uuid4()}/result", "OPTIONS, GET"),
    ("/status", "OPTIONS, GET"),
])
def test_options_is_open_and_lists_methods(server, path, methods):
    response = server.api("OPTIONS", path, token=None)
    assert response.status_code == 200
    assert response.headers["Allow"] == methods
    assert response.headers["Access-Control-Allow-Methods"] == methods
    assert response.headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type"
    assert response.headers["Access-Control-Max-Age"] == "86400"


@pytest.mark.parametrize("header", [None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer  ", "token abc"])
def test_missing_or_malformed_authorization_is_401_json(server, header):
    headers = {} if header is None else {"Authorization": header}
    for method, path in (("GET", "/status"), ("POST", "/transcription"), ("GET", f"/transcription/{uuid.uuid4()}")):
        response = server.api(method, path, token=None, headers=dict(headers))
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "Bearer" in response.json()["error"]
    no_jobs_and_no_files(server)


def test_auth_disabled_needs_no_header(make_server):
    server = make_server(ENABLE_AUTHORIZATION="false")
    assert server.api("GET", "/status", token=None).json()["security"] == {"authorization_enabled": False}
    response = server.submit(token=None)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert server.wait_status(job_id)["status"] == "Completed"


def test_unknown_endpoint_is_json_404(server):
    response = server.api("GET", "/nope")
    assert response.status_code == 404
    assert "no such endpoint" in response.json()["error"]


# -- submit, poll, fetch --------------------------------------------------------------------


def test_async_submit_poll_result_then_everything_is_deleted(server):
    audio = make_wav(server.root / "meeting.wav", seconds=0.5)
    response = server.submit(audio, diarize="false")
    assert response.status_code == 202
    body = response.json()
    assert set(body) == {"job_id", "status_url"}
    assert UUID.match(body["job_id"])
    assert body["status_url"] == f"/transcription/{body['job_id']}"
    assert response.headers["Location"] == body["status_url"]

    status = server.wait_status(body["job_id"])
    assert status["status"] == "Completed"
    assert status["warnings"] == [status["data"]] and "alignment skipped" in status["data"]
    result = server.api("GET", f"/transcription/{body['job_id']}/result")
    assert result.status_code == 200
    data = result.json()
    size = audio.stat().st_size
    assert data["text"] == f"Fake transcript of {size} bytes.\nSecond segment.\n"
    assert data["language"] == "en"
    assert data["segments"] == [
        {"start": 0.0, "end": 2.5, "text": f" Fake transcript of {size} bytes."},
        {"start": 2.5, "end": 4.0, "text": " Second segment."},
    ]
    assert server.files_gone()
    again = server.api("GET", f"/transcription/{body['job_id']}/result")
    assert again.status_code == 410
    assert "already delivered" in again.json()["error"]
    assert server.status(body["job_id"]).json()["data"].startswith("result delivered at")
    (row,) = server.rows("SELECT status, delivered_at, created_at FROM jobs")
    assert row["status"] == "Completed" and row["delivered_at"].endswith("Z")
    events = [r["event"] for r in server.rows("SELECT event FROM job_events ORDER BY id")]
    assert events == ["accepted", "started", "warning", "completed", "delivered"]


def test_engine_gets_the_specs_arguments_and_its_own_output_dir(server):
    job_id = server.submit_ok(language="en", model="tiny.en", prompt="Names: Ada, Alan", diarize="false",
                              device="cpu", device_index="1", response_format="vtt")
    server.wait_status(job_id)
    (run,) = server.engine_runs()
    argv = run["argv"]
    option = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    assert argv[0].endswith("fake_whisperx.py")
    assert argv[1].endswith("/" + job_id + "/audio.wav")
    assert option("--model").endswith("/models/tiny.en")
    assert option("--language") == "en"
    assert "--task" not in argv  # a transcription: the CLI's default task
    assert option("--output_dir").endswith("/" + job_id)
    assert option("--output_format") == "json"
    assert option("--device") == "cpu" and option("--device_index") == "1"
    assert option("--initial_prompt") == "Names: Ada, Alan"
    assert option("--compute_type") == "int8"
    assert "--diarize" not in argv
    assert run["sid"] == run["pid"]  # its own session, so its group can be stopped as a whole
    result = server.api("GET", f"/transcription/{job_id}/result").json()
    assert result["text"].startswith("WEBVTT\n")


@pytest.mark.parametrize("fmt,start", [
    ("txt", "Fake transcript"), ("srt", "1\n00:00:00,000 --> 00:00:02,500\n"), ("vtt", "WEBVTT"),
    ("tsv", "start\tend\ttext\n0\t2500\t"), ("json", '{"segments"'), ("aud", "0.0\t2.5\tFake"),
])
def test_every_response_format(server, fmt, start):
    job_id = server.submit_ok(response_format=fmt, diarize="false")
    server.wait_status(job_id)
    assert server.api("GET", f"/transcription/{job_id}/result").json()["text"].startswith(start)


def test_result_can_be_asked_in_another_format(server):
    job_id = server.submit_ok(response_format="txt", diarize="false")
    server.wait_status(job_id)
    text = server.api("GET", f"/transcription/{job_id}/result?response_format=srt").json()["text"]
    assert text.startswith("1\n00:00:00,000 -->")


def test_sync_mode_returns_the_result(server):
    response = server.submit(sync="true", diarize="no")
    assert response.status_code == 200, response.text
    assert response.json()["text"].startswith("Fake transcript of")
    assert server.files_gone()
    (row,) = server.rows("SELECT delivered_at FROM jobs")
    assert row["delivered_at"]


def test_default_sync_mode_from_config(make_server):
    server = make_server(DEFAULT_SYNC_MODE="true")
    assert server.submit(diarize="false").status_code == 200
    assert server.submit(diarize="false", sync="false").status_code == 202


def test_sync_timeout_answers_202_and_the_job_goes_on(make_server):
    server = make_server(SYNC_REQUEST_TIMEOUT_SECONDS="1")
    started = time.monotonic()
    response = server.submit(sync="1", diarize="false", prompt="fake:slow")
    assert time.monotonic() - started >= 0.9  # never before the limit (how soon after is not a test's to judge)
    assert response.status_code == 202 and response.json()["status"] == "Processing"
    body = response.json()
    assert body["status_url"] == f"/transcription/{body['job_id']}"
    assert server.wait_status(body["job_id"])["status"] == "Completed"
    assert server.api("GET", f"/transcription/{body['job_id']}/result").status_code == 200


def test_sync_failure_is_an_error_with_the_reason(server):
    response = server.submit(sync="true", diarize="false", prompt="fake:fail")
    assert response.status_code == 422
    assert response.json() == {"error": "transcription failed: RuntimeError: fake engine failure"}


# -- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode,reason", [
    ("fail", "RuntimeError: fake engine failure"),
    ("crash", "the engine was killed by signal SIGSEGV"),
    ("noout", "the engine exited without writing a result"),
    ("garbage", "the engine wrote a result that is not valid JSON"),
])
def test_engine_failures_fail_the_job_with_a_reason(server, mode, reason):
    job_id = server.submit_ok(diarize="false", prompt=f"fake:{mode}")
    status = server.wait_status(job_id)
    assert status["status"] == "Failed"
    assert status["data"].startswith(reason)
    assert "/" not in status["data"]  # no server paths
    result = server.api("GET", f"/transcription/{job_id}/result")
    assert result.status_code == 422 and reason in result.json()["error"]
    assert server.files_gone()
    # the queue moves on
    assert server.wait_status(server.submit_ok(diarize="false"))["status"] == "Completed"


def test_missing_engine_fails_jobs_clearly(make_server, tmp_path):
    server = make_server(WHISPER_CMD=str(tmp_path / "no-such-whisperx.sh"))
    assert "missing or not executable" in server.log()
    status = server.wait_status(server.submit_ok(diarize="false"))
    assert status["status"] == "Failed"
    assert "could not be started" in status["data"]


def test_job_time_limit(make_server):
    server = make_server(WHISPER_JOB_TIMEOUT_SECONDS="1")
    job_id = server.submit_ok(diarize="false", prompt="fake:hang")
    status = server.wait_status(job_id, timeout=15)
    assert status["status"] == "Failed"
    assert "WHISPER_JOB_TIMEOUT_SECONDS (1 s)" in status["data"]
    (run,) = server.engine_runs()
    assert not alive(run["pid"])


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,needle", [
    ({"language": "xx"}, "'language'"),
    ({"response_format": "docx"}, "'response_format' must be one of srt"[:17]),
    ({"device": "tpu"}, "'device' must be one of cuda, cpu"),
    ({"diarize": "maybe"}, "'diarize' must be true or false"),
    ({"sync": "perhaps"}, "'sync' must be true or false"),
    ({"device_index": "-1"}, "'device_index'"),
    ({"model": "../../etc"}, "'model'"),
    ({"model": "large-v3"}, "not installed"),
    ({"colour": "blue"}, "unknown form field 'colour'"),
])
def test_bad_fields_are_400_naming_the_field(server, fields, needle):
    response = server.submit(**fields)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]
    no_jobs_and_no_files(server)


def test_booleans_accept_the_usual_spellings(server):
    for value in ("TRUE", "1", "Yes", "false", "0", "NO", "off"):
        assert server.submit(diarize=value).status_code == 202, value


def test_missing_file_empty_file_and_wrong_parts(server):
    response = server.api("POST", "/transcription", files={"language": (None, "en")})
    assert response.status_code == 400 and "'file'" in response.json()["error"]
    empty = server.root / "empty.wav"
    empty.write_bytes(b"")
    response = server.submit(empty)
    assert response.status_code == 400 and "empty" in response.json()["error"]
    response = server.api("POST", "/transcription", files={"file": (None, "just text")})
    assert response.status_code == 400 and "must be a file upload" in response.json()["error"]
    audio = make_wav(server.root / "a.wav")
    response = server.api("POST", "/transcription", files=[("file", ("a.wav", audio.read_bytes())),
                                                          ("file", ("b.wav", audio.read_bytes()))])
    assert response.status_code == 400 and "more than one" in response.json()["error"]
    response = server.api("POST", "/transcription", files={"other": ("a.wav", audio.read_bytes())})
    assert response.status_code == 400 and "unexpected file" in response.json()["error"]
    no_jobs_and_no_files(server)


def test_wrong_content_type_and_missing_boundary(server):
    response = server.api("POST", "/transcription", json={"file": "x"})
    assert response.status_code == 415 and "multipart/form-data" in response.json()["error"]
    response = server.api("POST", "/transcription", data=b"--x--", headers={"Content-Type": "multipart/form-data"})
    assert response.status_code == 400 and "boundary" in response.json()["error"]
    no_jobs_and_no_files(server)


def test_too_large_by_content_length_and_by_counting_chunks(make_server):
    server = make_server(MAX_FILE_SIZE="2000")
    big = server.root / "big.wav"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))
    response = server.submit(big)
    assert response.status_code == 413
    assert "MAX_FILE_SIZE (2000 bytes)" in response.json()["error"]

    def chunked():  # no Content-Length: the server must count
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.wav\"\r\n\r\n"
        for _ in range(10):
            yield b"\1" * 1000
        yield b"\r\n--b--\r\n"

    response = server.api("POST", "/transcription", data=chunked(),
                          headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413
    no_jobs_and_no_files(server)
    small = make_wav(server.root / "small.wav", seconds=0.01)
    assert small.stat().st_size < 2000 and server.submit(small).status_code == 202


def test_aborted_upload_leaves_nothing(server):
    head = (f"POST /transcription HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n").encode()
    part = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.wav\"\r\n\r\n" + b"\1" * 5000
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + part)
        # The part is on the server's disk before the client leaves.
        wait_until(lambda: list((server.root / "tmp" / ".incoming").glob("*/*")), what="the staged part")
    wait_until(lambda: "upload cut short by the client" in server.log(), what="the server to drop the upload")
    no_jobs_and_no_files(server)
    # a complete body without the closing boundary is refused too
    body = part + b"\r\n"
    response = server.api("POST", "/transcription", data=body,
                          headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 400 and "truncated" in response.json()["error"]
    no_jobs_and_no_files(server)


def test_hostile_file_names_never_become_paths(server):
    audio = make_wav(server.root / "a.wav").read_bytes()
    for name in ("../../evil.wav", "/etc/passwd", "a" * 4000 + ".wav", "x\x00y.wav", "..\\..\\w.wav"):
        response = server.api("POST", "/transcription", files={"file": (name, audio)}, data={"diarize": "false"})
        assert response.status_code == 202, (name, response.text)
        server.wait_status(response.json()["job_id"])
    for run in server.engine_runs():
        assert run["argv"][1].split("/")[-1] in ("audio.wav", "audio")
    assert not (server.root / "evil.wav").exists()


# -- status, queue, cancel -------------------------------------------------------------------


def test_unknown_and_malformed_ids_are_404(server):
    for job_id in (str(uuid.uuid4()), "not-a-uuid", "..%2F..%2Fetc"):
        for method, path in (("GET", f"/transcription/{job_id}"), ("GET", f"/transcription/{job_id}/result"),
                             ("DELETE", f"/transcription/{job_id}")):
            response = server.api(method, path)
            assert response.status_code == 404, (method, path)
            assert "error" in response.json()


def test_fifo_queue_positions_and_order(make_server):
    # Long enough for three more uploads to pass intake (ffprobe and ffmpeg each) meanwhile.
    server = make_server(FAKE_WHISPERX_SLOW_SECONDS="10")
    first = server.submit_ok(diarize="false", prompt="fake:slow")
    server.wait_status(first, ("Processing",))
    queued = [server.submit_ok(diarize="false") for _ in range(3)]
    assert server.status(first).json()["status"] == "Processing"
    assert "queue_position" not in server.status(first).json()
    assert [server.status(j).json() for j in queued] == [
        {"status": "Queued", "queue_position": p} for p in (1, 2, 3)
    ]
    status = server.api("GET", "/status").json()
    assert status["queue_state"] == {"queued_jobs": 3, "processing_jobs": 1}
    for job_id in queued:
        server.wait_status(job_id)
    order = [run["argv"][1].split("/")[-2] for run in server.engine_runs()]
    assert order == [first] + queued


def test_concurrent_mode_runs_several_and_reports_batches(make_server):
    # Long enough for five more uploads to pass intake (ffprobe and ffmpeg each) meanwhile.
    server = make_server(ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="2", FAKE_WHISPERX_SLOW_SECONDS="10")
    running = [server.submit_ok(diarize="false", prompt="fake:slow") for _ in range(2)]
    for job_id in running:
        server.wait_status(job_id, ("Processing",))
    queued = [server.submit_ok(diarize="false") for _ in range(5)]
    assert [server.status(j).json()["queue_position"] for j in queued] == [1, 1, 2, 2, 3]
    assert server.api("GET", "/status").json()["queue_state"] == {"queued_jobs": 5, "processing_jobs": 2}
    runs = wait_until(lambda: len(server.engine_runs()) >= 2 and server.engine_runs(), 5, "both engines to start")
    assert len(runs) == 2 and "--threads" in runs[0]["argv"]
    for job_id in queued + running:
        assert server.wait_status(job_id)["status"] == "Completed"


def test_cancel_queued_job(server):
    blocker = server.submit_ok(diarize="false", prompt="fake:slow")
    server.wait_status(blocker, ("Processing",))
    job_id = server.submit_ok(diarize="false")
    response = server.api("DELETE", f"/transcription/{job_id}")
    assert response.status_code == 200
    assert response.json() == {"success": True, "message": "Job canceled successfully"}
    assert not any(job_id in path for path in server.job_files())
    assert server.status(job_id).status_code == 410
    assert server.api("DELETE", f"/transcription/{job_id}").status_code == 409
    server.wait_status(blocker)
    assert all(job_id not in " ".join(run["argv"]) for run in server.engine_runs())


@pytest.mark.parametrize("mode", ["slow", "hang", "grandchild"])
def test_cancel_processing_job_stops_the_whole_process_group(server, mode):
    job_id = server.submit_ok(diarize="false", prompt=f"fake:{mode}")
    server.wait_status(job_id, ("Processing",))
    (run,) = wait_until(server.engine_runs, 5, "the engine to start")
    if mode == "grandchild":
        (run,) = wait_until(lambda: [r for r in server.engine_runs() if r.get("grandchild_pid")], 10,
                            "the engine to start its grandchild")
    response = server.api("DELETE", f"/transcription/{job_id}")
    assert response.status_code == 200, response.text
    assert response.json()["success"] is True
    for pid in (run["pid"], run.get("grandchild_pid")):
        if pid:
            assert not alive(pid), f"pid {pid} survived the cancel"
    assert server.status(job_id).status_code == 410
    assert server.files_gone()
    events = [r["event"] for r in server.rows("SELECT event FROM job_events WHERE job_id=? ORDER BY id", (job_id,))]
    assert events[-2:] == ["cancel-requested", "canceled"]


def test_cancel_finished_job_is_409(server):
    job_id = server.submit_ok(diarize="false")
    server.wait_status(job_id)
    response = server.api("DELETE", f"/transcription/{job_id}")
    assert response.status_code == 409 and "Completed" in response.json()["error"]


def test_status_endpoint_has_the_specs_shape(make_server):
    server = make_server(WHISPER_JOB_RETENTION_HOURS="24", WHISPER_CLEANUP_INTERVAL_HOURS="6")
    body = server.api("GET", "/status").json()
    # One key beyond the spec's, the engine's state (the warm engine's is tested in test_worker.py).
    assert body.pop("engine") == {"mode": "cli", "state": "ready", "loaded_models": []}
    # And this node; an admin (the any-token caller is one) sees every node of the ledger.
    node = body.pop("node")
    assert node["role"] == "all" and node["name"]
    (listed,) = body.pop("nodes")
    assert listed["name"] == node["name"] and listed["role"] == "all" and listed["running_jobs"] == 0
    assert body == {
        "server": {"host": "127.0.0.1", "port": str(server.port), "timeout": 480, "keepalive": 480, "worker_number": 1},
        "processing": {"concurrent_mode": False, "max_concurrent_jobs": 6, "device": "cpu", "device_index": "0",
                       "default_output_format": "txt", "default_sync_mode": False, "sync_timeout": 1800},
        "resources": {"max_file_size": 536870912, "job_retention_hours": 24, "cleanup_interval_hours": 6},
        "security": {"authorization_enabled": True},
        "queue_state": {"queued_jobs": 0, "processing_jobs": 0},
        "error": None,
    }


# -- diarization, tokens, warnings -----------------------------------------------------------


def test_diarize_without_token_uses_senko_offline(server):
    """WHISPER_DIARIZATION=auto, no token: senko names the speakers, nothing is skipped."""
    job_id = server.submit_ok(diarize="true", response_format="json")
    status = server.wait_status(job_id)
    assert status["status"] == "Completed" and "diariz" not in status["data"]
    (run,) = server.engine_runs()
    assert "--diarize" not in run["argv"] and run["hf_token_sha256"] is None
    result = server.api("GET", f"/transcription/{job_id}/result").json()
    assert result["speakers"] == ["SPEAKER_00", "SPEAKER_01"]
    assert [s["speaker"] for s in result["segments"]] == ["SPEAKER_00", "SPEAKER_01"]


def test_diarize_without_token_runs_without_and_says_so(make_server):
    server = make_server(WHISPER_DIARIZATION="pyannote")
    job_id = server.submit_ok(diarize="true")
    status = server.wait_status(job_id)
    assert status["status"] == "Completed"
    assert "no Hugging Face token" in status["data"]
    (run,) = server.engine_runs()
    assert "--diarize" not in run["argv"] and run["hf_token_sha256"] is None
    result = server.api("GET", f"/transcription/{job_id}/result").json()
    assert any("diarization skipped" in w for w in result["warnings"])
    assert "speaker diarization skipped: no Hugging Face token" in server.log()


def test_hf_token_reaches_the_engine_only_through_its_environment(make_server):
    secret = "hf_" + uuid.uuid4().hex
    server = make_server(WHISPER_OFFLINE="false")  # online: diarization can be attempted
    job_id = server.submit_ok(diarize="true", hf_token=secret, num_speakers="2")
    assert server.wait_status(job_id)["status"] == "Completed"
    (run,) = server.engine_runs()
    assert "--diarize" in run["argv"]
    assert " ".join(run["argv"]).endswith("--min_speakers 2 --max_speakers 2 --vad_method silero --print_progress True")
    assert secret not in " ".join(run["argv"])
    assert run["hf_token_sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    result = server.api("GET", f"/transcription/{job_id}/result").json()
    assert {s.get("speaker") for s in result["segments"]} <= {"SPEAKER_00", "SPEAKER_01"}
    server.stop()
    assert secret not in server.log()
    for path in server.root.rglob("whisperd.db*"):
        assert secret.encode() not in path.read_bytes()
    assert server.files_gone()


def test_token_file_and_env_token_are_used(make_server, tmp_path):
    secret = "hf_file_" + uuid.uuid4().hex
    server = make_server(start=False, WHISPER_OFFLINE="false")
    token_file = server.root / "hf_token.txt"
    token_file.write_text(secret + "\n")
    token_file.chmod(0o644)
    server.start()
    assert "chmod 600" in server.log()
    server.wait_status(server.submit_ok(diarize="true"))
    assert server.engine_runs()[0]["hf_token_sha256"] == hashlib.sha256(secret.encode()).hexdigest()


def test_failed_optional_stage_is_retried_without_it(make_server):
    server = make_server(WHISPER_OFFLINE="false")
    job_id = server.submit_ok(diarize="true", hf_token="hf_x", prompt="fake:failstage")
    status = server.wait_status(job_id)
    assert status["status"] == "Completed"
    assert "alignment and diarization failed" in status["data"]
    first, second = server.engine_runs()
    assert "--diarize" in first["argv"] and "--no_align" not in first["argv"]
    assert "--diarize" not in second["argv"] and "--no_align" in second["argv"]


def test_offline_skips_alignment_with_a_warning(server):
    job_id = server.submit_ok(diarize="false")
    status = server.wait_status(job_id)
    assert "word alignment skipped" in status["data"]
    assert "--no_align" in server.engine_runs()[0]["argv"]


# -- progress ----------------------------------------------------------------------------------


def test_processing_status_reports_progress(server):
    job_id = server.submit_ok(diarize="false", prompt="fake:slow")
    seen = set()

    def completed() -> bool:  # noting the progress on the way
        body = server.status(job_id).json()
        if body["status"] == "Processing" and body.get("progress"):
            seen.add(body["progress"])
        return body["status"] == "Completed"

    wait_until(completed, 10, "the job to complete", poll=0.1)
    assert seen and all(0 < p <= 100 for p in seen)


def test_detected_language_comes_from_the_engine_not_its_json(make_server):
    server = make_server(FAKE_WHISPERX_DETECT="de")
    (server.root / "models" / "multi").mkdir()
    (server.root / "models" / "multi" / "model.bin").write_bytes(b"fake")
    job_id = server.submit_ok(diarize="false", language="auto", model="multi")
    server.wait_status(job_id)
    assert "--language" not in server.engine_runs()[0]["argv"]
    assert server.api("GET", f"/transcription/{job_id}/result").json()["language"] == "de"
