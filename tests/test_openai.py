"""The OpenAI-compatible API through the official openai client and plain HTTP, with the fake engine."""

from __future__ import annotations

import time

import openai
import pytest

from conftest import TOKEN, make_wav

ALIGN_CHECKPOINT = "wav2vec2_fairseq_base_ls960_asr_ls960.pth"


def client(server, token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(api_key=token, base_url=server.url("/v1"), max_retries=0, timeout=30)


def transcribe(server, audio=None, **kwargs):
    audio = audio or server.default_audio
    with audio.open("rb") as handle:
        return client(server).audio.transcriptions.create(model=kwargs.pop("model", "whisper-1"), file=handle, **kwargs)


def post(server, fields: dict | None = None, audio=None, token=TOKEN):
    audio = audio or server.default_audio
    files = [("file", (audio.name, audio.read_bytes(), "audio/wav"))]
    data = list((fields or {}).items()) if not isinstance(fields, list) else fields
    return server.api("POST", "/v1/audio/transcriptions", token=token, files=files, data=data)


def openai_error(response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code
    assert error["message"]
    return error


def fake_text(audio) -> str:
    return f"Fake transcript of {audio.stat().st_size} bytes."


# -- every response format through the official client ----------------------------------------


def test_every_response_format_through_the_openai_client(server):
    size_text = fake_text(server.default_audio)
    assert transcribe(server).text == f"{size_text} Second segment."
    assert transcribe(server, response_format="json").text == f"{size_text} Second segment."
    assert transcribe(server, response_format="text") == f"{size_text}\nSecond segment.\n"
    assert transcribe(server, response_format="srt").startswith(f"1\n00:00:00,000 --> 00:00:02,500\n{size_text}\n")
    assert transcribe(server, response_format="vtt").startswith(f"WEBVTT\n\n00:00.000 --> 00:02.500\n{size_text}")
    verbose = transcribe(server, response_format="verbose_json", timestamp_granularities=["segment"])
    assert verbose.text == f"{size_text} Second segment."
    assert verbose.language == "english" and verbose.duration == 4.0
    assert [(s.id, s.start, s.end, s.text) for s in verbose.segments] == [
        (0, 0.0, 2.5, f" {size_text}"), (1, 2.5, 4.0, " Second segment.")]
    # Every job was delivered, so every file is gone; the ledger keeps the story.
    assert server.files_gone()
    rows = server.rows("SELECT status, delivered_at, owner FROM jobs")
    assert len(rows) == 6 and all(r["status"] == "Completed" and r["delivered_at"] for r in rows)


@pytest.mark.parametrize("fmt,content_type", [
    ("json", "application/json"), ("verbose_json", "application/json"), ("text", "text/plain"),
    ("srt", "application/x-subrip"), ("vtt", "text/vtt"),
])
def test_content_types(server, fmt, content_type):
    response = post(server, {"model": "whisper-1", "response_format": fmt})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].split(";")[0] == content_type


def test_verbose_json_keeps_whisperx_segment_fields_and_has_no_words_unless_asked(server):
    body = post(server, {"model": "tiny.en", "response_format": "verbose_json"}).json()
    assert set(body) == {"task", "language", "duration", "text", "segments", "warnings"}
    assert body["task"] == "transcribe"
    assert body["segments"][0] == {"id": 0, "start": 0.0, "end": 2.5, "avg_logprob": -0.25,
                                   "text": f" {fake_text(server.default_audio)}"}
    assert "alignment skipped" in body["warnings"][0]


# -- word timestamps ------------------------------------------------------------------------


def test_word_timestamps_without_an_alignment_model_are_a_clear_400(server):
    with pytest.raises(openai.BadRequestError) as caught:
        transcribe(server, response_format="verbose_json", timestamp_granularities=["word"], language="en")
    error = caught.value.body
    assert error["code"] == "word_timestamps_unavailable" and error["param"] == "timestamp_granularities[]"
    assert "word timestamps are unavailable on this server" in error["message"]
    assert server.rows("SELECT id FROM jobs") == [] and server.files_gone()
    assert server.engine_runs() == []


def test_word_timestamps_when_the_engine_aligns(make_server):
    server = make_server(start=False)
    (server.root / "models" / ALIGN_CHECKPOINT).write_bytes(b"fake checkpoint")
    server.start()
    verbose = transcribe(server, response_format="verbose_json", language="en",
                         timestamp_granularities=["word", "segment"])
    words = [(w.word, w.start, w.end) for w in verbose.words]
    assert words[:3] == [("Fake", 0.0, 0.5), ("transcript", 0.5, 1.0), ("of", 1.0, 1.5)]
    # WhisperX leaves digits untimed; OpenAI's words always have times: the neighbours' are used.
    assert words[3] == (str(server.default_audio.stat().st_size), 1.5, 2.0)
    assert words[-1] == ("segment.", 3.25, 4.0)
    assert len(verbose.segments) == 2 and "words" not in verbose.segments[0].model_extra
    (run,) = server.engine_runs()
    assert "--no_align" not in run["argv"]
    only_words = post(server, [("model", "whisper-1"), ("response_format", "verbose_json"), ("language", "en"),
                               ("timestamp_granularities[]", "word")]).json()
    assert "words" in only_words and "segments" not in only_words


def test_word_timestamps_need_verbose_json(server):
    response = post(server, {"model": "whisper-1", "response_format": "json", "timestamp_granularities[]": "word"})
    openai_error(response, 400, param="timestamp_granularities[]")


# -- models -----------------------------------------------------------------------------------


def test_models_lists_the_alias_and_installed_models(make_server):
    server = make_server(start=False)
    (server.root / "models" / "small").mkdir()
    (server.root / "models" / "small" / "model.bin").write_bytes(b"fake")
    (server.root / "models" / "not-a-model").mkdir()  # no model.bin: not runnable
    server.start()
    listed = client(server).models.list()
    assert [m.id for m in listed.data] == ["whisper-1", "small", "tiny.en"]
    assert server.api("GET", "/v1/models").json()["object"] == "list"


def test_whisper_1_maps_to_the_configured_model_and_names_pick_installed_ones(make_server):
    server = make_server(start=False, WHISPER_OPENAI_MODEL="small")
    (server.root / "models" / "small").mkdir()
    (server.root / "models" / "small" / "model.bin").write_bytes(b"fake")
    server.start()
    transcribe(server, model="whisper-1")
    transcribe(server, model="tiny.en")
    models = [run["argv"][run["argv"].index("--model") + 1] for run in server.engine_runs()]
    assert models[0].endswith("/models/small") and models[1].endswith("/models/tiny.en")


def test_unknown_model_is_400_model_not_found(server):
    with pytest.raises(openai.BadRequestError) as caught:
        transcribe(server, model="gpt-4o-transcribe")
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    assert "whisper-1" in caught.value.body["message"]
    openai_error(post(server, {"model": "../etc"}), 400, param="model", code="model_not_found")
    assert server.rows("SELECT id FROM jobs") == [] and server.files_gone()


# -- auth, limits and the error shape ----------------------------------------------------------


def test_wrong_or_missing_token_raises_authentication_error(server):
    with pytest.raises(openai.AuthenticationError) as caught:
        with server.default_audio.open("rb") as handle:
            client(server, token="not a valid token").audio.transcriptions.create(model="whisper-1", file=handle)
    assert caught.value.status_code == 401
    assert caught.value.body["type"] == "invalid_request_error" and caught.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, token="not a valid token").models.list()
    response = post(server, {"model": "whisper-1"}, token=None)
    openai_error(response, 401, code="invalid_api_key")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert server.rows("SELECT id FROM jobs") == [] and server.files_gone()


