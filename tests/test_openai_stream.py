"""stream=true on /v1/audio/transcriptions and /translations (OpenAI's transcript.text.* events, iterated
by the official client), and OpenAI's keywords and languages fields (fake engines)."""

from __future__ import annotations

import json

import openai
import pytest

from conftest import TOKEN
from test_languages import add_model


def client(server):
    return openai.OpenAI(api_key=TOKEN, base_url=server.url("/v1"), max_retries=0, timeout=60)


def test_stream_true_gives_deltas_then_done_with_the_same_text(server):
    with server.default_audio.open("rb") as audio:
        plain = client(server).audio.transcriptions.create(model="whisper-1", file=audio).text
    with server.default_audio.open("rb") as audio:
        events = list(client(server).audio.transcriptions.create(model="whisper-1", file=audio, stream=True))
    kinds = [event.type for event in events]
    assert kinds[-1] == "transcript.text.done" and kinds[:-1] and set(kinds[:-1]) == {"transcript.text.delta"}
    assert "".join(event.delta for event in events[:-1]) == events[-1].text == plain
    assert events[-1].usage.type == "duration" and events[-1].usage.seconds == pytest.approx(1.0, abs=0.05)
    assert server.files_gone()  # delivered like any answer


def test_stream_true_sends_each_segment_as_the_warm_engine_decodes_it(make_server, tmp_path):
    # The fake worker emits its first segment, then waits for the gate before the second and the
    # end: a delta that arrives while the gate is shut was sent while the job was still running.
    gate = tmp_path / "gate"
    server = make_server(WHISPER_ENGINE="worker", FAKE_WHISPERX_SEGMENT_GATE=str(gate))
    size = server.default_audio.stat().st_size
    events = []
    fast = openai.OpenAI(api_key=TOKEN, base_url=server.url("/v1"), max_retries=0, timeout=20)
    with server.default_audio.open("rb") as audio:
        for event in fast.audio.transcriptions.create(model="whisper-1", file=audio, stream=True):
            if not events:
                assert event.type == "transcript.text.delta" and event.delta == f"Fake transcript of {size} bytes."
                assert not gate.exists()
                running = server.api("GET", "/transcription").json()["jobs"][0]
                assert running["status"] == "Processing"  # the job has not ended
                gate.touch()
            events.append(event)
    assert [e.type for e in events] == ["transcript.text.delta"] * 2 + ["transcript.text.done"]
    assert events[1].delta == " Second segment."
    assert "".join(e.delta for e in events[:-1]) == events[-1].text == f"Fake transcript of {size} bytes. Second segment."
    job = [run["worker_job"] for run in server.engine_runs() if run.get("worker_job")][-1]
    assert job["batch_size"] == 1  # one chunk a batch: each chunk's text as soon as it is decoded
    assert server.files_gone()


def test_stream_true_on_translations_and_refusals(make_server):
    server = make_server(start=False, WHISPER_ENGINE="worker", WHISPER_OPENAI_TRANSLATE_MODEL="base")
    add_model(server, "base", vocabulary=51865)
    server.start()
    size = server.default_audio.stat().st_size
    response = server.api("POST", "/v1/audio/translations", files={"file": ("a.wav", server.default_audio.read_bytes())},
                          data={"model": "whisper-1", "stream": "true"})
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
    # (the official client has no stream=True for translations: this is the raw stream)
    done = json.loads(lines[-1][len("data: "):])
    assert done["type"] == "transcript.text.done" and done["text"] == f"Fake translation of {size} bytes. Second segment."
    assert "".join(json.loads(line[len("data: "):])["delta"] for line in lines[:-1]) == done["text"]
    for fields, param in (({"stream": "maybe"}, "stream"), ({"stream": "true", "response_format": "srt"}, "stream")):
        refused = server.api("POST", "/v1/audio/transcriptions",
                             files={"file": ("a.wav", server.default_audio.read_bytes())},
                             data={"model": "whisper-1", **fields})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param


def test_keywords_go_before_the_prompt_as_faster_whisper_puts_hotwords(server):
    with server.default_audio.open("rb") as audio:
        client(server).audio.transcriptions.create(model="whisper-1", file=audio, prompt="A talk.",
                                                   keywords=["Ada Lovelace", "Babbage"])
    argv = server.engine_runs()[-1]["argv"]
    assert argv[argv.index("--initial_prompt") + 1] == "Ada Lovelace, Babbage A talk."
    too_long = server.api("POST", "/v1/audio/transcriptions", files={"file": ("a.wav", server.default_audio.read_bytes())},
                          data={"model": "whisper-1", "keywords[]": "x" * 5000})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "keywords"


def test_languages_detects_among_these_only_on_the_warm_engine(make_server):
    server = make_server(start=False, WHISPER_ENGINE="worker", FAKE_WHISPERX_DETECT="de")
    add_model(server, "base", vocabulary=51865)
    server.start()
    with server.default_audio.open("rb") as audio:
        client(server).audio.transcriptions.create(model="base", file=audio, languages=["fr", "de"])
    detect = [run for run in server.engine_runs() if run.get("live_op") == "live_detect"]
    assert detect and detect[-1]["languages"] == ["de", "fr"]
    job = [run["worker_job"] for run in server.engine_runs() if run.get("worker_job")][-1]
    assert job["language"] == "de"  # the job runs with the language chosen among those given
    with server.default_audio.open("rb") as audio:  # one language: nothing to detect
        client(server).audio.transcriptions.create(model="base", file=audio, languages=["es"])
    assert [run["worker_job"] for run in server.engine_runs() if run.get("worker_job")][-1]["language"] == "es"
    assert len([run for run in server.engine_runs() if run.get("live_op") == "live_detect"]) == 1
    for data, param in (({"languages[]": "xx"}, "languages"), ({"languages[]": "fr", "language": "de"}, "languages")):
        refused = server.api("POST", "/v1/audio/transcriptions",
                             files={"file": ("a.wav", server.default_audio.read_bytes())},
                             data={"model": "base", **data})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param


def test_languages_needs_the_warm_engine(server):
    refused = server.api("POST", "/v1/audio/transcriptions", files={"file": ("a.wav", server.default_audio.read_bytes())},
                         data={"model": "whisper-1", "languages[]": ["fr", "en"]})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "languages_need_worker_engine"
