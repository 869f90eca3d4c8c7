"""What an upload is, asked of ffprobe under rules: only allowed containers are ever opened.

A media file is a program for ffmpeg: a playlist (hls), a concat list or an image-sequence
pattern makes the demuxer open other files on the server, or wait for a live stream that never
ends. So the demuxers ffprobe may use are an allow-list of self-contained audio/video
containers (`-format_whitelist`), file access is limited to the file protocol
(`-protocol_whitelist file`), and the input is named `file:<path>` so that no name is ever read
as a URL. A refused format is never opened: its demuxer's probe (which reads only our file's
first bytes) is all that runs, and ffprobe's debug line about it names it for the client.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import Kind
from .bounded import BoundedRun, RunTimeout

PROBE_TIMEOUT_SECONDS = 20.0  # a hostile file must not hold a thread for long
MAX_OUTPUT = 1024 * 1024

# Demuxers of containers that hold their media themselves and name no other file. The first
# name of a comma-separated demuxer name ("mov,mp4,m4a,3gp,3g2,mj2") is what `-f` takes.
# mov's external data references stay off (its enable_drefs option defaults to 0).
ALLOWED_FORMATS = frozenset({
    "wav", "w64", "flac", "mp3", "ogg", "matroska", "mov", "aac", "ac3", "eac3", "dts", "truehd",
    "amr", "amrnb", "amrwb", "aiff", "caf", "au", "avi", "asf", "mpeg", "mpegts", "flv", "wv",
    "ape", "tta", "voc", "gsm", "mpc", "mpc8", "shn", "dsf", "mlp", "loas", "xwma", "wsaud",
})
ACCEPTED_TEXT = "WAV, FLAC, MP3, Ogg/Opus/Vorbis, M4A/MP4/MOV, Matroska/WebM, AAC, AC-3, AMR, AIFF, AVI, WMA/ASF, MPEG-PS/TS, FLV, WavPack, APE"

# Why some refused formats are dangerous, for the client's message.
_REFUSED_WHY = (
    (re.compile(r"^(hls|dash|applehttp)"), "a playlist: it names other files for ffmpeg to read"),
    (re.compile(r"^concat"), "a concat list: it names other files for ffmpeg to read"),
    (re.compile(r"^image2|_pipe$|^(png|jpeg|gif|webp|bmp|tiff)"), "an image or image sequence"),
    (re.compile(r"^tty$"), "text (the tty demuxer)"),
    (re.compile(r"^(srt|ass|webvtt|subviewer\d*|microdvd|sami|jacosub|mpl2|mpsub|pjs|realtext|stl|"
                r"subrip|vplayer|lrc|scc|mcc|aqtitle|sup|pgssub|dvbsub|vobsub)$"), "subtitles"),
)


class ProbeRefused(Exception):
    """The file is not accepted; `found` says what ffprobe saw, `kind` why (UNAVAILABLE: no ffprobe)."""

    def __init__(self, found: str, kind: Kind = Kind.UNSUPPORTED_MEDIA) -> None:
        super().__init__(found)
        self.found = found
        self.kind = kind


@dataclass(frozen=True)
class Probed:
    format_name: str  # as ffprobe names it, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    demuxer: str  # the allowed name `-f` forces when the file is decoded
    duration: float | None  # seconds the container declares; None when it declares none
    found: str  # "flac (audio: flac, 16000 Hz, 1 ch)", for logs and messages


def available(program: str) -> bool:
    return shutil.which(program) is not None


def _input(path: Path) -> str:
    return "file:" + str(path.resolve())


def common_args() -> list[str]:
    """Input options every ffprobe/ffmpeg run on an upload gets: local files only, allowed demuxers only."""
    return ["-protocol_whitelist", "file", "-format_whitelist", ",".join(sorted(ALLOWED_FORMATS))]


def probe(ffprobe: str, path: Path, run: BoundedRun | None = None) -> Probed:
    """Blocking (run it off the IOLoop). ProbeRefused when the file may not go further."""
    run = run or BoundedRun()
    # Debug level for one line: "Format hls probed with size=2048 and score=100", which names
    # a refused format (the whitelist stops ffprobe right after it); the rest is a few KB.
    argv = [ffprobe, "-hide_banner", "-v", "debug", *common_args(),
            "-show_entries", "format=format_name,duration:stream=codec_type,codec_name,sample_rate,channels,duration",
            "-of", "json", _input(path)]
    try:
        done = run(argv, PROBE_TIMEOUT_SECONDS, MAX_OUTPUT)
    except RunTimeout:
        raise ProbeRefused(f"nothing ffprobe could read within {PROBE_TIMEOUT_SECONDS:.0f} s") from None
    except FileNotFoundError:
        raise ProbeRefused(f"nothing: WHISPER_FFPROBE={ffprobe} is not installed, so uploads cannot be "
                           "checked; try again later", Kind.UNAVAILABLE) from None
    if done.returncode != 0:
        if "not on whitelist" in done.stderr:
            raise ProbeRefused(refused_format(done.stderr))
        raise ProbeRefused("nothing it can read as audio or video")
    try:
        info = json.loads(done.stdout or b"{}")
    except ValueError:
        raise ProbeRefused("nothing it can read as audio or video") from None
    fmt = info.get("format") or {}
    format_name = str(fmt.get("format_name") or "")
    demuxer = next((name for name in format_name.split(",") if name in ALLOWED_FORMATS), None)
    streams = [s for s in info.get("streams") or [] if isinstance(s, dict)]
    kinds = ", ".join(_describe(s) for s in streams[:4])
    found = f"{format_name or 'an unknown format'} ({kinds})" if kinds else f"{format_name} with no streams"
    if demuxer is None:  # the whitelist let it through: never expected, refused all the same
        raise ProbeRefused(found)
    audio = [s for s in streams if s.get("codec_type") == "audio"]
    if not audio:
        raise ProbeRefused(found)
    return Probed(format_name, demuxer, _duration(fmt, audio), found)


def _describe(stream: dict) -> str:
    text = f"{stream.get('codec_type', '?')}: {stream.get('codec_name', '?')}"
    if stream.get("codec_type") == "audio":
        if stream.get("sample_rate"):
            text += f", {stream['sample_rate']} Hz"
        if stream.get("channels"):
            text += f", {stream['channels']} ch"
    return text


def _duration(fmt: dict, audio: list[dict]) -> float | None:
    values = []
    for raw in [fmt.get("duration")] + [s.get("duration") for s in audio]:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            continue
        if value == value and value >= 0:  # not NaN
            values.append(value)
    return max(values) if values else None


_PROBED = re.compile(r"Format (\S+) probed with size=\d+ and score=\d+")


def refused_format(stderr: str) -> str:
    """What ffprobe took a refused file for, and why such files are refused."""
    match = _PROBED.search(stderr)
    if not match:
        return "a format this server does not accept"
    name = match.group(1)
    for pattern, why in _REFUSED_WHY:
        if pattern.search(name):
            return f"{name}, {why}"
    return f"{name}, a format this server does not accept"