def test_oversized_file_through_the_client_is_413(make_server):
    server = make_server(MAX_FILE_SIZE="100000")
    big = make_wav(server.root / "long.wav", seconds=40)  # 1.28 MB: over the limit and the form's allowance
    with pytest.raises(openai.APIStatusError) as caught:
        transcribe(server, big)
    assert caught.value.status_code == 413
    assert "MAX_FILE_SIZE" in caught.value.body["message"]
    # Under the form allowance, the streamed count catches it instead.
    medium = make_wav(server.root / "medium.wav", seconds=4)
    openai_error(post(server, {"model": "whisper-1"}, audio=medium), 413)
    assert server.rows("SELECT id FROM jobs") == [] and server.files_gone()


@pytest.mark.parametrize("fields,param", [
    ({"model": "whisper-1", "response_format": "tsv"}, "response_format"),
    ({"model": "whisper-1", "language": "xx"}, "language"),
    ({"model": "whisper-1", "temperature": "1.5"}, "temperature"),
    ({"model": "whisper-1", "temperature": "warm"}, "temperature"),
    ({"model": "whisper-1", "stream": "true", "response_format": "vtt"}, "stream"),  # stream: json or text only
    ({"model": "whisper-1", "timestamp_granularities[]": "sentence"}, "timestamp_granularities[]"),
    ({}, "model"),
])
def test_bad_fields_are_400_naming_the_param(server, fields, param):
    openai_error(post(server, fields), 400, param=param, code=None)
    assert server.rows("SELECT id FROM jobs") == [] and server.files_gone()


