"""Live sessions on the real warm engine (WhisperX's faster-whisper, tiny.en, Silero VAD from its
wheel) with the official openai client and its realtime extra: speech streamed at real-time pace.

Needs scripts/setup-engine.sh. Kept to a few short sessions: the machine's two cores are shared.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import time

import openai
import pytest

from conftest import JFK, JFK_TEXT, REPO, TOKEN, wait_until, words

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def real_live_server(tmp_path_factory):
    from conftest import Server

    assert JFK.is_file(), f"fixture missing: {JFK}"
    assert (REPO / "models" / "tiny.en" / "model.bin").is_file(), "models/tiny.en missing: run scripts/setup-engine.sh"
    root = tmp_path_factory.mktemp("live")
    server = Server(root, {
        "WHISPER_CMD": str(REPO / "whisperx.sh"), "WHISPER_MODELS_DIR": str(REPO / "models"),
        "WHISPER_ENGINE": "worker", "WHISPER_OPENAI_MODEL": "tiny.en", "WHISPER_PRELOAD_MODEL": "true",
        "RUST_LOG": "info",
    }).start()
    # The warm engine imports WhisperX and loads tiny.en in the background: start streaming once
    # it is ready, as a caption client would find a running server.
    wait_until(lambda: server.api("GET", "/status").json()["engine"]["loaded_models"], timeout=120,
               what="the warm engine to load tiny.en")
    yield server
    server.stop()


def pcm24k(path) -> bytes:
    return subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(path), "-ar", "24000", "-ac", "1",
                           "-f", "s16le", "-"], check=True, capture_output=True).stdout


async def stream_realtime(conn, pcm: bytes, chunk_seconds: float = 0.1) -> float:
    step = int(24000 * chunk_seconds) * 2
    started = time.monotonic()
    for index, offset in enumerate(range(0, len(pcm), step)):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[offset:offset + step]).decode())
        await asyncio.sleep(max(0.0, started + (index + 1) * chunk_seconds - time.monotonic()))
    return time.monotonic()


def test_official_client_streams_speech_and_gets_deltas_then_the_words(real_live_server):
    speech = pcm24k(JFK) + b"\0\0" * 24000 * 2  # 11 s of speech, 2 s of silence

    async def scenario():
        client = openai.AsyncOpenAI(api_key=TOKEN, base_url=real_live_server.url("/v1"), max_retries=0)
        events = []
        async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
            await conn.session.update(session={
                "type": "transcription",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                    "transcription": {"model": "whisper-1", "language": "en"},
                                    "turn_detection": {"type": "server_vad", "threshold": 0.5,
                                                       "prefix_padding_ms": 300, "silence_duration_ms": 1200}}}})
            sender = asyncio.ensure_future(stream_realtime(conn, speech))
            turn_open = False  # the last turn's completed may come before the last silence is sent:
            async for event in conn:  # the session's lag events keep coming, so judge on each event
                events.append((time.monotonic(), event))
                if event.type == "error":
                    raise AssertionError(event)
                if event.type == "input_audio_buffer.speech_started":
                    turn_open = True
                elif event.type == "conversation.item.input_audio_transcription.completed":
                    turn_open = False
                if sender.done() and not turn_open and any(
                        e.type == "conversation.item.input_audio_transcription.completed" for _, e in events):
                    break
            sent_at = await sender
        return events, sent_at

    events, sent_at = asyncio.run(scenario())
    kinds = [event.type for _, event in events]
    assert kinds[0] == "session.created" and "session.updated" in kinds
    deltas = [(at, e) for at, e in events if e.type == "conversation.item.input_audio_transcription.delta"]
    completed = [e for _, e in events if e.type == "conversation.item.input_audio_transcription.completed"]
    assert deltas and deltas[0][0] < sent_at - 3.0  # captions while the speech is still being sent
    text = " ".join(e.transcript for e in completed)
    expected = words(JFK_TEXT)
    got = words(text)
    assert sum(1 for w in expected if w in got) >= len(expected) - 2, text
    first = completed[0]
    assert first.usage.type == "duration" and first.usage.seconds > 1
    sent = "".join(e.delta for _, e in deltas if e.item_id == first.item_id)
    assert first.transcript.startswith(sent)


def test_two_sessions_beside_a_batch_job_get_their_words_before_the_job_ends(real_live_server, tmp_path):
    speech = pcm24k(JFK) + b"\0\0" * 24000 * 2
    # jfk.flac 24 times (264 s of audio): with the Silero VAD the warm engine turns 44 s of audio
    # into text before two live sessions have streamed their 13 s, which would prove nothing.
    long_batch = tmp_path / "long.wav"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-stream_loop", "23", "-i", str(JFK), "-ar", "16000", "-ac", "1",
                    str(long_batch)], check=True)
    job_id = real_live_server.submit(long_batch, language="en").json()["job_id"]
    wait_until(lambda: real_live_server.status(job_id).json()["status"] == "Processing", timeout=60,
               what="the batch job to run")

    async def one():
        client = openai.AsyncOpenAI(api_key=TOKEN, base_url=real_live_server.url("/v1"), max_retries=0)
        texts = []
        async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
            await conn.session.update(session={"type": "transcription", "audio": {"input": {
                "transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 1200}}}})
            sender = asyncio.ensure_future(stream_realtime(conn, speech))
            turn_open = False  # as above: the last completed may come before the last silence is sent
            async for event in conn:
                assert event.type != "error", event
                if event.type == "input_audio_buffer.speech_started":
                    turn_open = True
                elif event.type == "conversation.item.input_audio_transcription.completed":
                    texts.append(event.transcript)
                    turn_open = False
                if sender.done() and not turn_open and texts:
                    break
            await sender
        return " ".join(texts)

    async def both():
        return await asyncio.gather(one(), one())

    for text in asyncio.run(both()):
        got = words(text)
        assert sum(1 for w in words(JFK_TEXT) if w in got) >= len(words(JFK_TEXT)) - 3, text
    assert real_live_server.status(job_id).json()["status"] == "Processing"  # live did not wait for it


def test_stream_true_keywords_and_languages_on_the_real_engine(real_live_server):
    client = openai.OpenAI(api_key=TOKEN, base_url=real_live_server.url("/v1"), max_retries=0, timeout=300)
    with JFK.open("rb") as audio:  # base is multilingual: detection among de and en finds English
        events = list(client.audio.transcriptions.create(model="base", file=audio, stream=True,
                                                         languages=["de", "en"], keywords=["Americans"]))
    assert events[-1].type == "transcript.text.done" and len(events) >= 2
    assert "".join(e.delta for e in events[:-1]) == events[-1].text
    got = words(events[-1].text)
    assert sum(1 for w in words(JFK_TEXT) if w in got) >= len(words(JFK_TEXT)) - 3, events[-1].text
    assert 10.0 < events[-1].usage.seconds < 11.5
    newest = real_live_server.api("GET", "/transcription?limit=1").json()["jobs"][0]
    assert newest["language"] == "en" and newest["model"] == "base"  # chosen among de and en
