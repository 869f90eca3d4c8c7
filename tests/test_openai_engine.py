"""The official openai client against whisperd running the real WhisperX on real speech (jfk.flac).

Needs scripts/setup-engine.sh (engine venv and models/tiny.en); each transcription takes ~10 s on
two CPU cores. Like test_engine_real.py, these fail rather than skip when the engine is missing.
"""

from __future__ import annotations

import openai
import pytest

from conftest import JFK, JFK_TEXT, REPO, TOKEN, words

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    from conftest import Server

    assert JFK.is_file(), f"fixture missing: {JFK}"
    assert (REPO / "models" / "tiny.en" / "model.bin").is_file(), "models/tiny.en missing: run scripts/setup-engine.sh"
    root = tmp_path_factory.mktemp("real")
    server = Server(root, {
        "WHISPER_CMD": str(REPO / "whisperx.sh"),
        "WHISPER_MODELS_DIR": str(REPO / "models"),
        "WHISPER_OPENAI_MODEL": "tiny.en",
        "MAX_FILE_SIZE": "2000000",
        "RUST_LOG": "info",
    }).start()
    yield server
    server.stop()


def client(server, token=TOKEN):
    return openai.OpenAI(api_key=token, base_url=server.url("/v1"), max_retries=0, timeout=300)


def create(server, **kwargs):
    with JFK.open("rb") as audio:
        return client(server).audio.transcriptions.create(model="whisper-1", file=audio, language="en", **kwargs)


def test_every_response_format_on_real_speech(real_server):
    assert words(create(real_server).text) == words(JFK_TEXT)
    assert words(create(real_server, response_format="text")) == words(JFK_TEXT)
    srt = create(real_server, response_format="srt")
    assert srt.startswith("1\n00:00:00,") and words(JFK_TEXT)[-1] in words(srt)
    vtt = create(real_server, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00.") and words(JFK_TEXT)[0] in words(vtt)
    verbose = create(real_server, response_format="verbose_json", timestamp_granularities=["segment"])
    assert verbose.language == "english" and words(verbose.text) == words(JFK_TEXT)
    assert 10.0 < verbose.duration < 11.5
    assert verbose.segments[0].start < 1.0 and verbose.segments[0].avg_logprob < 0
    assert real_server.files_gone()
    assert real_server.rows("SELECT count(*) AS n FROM jobs WHERE delivered_at IS NOT NULL")[0]["n"] == 5


def test_word_timestamps_are_refused_without_an_alignment_model(real_server):
    with pytest.raises(openai.BadRequestError) as caught:
        create(real_server, response_format="verbose_json", timestamp_granularities=["word"])
    assert caught.value.body["code"] == "word_timestamps_unavailable"


def test_wrong_token_and_oversized_file_through_the_client(real_server, tmp_path):
    with pytest.raises(openai.AuthenticationError):
        with JFK.open("rb") as audio:
            client(real_server, token="wrong token").audio.transcriptions.create(model="whisper-1", file=audio)
    big = tmp_path / "big.flac"
    big.write_bytes(JFK.read_bytes() * 3)  # 3.5 MB: over MAX_FILE_SIZE (2 MB) and its form allowance
    with pytest.raises(openai.APIStatusError) as caught:
        with big.open("rb") as audio:
            client(real_server).audio.transcriptions.create(model="whisper-1", file=audio)
    assert caught.value.status_code == 413


@pytest.fixture(scope="module")
def warm_server(tmp_path_factory):
    from conftest import Server

    root = tmp_path_factory.mktemp("warm")
    server = Server(root, {
        "WHISPER_ENGINE": "worker",
        "WHISPER_CMD": str(REPO / "whisperx.sh"),
        "WHISPER_MODELS_DIR": str(REPO / "models"),
        "WHISPER_OPENAI_MODEL": "tiny.en",
        "WHISPER_WORKER_START_SECONDS": "600",
        "SYNC_REQUEST_TIMEOUT_SECONDS": "600",
        "RUST_LOG": "info",
    }).start()
    yield server
    server.stop()


def test_word_timestamps_from_the_warm_engine_on_real_speech(warm_server):
    """No alignment model here: the warm engine's faster-whisper word times answer instead of a 400."""
    verbose = create(warm_server, response_format="verbose_json", timestamp_granularities=["word", "segment"],
                     temperature=0)
    assert words(verbose.text) == words(JFK_TEXT)
    timed = [(words(w.word), w.start, w.end) for w in verbose.words]
    assert [w for ws, _, _ in timed for w in ws] == words(JFK_TEXT)
    starts = [start for _, start, _ in timed]
    assert starts == sorted(starts) and all(start <= end for _, start, end in timed)
    assert 0.0 <= starts[0] < 1.5 and 9.0 < timed[-1][2] < 11.5  # jfk.flac speaks from ~0.3 s to ~10.5 s
    (run,) = warm_server.rows("SELECT temperature FROM jobs")
    assert run["temperature"] == 0.0


def test_stream_true_sends_each_chunks_text_while_the_warm_engine_decodes_the_rest(warm_server, tmp_path):
    """A ~45 s espeak talk is two chunks for WhisperX (at most 30 s each): the first chunk's text
    must arrive while the second is still being decoded, well before the done event."""
    import subprocess
    import time

    from speech import conversation, varied_sentences

    sentences = varied_sentences(8, seed=26)
    talk = tmp_path / "talk.wav"
    truth = conversation(talk, [("en-us", 50)], turns=len(sentences), gap=0.7, sentences=sentences)
    assert truth[-1][1] > 40  # two chunks
    flac = tmp_path / "talk.flac"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(talk), "-ar", "16000", "-ac", "1", str(flac)],
                   check=True, timeout=60)
    arrivals = []
    with flac.open("rb") as audio:
        for event in client(warm_server).audio.transcriptions.create(model="whisper-1", file=audio, language="en",
                                                                      stream=True):
            arrivals.append((time.monotonic(), event))
    done_at, done = arrivals[-1]
    deltas = [(at, event) for at, event in arrivals[:-1]]
    assert done.type == "transcript.text.done" and {e.type for _, e in deltas} == {"transcript.text.delta"}
    assert len(deltas) >= 2
    assert done_at - deltas[0][0] > 0.3, "the first chunk's text came only with the end of the job"
    assert "".join(e.delta for _, e in deltas) == done.text
    said = [w for text in sentences for w in words(text)]
    heard = set(words(done.text))
    assert sum(w in heard for w in said) / len(said) > 0.8
    assert done.usage.seconds == pytest.approx(truth[-1][1], abs=0.5)
