"""Uploads that already are what the engine reads (16 kHz mono 16-bit PCM WAV) are copied, not decoded.

Each start of Debian's ffprobe or ffmpeg costs about 110 ms (215 shared libraries load), which
was nine tenths of the service's work per job on short clips (bench/results/quick.txt). A
RIFF/WAVE file of PCM samples is simple enough for Python's `wave` to read: it names no other
file and cannot make the server wait. Its samples are copied under a header the server writes,
so the engine still reads a file the server made, and the copy costs no more than the upload's
own bytes (PCM does not compress, so there is no bomb to decode). Anything else (another rate,
WAVE_FORMAT_EXTENSIBLE, a header `wave` refuses) goes through ffprobe and ffmpeg as before.

The warm engine reads such a file without ffmpeg too (engine_worker.read_canonical).
"""

from __future__ import annotations

import struct
import wave
from pathlib import Path

SAMPLE_RATE = 16000
CHUNK_FRAMES = 1 << 16


def _is_canonical(reader: wave.Wave_read) -> bool:
    return (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (1, 2, SAMPLE_RATE)


def copy_if_canonical(source: Path, out: Path, max_frames: int | None) -> int | None:
    """Frames copied from `source` into a fresh WAV at `out` (at most max_frames + 1, so that
    "longer than allowed" shows), or None when `source` is not a 16 kHz mono 16-bit PCM WAV
    (nothing is written then)."""
    try:
        reader = wave.open(str(source), "rb")
    except (wave.Error, EOFError, struct.error, ValueError):
        return None
    with reader:
        if not _is_canonical(reader):
            return None
        limit = None if max_frames is None else max_frames + 1
        copied = 0
        with wave.open(str(out), "wb") as writer:
            writer.setnchannels(1)
            writer.setsampwidth(2)
            writer.setframerate(SAMPLE_RATE)
            while limit is None or copied < limit:
                want = CHUNK_FRAMES if limit is None else min(CHUNK_FRAMES, limit - copied)
                data = reader.readframes(want)
                if not data:
                    break
                data = data[:len(data) - len(data) % 2]  # a truncated last sample is dropped
                writer.writeframesraw(data)
                copied += len(data) // 2
    return copied

