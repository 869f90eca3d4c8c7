"""POST /v1/audio/transcriptions and GET /v1/models in process: OpenAI's shapes and errors."""

from __future__ import annotations

import pytest

from .harness import body_of, job_files, no_job_files

gen_test = pytest.mark.gen_test(timeout=30)
PATH = "/v1/audio/transcriptions"


async def transcribe(api, **fields):
    return await api.submit({"model": "whisper-1", **fields}, path=PATH)


@gen_test
async def test_models_lists_whisper_1_and_the_installed_ones(api):
    body = body_of(await api.call("GET", "/v1/models"))
    assert [m["id"] for m in body["data"]] == ["whisper-1", "small", "tiny.en"]


@pytest.mark.parametrize("fmt,check", [
    ("json", lambda r: set(body_of(r)) == {"text"} and body_of(r)["text"].startswith("Fake transcript")),
    ("text", lambda r: r.body.decode().startswith("Fake transcript") and r.headers["Content-Type"].startswith("text/plain")),
    ("srt", lambda r: "00:00:00,000 --> " in r.body.decode()),
    ("vtt", lambda r: r.body.decode().startswith("WEBVTT")),
    ("verbose_json", lambda r: body_of(r)["task"] == "transcribe" and body_of(r)["language"] == "english"
                               and body_of(r)["segments"][0]["id"] == 0 and body_of(r)["duration"] == 4.0),
])
@gen_test
async def test_every_response_format(api, service, fmt, check):
    response = await transcribe(api, response_format=fmt)
    assert response.code == 200, response.body
    assert check(response)
    assert await no_job_files(service)  # delivered: gone


@pytest.mark.parametrize("fields,param,message", [
    ({"model": ""}, "model", "'model' is required"),
    ({"model": "gpt-4o"}, "model", "is not available on this server"),
    ({"language": "zz"}, "language", "ISO-639-1"),
    ({"temperature": "2"}, "temperature", "from 0 to 1"),
    ({"temperature": "warm"}, "temperature", "from 0 to 1"),
    ({"stream": "true", "response_format": "srt"}, "stream", "use response_format json or text"),
    ({"response_format": "xml"}, "response_format", "must be one of"),
    ({"timestamp_granularities[]": "word"}, "timestamp_granularities[]", "verbose_json"),
    ({"timestamp_granularities[]": "phoneme"}, "timestamp_granularities[]", "segment and/or word"),
    ({"user": "me"}, "user", "unsupported form field 'user'"),
])
@gen_test
async def test_bad_parameters_are_400_in_openais_shape(api, service, fields, param, message):
    response = await transcribe(api, **fields)
    assert response.code == 400
    error = body_of(response)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert message in error["message"]
    assert await no_job_files(service)


@gen_test
async def test_word_timestamps_need_an_alignment_model(api):
    response = await transcribe(api, response_format="verbose_json", language="en",
                                **{"timestamp_granularities[]": ["word", "segment"]})
    assert response.code == 400
    assert body_of(response)["error"]["code"] == "word_timestamps_unavailable"


@gen_test
async def test_a_missing_token_is_401_invalid_api_key(api):
    response = await api.submit({"model": "whisper-1"}, path=PATH, token=None)
    assert response.code == 401
    assert body_of(response)["error"]["code"] == "invalid_api_key"


@gen_test
async def test_a_failed_transcription_is_422_transcription_failed(api):
    response = await transcribe(api, prompt="fake:fail")
    assert response.code == 422
    assert body_of(response)["error"]["code"] == "transcription_failed"


@pytest.mark.settings(SYNC_REQUEST_TIMEOUT_SECONDS="0.3")
@gen_test
async def test_a_transcription_that_outlasts_the_wait_is_504_and_stays_fetchable(api):
    response = await transcribe(api, prompt="fake:slow")
    assert response.code == 504
    assert response.headers["x-should-retry"] == "false"
    job_path = response.headers["Location"]
    assert body_of(response)["error"]["code"] == "timeout"
    job_id = job_path.rsplit("/", 1)[-1]
    await api.wait_status(job_id)
    assert (await api.call("GET", job_path + "/result")).code == 200


@gen_test
async def test_a_transcription_is_an_ordinary_job(api, service):
    response = await transcribe(api, response_format="text")
    assert response.code == 200
    rows = await service.ledger.counts()
    assert rows["Queued"] == rows["Processing"] == 0


# -- diarized_json and known speakers (issue 27) -----------------------------------------------


def data_url(seconds: float) -> str:
    import base64

    from .harness import wav_bytes

    return "data:audio/wav;base64," + base64.b64encode(wav_bytes(seconds)).decode()


@gen_test
async def test_diarized_json_names_a_known_speaker_and_letters_the_rest(api, service, tmp_path):
    response = await transcribe(api, response_format="diarized_json", chunking_strategy="auto",
                                **{"known_speaker_names[]": ["Alice"], "known_speaker_references[]": [data_url(3.0)]})
    assert response.code == 200, response.body
    body = body_of(response)
    assert body["task"] == "transcribe" and body["usage"]["type"] == "duration"
    assert [(s["id"], s["type"], s["speaker"]) for s in body["segments"]] == [
        ("seg_0", "transcript.text.segment", "Alice"), ("seg_1", "transcript.text.segment", "A")]
    assert body["text"].startswith("Fake transcript") and body["segments"][1]["text"] == "Second segment."
    # the fake step saw the reference decoded by intake into the job's directory
    import json
    (step,) = [json.loads(line) for line in (tmp_path / "engine-runs.jsonl.diarize").read_text().splitlines()]
    (reference,) = step["request"]["references"]
    assert reference["name"] == "Alice" and reference["audio"].endswith("reference-0/audio.wav")
    assert await no_job_files(service)  # the reference went with the job's files


@pytest.mark.parametrize("fields,param,message", [
    ({"known_speaker_names[]": ["A"], "known_speaker_references[]": [data_url(3.0)]}, "known_speaker_names[]",
     "need response_format=diarized_json"),
    ({"response_format": "diarized_json", "known_speaker_names[]": ["A", "B"],
      "known_speaker_references[]": [data_url(3.0)]}, "known_speaker_references[]", "2 names, 1 references"),
    ({"response_format": "diarized_json", "known_speaker_names[]": list("ABCDE"),
      "known_speaker_references[]": [data_url(3.0)] * 5}, "known_speaker_names[]", "at most 4"),
    ({"response_format": "diarized_json", "known_speaker_names[]": ["A"],
      "known_speaker_references[]": ["https://example.com/a.wav"]}, "known_speaker_references[]", "data URLs"),
    ({"response_format": "diarized_json", "known_speaker_names[]": ["A"],
      "known_speaker_references[]": [data_url(1.0)]}, "known_speaker_references[]", "2 to 10 s"),
    ({"response_format": "diarized_json", "known_speaker_names[]": ["A"],
      "known_speaker_references[]": [data_url(11.0)]}, "known_speaker_references[]", "lasts more than 10 s"),
    ({"response_format": "diarized_json", "known_speaker_names[]": ["A"],
      "known_speaker_references[]": ["data:audio/wav;base64," + "QUJD" * 10]}, "known_speaker_references[]",
     "is not audio"),
])
@gen_test
async def test_bad_known_speakers_are_400_and_leave_nothing(api, service, tmp_path, fields, param, message):
    response = await transcribe(api, **fields)
    assert response.code == 400, response.body
    error = body_of(response)["error"]
    assert error["param"] == param and message in error["message"], error
    assert await no_job_files(service)
    assert not (tmp_path / "engine-runs.jsonl").exists()

