"""Uploads that already are what the engine reads (16 kHz mono 16-bit PCM WAV) are copied, not decoded.

Each start of Debian's ffprobe or ffmpeg costs about 110 ms (215 shared libraries load), which
was nine tenths of the service's work per job on short clips (bench/results/quick.txt). A
RIFF/WAVE file of PCM samples is simple enough to read here: it names no other file. Its samples
are copied under a header the server writes, so the engine still reads a file the server made,
and the copy costs no more than the upload's own bytes (PCM does not compress, so there is no
bomb to decode). Anything else (another rate, WAVE_FORMAT_EXTENSIBLE, a broken header) goes
through ffprobe and ffmpeg as before.

The parser is bounded, because it runs inside the server: at most MAX_CHUNKS_BEFORE_DATA chunks
before the samples (a real WAV has a handful; 8 million empty ones cost Python's `wave` ~12 s of
CPU), chunk bodies are skipped by seeking, never read, and the copy checks between blocks whether
the client left (`stopped`) and whether it ran past its time limit (`deadline`), as the ffmpeg
decode is stopped and timed.

The warm engine reads such a file without ffmpeg too (engine_worker.read_canonical).
"""

from __future__ import annotations

import os
import struct
import time
import wave
from pathlib import Path
from typing import BinaryIO, Callable

SAMPLE_RATE = 16000
CHUNK_FRAMES = 1 << 16
MAX_CHUNKS_BEFORE_DATA = 64
WAVE_FORMAT_PCM = 1


class TooManyChunks(Exception):
    """A RIFF/WAVE file with more than MAX_CHUNKS_BEFORE_DATA chunks before its samples."""


class FastPathStopped(Exception):
    """stopped() said so (the client left): nothing is left at `out`."""


class FastPathTimeout(Exception):
    """The copy ran past its deadline: nothing is left at `out`."""


def _pcm_data(handle: BinaryIO, size: int) -> tuple[int, int] | None:
    """(offset, length) of the samples of a 16 kHz mono 16-bit PCM RIFF/WAVE file, or None."""
    head = handle.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    position, chunks, fmt = 12, 0, None
    while True:
        if position + 8 > size:
            return None  # no data chunk
        handle.seek(position)
        chunk_id, length = struct.unpack("<4sI", handle.read(8))
        if chunk_id == b"data":
            break
        if chunk_id == b"fmt ":
            if length < 16:
                return None
            fmt = struct.unpack("<HHIIHH", handle.read(16))
        chunks += 1
        if chunks > MAX_CHUNKS_BEFORE_DATA:
            raise TooManyChunks(chunks)
        position += 8 + length + (length & 1)  # chunks are word-aligned; the body is skipped, not read
    if fmt is None:
        return None  # samples before their format: `wave` refused these too
    tag, channels, rate, _byte_rate, _align, bits = fmt
    if (tag, channels, rate, bits) != (WAVE_FORMAT_PCM, 1, SAMPLE_RATE, 16):
        return None
    start = position + 8
    return start, max(0, min(length, size - start))


def copy_if_canonical(source: Path, out: Path, max_frames: int | None,
                      stopped: Callable[[], bool] | None = None, deadline: float | None = None) -> int | None:
    """Frames copied from `source` into a fresh WAV at `out` (at most max_frames + 1, so that
    "longer than allowed" shows), or None when `source` is not a 16 kHz mono 16-bit PCM WAV
    (nothing is written then). TooManyChunks for a file that is not worth walking further;
    FastPathStopped / FastPathTimeout (time.monotonic() past `deadline`) while copying."""
    with open(source, "rb") as handle:
        try:
            found = _pcm_data(handle, os.fstat(handle.fileno()).st_size)
        except struct.error:
            return None
        if found is None:
            return None
        start, length = found
        frames = length // 2  # a truncated last sample is dropped
        if max_frames is not None:
            frames = min(frames, max_frames + 1)
        handle.seek(start)
        copied = 0
        try:
            with wave.open(str(out), "wb") as writer:
                writer.setnchannels(1)
                writer.setsampwidth(2)
                writer.setframerate(SAMPLE_RATE)
                while copied < frames:
                    if stopped is not None and stopped():
                        raise FastPathStopped()
                    if deadline is not None and time.monotonic() > deadline:
                        raise FastPathTimeout()
                    data = handle.read(2 * min(CHUNK_FRAMES, frames - copied))
                    if not data:
                        break
                    data = data[:len(data) - len(data) % 2]
                    writer.writeframesraw(data)
                    copied += len(data) // 2
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    return copied
