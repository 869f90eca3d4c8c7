"""Is an upload audio (or video with sound)? Asked of ffprobe before a job is queued.

WhisperX would find out too, but only after the job waited its turn in the queue; a client
that sent a PDF learns it now, with a 415 that says what the file looked like.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("whisperd.probe")
PROBE_TIMEOUT_SECONDS = 30.0  # a hostile file must not hold a thread for long
MAX_OUTPUT = 1024 * 1024


@dataclass
class ProbeResult:
    ok: bool
    found: str  # what ffprobe saw, for the client: "wav (audio: pcm_s16le)", "nothing it can read as audio or video"


def available(ffprobe: str) -> bool:
    return shutil.which(ffprobe) is not None


def _probe_sync(ffprobe: str, path: Path) -> ProbeResult:
    argv = [ffprobe, "-v", "error", "-show_entries", "format=format_name:stream=codec_type,codec_name",
            "-of", "json", "--", str(path)]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=PROBE_TIMEOUT_SECONDS,
                              close_fds=True, start_new_session=True)
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"nothing ffprobe could read within {PROBE_TIMEOUT_SECONDS:.0f} s")
    except OSError as exc:
        log.error("cannot run ffprobe (%s): upload not checked", exc.strerror)
        return ProbeResult(True, "unchecked")
    if done.returncode != 0:
        return ProbeResult(False, "nothing it can read as audio or video")
    try:
        info = json.loads(done.stdout[:MAX_OUTPUT] or b"{}")
    except ValueError:
        return ProbeResult(False, "nothing it can read as audio or video")
    container = (info.get("format") or {}).get("format_name") or "an unknown format"
    streams = [s for s in info.get("streams") or [] if isinstance(s, dict)]
    kinds = ", ".join(f"{s.get('codec_type', '?')}: {s.get('codec_name', '?')}" for s in streams[:4])
    found = f"{container} ({kinds})" if kinds else f"{container} with no streams"
    return ProbeResult(any(s.get("codec_type") == "audio" for s in streams), found)


_WAV_CODECS = {1: "pcm_s", 3: "pcm_f", 0xFFFE: "pcm_s (extensible)"}


def sniff(path: Path) -> ProbeResult | None:
    """WAV and FLAC read from their own headers, in microseconds; None: ask ffprobe.

    Starting ffprobe costs 50-200 ms per upload (bench/), most of a short job's overhead; these
    two formats say in their first bytes what ffprobe would read from the same bytes.
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(64)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:16] == b"WAVEfmt ":
        codec = int.from_bytes(head[20:22], "little")
        channels = int.from_bytes(head[22:24], "little")
        rate = int.from_bytes(head[24:28], "little")
        if codec in _WAV_CODECS and channels and rate:
            return ProbeResult(True, f"wav (audio: {_WAV_CODECS[codec]}, {channels} ch, {rate} Hz)")
    if head[:4] == b"fLaC" and head[4] & 0x7F == 0 and len(head) >= 26:
        rate = int.from_bytes(head[18:21], "big") >> 4  # STREAMINFO: 20-bit sample rate
        if rate:
            return ProbeResult(True, f"flac (audio: flac, {rate} Hz)")
    return None


async def probe(ffprobe: str, path: Path) -> ProbeResult:
    """Never on the IOLoop: ffprobe runs from a worker thread."""
    known = sniff(path)
    if known is not None:
        return known
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, _probe_sync, ffprobe, path)


def _duration_sync(ffprobe: str, path: Path) -> float | None:
    argv = [ffprobe, "-v", "error", "-show_entries", "format=duration", "-of", "json", "--", str(path)]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=PROBE_TIMEOUT_SECONDS,
                              close_fds=True, start_new_session=True)
        value = json.loads(done.stdout[:MAX_OUTPUT] or b"{}").get("format", {}).get("duration")
        seconds = float(value)
    except (subprocess.TimeoutExpired, OSError, ValueError, TypeError, AttributeError):
        return None
    return seconds if seconds >= 0 and seconds == seconds else None


async def duration(ffprobe: str, path: Path) -> float | None:
    """Seconds of media in the file as ffprobe reads them, None when it cannot tell.

    Stored on the job (usage, the daily audio limit, /metrics). Kept apart from probe() so
    that a probe which reads the duration anyway can take its place.
    """
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, _duration_sync, ffprobe, path)