def test_unknown_field_and_missing_file_are_400_in_openai_shape(server):
    openai_error(post(server, {"model": "whisper-1", "diarize": "true"}), 400, param="diarize", code="unknown_parameter")
    response = server.api("POST", "/v1/audio/transcriptions", files={"model": (None, "whisper-1")})
    assert "'file'" in openai_error(response, 400)["message"]
    response = server.api("POST", "/v1/audio/transcriptions", data="{}", headers={"Content-Type": "application/json"})
    openai_error(response, 415)
    openai_error(server.api("GET", "/v1/audio/transcriptions"), 405)


def test_a_failed_job_is_422_with_the_engines_reason(server):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        transcribe(server, prompt="fake:fail")
    assert caught.value.body["code"] == "transcription_failed"
    assert "fake engine failure" in caught.value.body["message"]


def test_the_wait_is_bounded_and_the_job_goes_on(make_server):
    server = make_server(SYNC_REQUEST_TIMEOUT_SECONDS="0.5", FAKE_WHISPERX_SLOW_SECONDS="2")
    response = post(server, {"model": "whisper-1", "prompt": "fake:slow"})
    error = openai_error(response, 504, code="timeout")
    assert response.headers["x-should-retry"] == "false"  # the client must not upload it again
    job_id = response.headers["Location"].rsplit("/", 1)[1]
    assert job_id in error["message"]
    server.wait_status(job_id)
    result = server.api("GET", f"/transcription/{job_id}/result")
    assert result.status_code == 200 and "Fake transcript" in result.json()["text"]


def test_openai_jobs_queue_in_turn_with_transcription_jobs(server):
    first = server.submit_ok(prompt="fake:slow", diarize="false")
    started = time.monotonic()
    assert transcribe(server).text.startswith("Fake transcript")
    assert time.monotonic() - started > 2  # it waited for the slow job ahead of it (3 s)
    runs = server.engine_runs()
    assert len(runs) == 2 and runs[0]["argv"][1].split("/")[-2] == first
    assert server.status(first).json()["status"] == "Completed"


def test_openai_jobs_belong_to_the_caller_and_show_in_the_ledger(server):
    transcribe(server)
    assert server.files_gone()  # the delivery is recorded just after the last byte went out
    (row,) = server.rows("SELECT owner, response_format, language, diarize FROM jobs")
    assert row["response_format"] == "json" and row["language"] == "auto" and row["diarize"] == 0
    events = [r["event"] for r in server.rows("SELECT event FROM job_events ORDER BY id")]
    assert events[0] == "accepted" and events[-1] == "delivered"


def test_preflight_is_open(server):
    response = server.api("OPTIONS", "/v1/audio/transcriptions", token=None)
    assert response.status_code == 200 and response.headers["Allow"] == "OPTIONS, POST"


def test_a_file_without_sound_is_415_in_openai_shape(server):
    notes = server.root / "notes.wav"
    notes.write_text("this is text, not audio\n" * 50)
    response = post(server, {"model": "whisper-1"}, audio=notes)
    assert "not audio" in openai_error(response, 415)["message"]
    assert server.rows("SELECT id FROM jobs") == [] and server.files_gone()
