"""The warm decoder (whisperd/decoder.py) through real HTTP: uploads that are not canonical are
probed and decoded with no ffprobe or ffmpeg start; refusals still go to ffprobe, which names
them; a decoder that hangs is killed and the upload refused in words, and the next one is served."""

from __future__ import annotations

import json
import os
import struct
import wave

import pytest

from whisperd.errors import Kind

from whisperd import intake

from .harness import ffmpeg_made, job_files, wav_bytes
from .test_fast_intake import float_wav, log_tool_starts, tool_starts

gen_test = pytest.mark.gen_test(timeout=60)


@pytest.fixture
def fast_env(fast_env, tmp_path):
    """ffprobe and ffmpeg behind wrappers that log each start, and the warm decoder asked for."""
    log_tool_starts(fast_env, tmp_path)
    fast_env["WHISPER_DECODER"] = "pyav"
    return fast_env


def canonical_of(service, job_id: str) -> tuple[tuple[int, int, int], int]:
    with wave.open(str(service.files.upload_dir(job_id) / "audio.wav")) as canonical:
        return (canonical.getframerate(), canonical.getnchannels(), canonical.getsampwidth()), canonical.getnframes()


@gen_test
async def test_mp3_and_44khz_wav_are_decoded_without_a_process_start(api, service, tmp_path):
    mp3 = ffmpeg_made(tmp_path / "tone.mp3", "-f", "lavfi", "-i", "sine=d=1.5:f=440", "-ar", "44100", "-ac", "2")
    # The name says FLAC; the decoder's probe says MP3: what the file is decides.
    jobs = {await api.submit_ok({"diarize": "false"}, file=mp3, filename="tone.flac"): 1.5,
            await api.submit_ok({"diarize": "false"}, file=wav_bytes(0.2, rate=44100)): 0.2,
            await api.submit_ok({"diarize": "false"}, file=float_wav(0.3)): 0.3}
    assert tool_starts(tmp_path) == []
    for job_id, seconds in jobs.items():
        shape, frames = canonical_of(service, job_id)
        assert shape == (16000, 1, 2)
        assert frames / 16000 == pytest.approx(seconds, abs=0.06)
        assert (await service.ledger.get(job_id)).audio_seconds == pytest.approx(seconds, abs=0.06)
        header = (service.files.upload_dir(job_id) / "audio.wav").read_bytes()[:44]
        assert header[20:36] == struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)  # the plain 44-byte header
        assert (await api.wait_status(job_id))["status"] == "Completed"


@gen_test
async def test_refusals_are_named_by_ffprobe_as_before(api, service, tmp_path):
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:20\n#EXTINF:11,\n/etc/passwd\n#EXT-X-ENDLIST\n"
    response = await api.submit({"diarize": "false"}, file=playlist, filename="x.wav")
    assert response.code == 415
    error = json.loads(response.body)["error"]
    assert "'x.wav' is not audio" in error and "hls, a playlist: it names other files" in error
    assert tool_starts(tmp_path) == ["ffprobe"]  # only a refusal pays a process start
    assert job_files(service) == []


def test_a_declared_duration_over_the_limit_is_413_before_any_decode(tmp_path, fast_env):
    from whisperd.config import load

    config = load({**fast_env, "WHISPER_MAX_AUDIO_SECONDS": "1"})
    upload = tmp_path / "three.wav"
    upload.write_bytes(wav_bytes(3.0, rate=44100))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(intake.IntakeError) as refused:
        intake.Intake(config).accept_sync(upload, out, "three.wav")
    assert refused.value.kind is Kind.TOO_LARGE
    assert "lasts 3 seconds" in refused.value.message  # the declared duration: nothing was decoded
    assert list(out.iterdir()) == [] and tool_starts(tmp_path) == []


def test_a_hanging_decoder_is_killed_and_the_next_file_gets_a_fresh_one(tmp_path):
    from whisperd.decoder import DecoderCrashed, DecoderPool, DecoderTimeout

    pool = DecoderPool(1, 1024 * 2**20)
    fifo = tmp_path / "never.wav"
    os.mkfifo(fifo)  # opening it waits for a writer that never comes: a decoder that hangs
    good = tmp_path / "good.wav"
    good.write_bytes(wav_bytes(0.2, rate=44100))
    try:
        with pool.lease() as decoder:
            hung = decoder.proc
            with pytest.raises(DecoderTimeout):
                decoder.ask({"op": "probe", "path": str(fifo), "formats": intake.FORMATS}, 1.0, None)
        assert hung.poll() is not None  # killed, and reaped
        with pool.lease() as decoder:
            assert decoder.proc is not hung
            answer = decoder.ask({"op": "probe", "path": str(good), "formats": intake.FORMATS}, 20.0, None)
            assert answer["ok"] and answer["demuxer"] == "wav" and answer["duration"] == pytest.approx(0.2, abs=0.01)
            # One that dies under a file (the OOM killer, a segfault) is a crash, not a hang.
            crashed = decoder.proc
            os.kill(crashed.pid, 9)
            with pytest.raises(DecoderCrashed):
                decoder.ask({"op": "probe", "path": str(good), "formats": intake.FORMATS}, 20.0, None)
        with pool.lease() as decoder:
            assert decoder.proc is not crashed
            assert decoder.ask({"op": "probe", "path": str(good), "formats": intake.FORMATS}, 20.0, None)["ok"]
        assert pool.started == 3
    finally:
        pool.close()
