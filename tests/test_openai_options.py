"""The OpenAI route's decoding options reach the engine: temperature (CLI flag, worker option, kept on
the job) and word timestamps, served by the warm engine without an alignment model (fake engine)."""

from __future__ import annotations

import pytest

from test_openai import client, openai_error, post


def row(server, job_id: str):
    return server.rows("SELECT temperature FROM jobs WHERE id=?", (job_id,))[0]


def only_job(server) -> str:
    (job,) = server.rows("SELECT id FROM jobs")
    return job["id"]


def test_temperature_goes_to_the_cli_and_is_kept_on_the_job(server):
    assert post(server, {"model": "whisper-1", "temperature": "0.3"}).status_code == 200
    (run,) = server.engine_runs()
    argv = run["argv"]
    assert argv[argv.index("--temperature") + 1] == "0.3"
    assert row(server, only_job(server))["temperature"] == pytest.approx(0.3)


def test_no_temperature_leaves_the_engines_schedule(server):
    assert post(server, {"model": "whisper-1"}).status_code == 200
    (run,) = server.engine_runs()
    assert "--temperature" not in run["argv"]
    assert row(server, only_job(server))["temperature"] is None


def test_temperature_zero_is_sent_as_asked(server):
    assert post(server, {"model": "whisper-1", "temperature": "0"}).status_code == 200
    argv = server.engine_runs()[0]["argv"]
    assert argv[argv.index("--temperature") + 1] == "0"


def test_temperature_goes_to_the_warm_worker(make_server):
    server = make_server(WHISPER_ENGINE="worker")
    assert post(server, {"model": "whisper-1", "temperature": "0.7"}).status_code == 200
    (run,) = [r for r in server.engine_runs() if r.get("worker_job")]
    assert run["worker_job"]["temperature"] == pytest.approx(0.7)


def test_the_warm_engine_serves_word_timestamps_without_an_alignment_model(make_server):
    server = make_server(WHISPER_ENGINE="worker")
    with server.default_audio.open("rb") as audio:
        verbose = client(server).audio.transcriptions.create(
            model="whisper-1", file=audio, language="en", response_format="verbose_json",
            timestamp_granularities=["word", "segment"])
    words = [(w.word, w.start, w.end) for w in verbose.words]
    assert words[:3] == [("Fake", 0.0, 0.5), ("transcript", 0.5, 1.0), ("of", 1.0, 1.5)]
    assert len(verbose.segments) == 2


def test_word_timestamps_stay_a_400_where_truly_unavailable(make_server):
    server = make_server(WHISPER_ENGINE="worker", WHISPER_WORD_TIMES="false")  # no alignment, no decoder times
    response = post(server, {"model": "whisper-1", "response_format": "verbose_json", "language": "en",
                             "timestamp_granularities[]": "word"})
    openai_error(response, 400, param="timestamp_granularities[]", code="word_timestamps_unavailable")
    assert server.job_files() == []
