"""The upload probe's fast path reads WAV and FLAC headers itself and agrees with ffprobe."""

from __future__ import annotations

import subprocess

from conftest import JFK, make_wav
from whisperd.probe import _probe_sync, sniff


def test_wav_and_flac_headers_are_read_without_ffprobe(tmp_path):
    wav = make_wav(tmp_path / "tone.wav")
    assert sniff(wav).ok and "16000 Hz" in sniff(wav).found
    assert sniff(JFK).ok and sniff(JFK).found == "flac (audio: flac, 44100 Hz)"
    for path in (wav, JFK):
        assert _probe_sync("ffprobe", path).ok  # ffprobe agrees


def test_anything_else_is_left_to_ffprobe(tmp_path):
    for name, data in (("notes.wav", b"this is not audio"), ("empty-riff.wav", b"RIFF\0\0\0\0WAVEfmt " + b"\0" * 40),
                       ("fake.flac", b"fLaC" + b"\0" * 60)):
        path = tmp_path / name
        path.write_bytes(data)
        assert sniff(path) is None, name
        assert not _probe_sync("ffprobe", path).ok, name
    mp3 = tmp_path / "x.mp3"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(make_wav(tmp_path / "t.wav")),
                    "-y", str(mp3)], check=True)
    assert sniff(mp3) is None and _probe_sync("ffprobe", mp3).ok
