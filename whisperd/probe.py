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


async def probe(ffprobe: str, path: Path) -> ProbeResult:
    """Never on the IOLoop: ffprobe runs from a worker thread."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, _probe_sync, ffprobe, path)
