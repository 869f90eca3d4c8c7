"""Intake's fast path: an upload that already is 16 kHz mono 16-bit PCM WAV is copied by the
server (whisperd/canonical_wav.py) without starting ffprobe or ffmpeg; everything else is still
probed and decoded by them. ffprobe and ffmpeg are wrapped here so that each start is counted."""

from __future__ import annotations

import struct

import pytest

from .harness import FFMPEG, FFPROBE, WAV, WAV_SECONDS, body_of, job_files, wav_bytes
from .test_fast_uploads import staged

gen_test = pytest.mark.gen_test(timeout=30)


def log_tool_starts(fast_env, tmp_path):
    """ffprobe and ffmpeg behind wrappers that log each start (tool_starts reads the log)."""
    log = tmp_path / "tool-starts.log"
    for name, real in (("ffprobe", FFPROBE), ("ffmpeg", FFMPEG)):
        wrapper = tmp_path / f"logged-{name}"
        wrapper.write_text(f'#!/bin/sh\necho {name} >> "{log}"\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
        fast_env[f"WHISPER_{name.upper()}"] = str(wrapper)
    return fast_env


@pytest.fixture
def fast_env(fast_env, tmp_path):
    """The harness's configuration with ffprobe and ffmpeg behind wrappers that log each start."""
    return log_tool_starts(fast_env, tmp_path)


def tool_starts(tmp_path) -> list[str]:
    log = tmp_path / "tool-starts.log"
    return log.read_text().split() if log.exists() else []


def float_wav(seconds: float = 0.1, rate: int = 16000) -> bytes:
    """A 32-bit float WAV (format tag 3): audio that ffmpeg reads and Python's wave does not."""
    frames = int(seconds * rate)
    data = struct.pack(f"<{frames}f", *([0.25] * frames))
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 3, 1, rate, rate * 4, 4, 32) + b"data" + struct.pack("<I", len(data)) + data)


@gen_test
async def test_a_16khz_mono_wav_is_copied_as_it_is_without_starting_ffprobe_or_ffmpeg(api, service, tmp_path):
    job_id = await api.submit_ok({"diarize": "false"})
    canonical = service.files.upload_dir(job_id) / "audio.wav"
    # Python's wave wrote both, so the server's copy is the upload byte for byte.
    assert canonical.read_bytes() == WAV
    assert tool_starts(tmp_path) == []
    assert (await service.ledger.get(job_id)).audio_seconds == pytest.approx(WAV_SECONDS)
    assert (await api.wait_status(job_id))["status"] == "Completed"


@gen_test
async def test_other_rates_and_formats_are_still_probed_and_decoded(api, service, tmp_path):
    job_44k = await api.submit_ok({"diarize": "false"}, file=wav_bytes(0.2, rate=44100))
    assert tool_starts(tmp_path) == ["ffprobe", "ffmpeg"]
    job_float = await api.submit_ok({"diarize": "false"}, file=float_wav(0.3))
    assert tool_starts(tmp_path) == ["ffprobe", "ffmpeg"] * 2
    for job_id, seconds in ((job_44k, 0.2), (job_float, 0.3)):
        assert (await service.ledger.get(job_id)).audio_seconds == pytest.approx(seconds, abs=0.01)
        canonical = service.files.upload_dir(job_id) / "audio.wav"
        assert canonical.read_bytes()[20:36] == struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)


@gen_test
async def test_a_header_that_promises_more_samples_than_the_file_holds_gives_what_is_there(api, service, tmp_path):
    lying = WAV[:40] + struct.pack("<I", 100 * len(WAV)) + WAV[44:]
    job_id = await api.submit_ok({"diarize": "false"}, file=lying)
    assert (await service.ledger.get(job_id)).audio_seconds == pytest.approx(WAV_SECONDS)
    assert tool_starts(tmp_path) == []


@gen_test
async def test_a_wav_without_samples_is_415_and_leaves_nothing(api, service, tmp_path):
    response = await api.submit({"diarize": "false"}, file=wav_bytes(0))
    assert response.code == 415
    assert "holds no audio samples (already 16 kHz mono 16-bit PCM WAV)" in body_of(response)["error"]
    assert staged(service) == [] and job_files(service) == []
    assert sum((await service.ledger.status_counts()).values()) == 0


@pytest.mark.settings(WHISPER_MAX_AUDIO_SECONDS="0.05")
@gen_test
async def test_a_wav_longer_than_the_limit_is_413_without_a_decode(api, service, tmp_path):
    response = await api.submit({"diarize": "false"})
    assert response.code == 413
    assert "WHISPER_MAX_AUDIO_SECONDS=0.05" in body_of(response)["error"]
    assert tool_starts(tmp_path) == []
    assert staged(service) == [] and job_files(service) == []
    assert sum((await service.ledger.status_counts()).values()) == 0
