"""The probe asks ffprobe under rules: every file probed, only allow-listed containers opened."""

from __future__ import annotations

import subprocess

import pytest

from conftest import JFK, make_wav
from whisperd.errors import Kind
from whisperd.probe import ProbeRefused, probe


def test_real_audio_is_probed_with_its_duration(tmp_path):
    wav = make_wav(tmp_path / "tone.wav", seconds=2)
    found = probe("ffprobe", wav)
    assert found.demuxer == "wav" and found.duration == pytest.approx(2.0)
    flac = probe("ffprobe", JFK)
    assert flac.demuxer == "flac" and 10 < flac.duration < 12 and "44100 Hz" in flac.found
    mp4 = tmp_path / "x.m4a"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-y", str(mp4)], check=True)
    found = probe("ffprobe", mp4)
    assert found.format_name.startswith("mov,mp4") and found.demuxer == "mov"


def test_headers_that_look_right_are_still_probed(tmp_path):
    # The old fast path took these first bytes at their word; ffprobe does not.
    for name, data in (("notes.wav", b"this is not audio"), ("empty-riff.wav", b"RIFF\0\0\0\0WAVEfmt " + b"\0" * 40),
                       ("fake.flac", b"fLaC" + b"\0" * 60)):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ProbeRefused):
            probe("ffprobe", path)


def test_a_playlist_is_named_and_refused_without_being_opened(tmp_path):
    playlist = tmp_path / "upload"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:20\n#EXTINF:11,\n{JFK}\n#EXT-X-ENDLIST\n")
    with pytest.raises(ProbeRefused) as refused:
        probe("ffprobe", playlist)
    assert refused.value.kind is Kind.UNSUPPORTED_MEDIA
    assert refused.value.found.startswith("hls, a playlist")


def test_a_missing_ffprobe_is_503(tmp_path):
    with pytest.raises(ProbeRefused) as refused:
        probe("/nonexistent/ffprobe", make_wav(tmp_path / "a.wav"))
    assert refused.value.kind is Kind.UNAVAILABLE
