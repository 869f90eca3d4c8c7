"""Intake: every file that is to become a job passes here, whatever brought it (upload, URL, ...).

    media = await Intake(config).accept(path, out_dir)   # or accept_sync() from a thread

0. A 16 kHz mono 16-bit PCM WAV is already what the engine reads: its samples are copied under a
   fresh header by canonical_wav.py (capped at the limit, bounded in chunks, stopped when the
   client leaves, under the decode's time limit), and steps 1-3 do not run.
1. ffprobe, under the rules of probe.py: an allow-listed container with an audio stream, or 415.
2. Its declared duration against WHISPER_MAX_AUDIO_SECONDS, or 413 — before anything is decoded,
   so a 70 KB FLAC that declares ten hours of silence costs one ffprobe, not ten hours of PCM.
3. One decode by ffmpeg into `<out_dir>/audio.wav`, 16 kHz mono 16-bit: only the file protocol,
   the demuxer forced to the probed one, the output capped at the limit (for containers whose
   declared duration lies), and a time limit. The engine reads that file and nothing else, and
   the original goes (the caller removes it).

With WHISPER_DECODER=pyav (or auto, where PyAV is installed), steps 1 and 3 run in a warm decoder
process (decoder.py) under the same rules (the same allow-list and file-only protocol, the
duration checked between the probe and the decode, the same cap): no process start per upload.
ffprobe and ffmpeg stay the authority on refusals: a file the warm decoder will not take or cannot
decode goes through steps 1-3 as above, which name what it is and why it is refused. A warm decoder
that hangs, dies or runs out of memory under a file is killed and the upload refused.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import Kind, ServiceError
from . import clock
from .bounded import BoundedRun, RunCanceled, RunTimeout
from .canonical_wav import (MAX_CHUNKS_BEFORE_DATA, FastPathStopped, FastPathTimeout, TooManyChunks,
                            copy_if_canonical)
from .config import Config
from .decoder import (DecoderCanceled, DecoderCrashed, DecoderTimeout, DecoderUnavailable, pyav_installed,
                      shared_pool)
from .jobfiles import CANONICAL_NAME
from .probe import ACCEPTED_TEXT, ALLOWED_FORMATS, PROBE_TIMEOUT_SECONDS, ProbeRefused, common_args, probe

log = logging.getLogger("whisperd.intake")

SAMPLE_RATE = 16000
BYTES_PER_SECOND = SAMPLE_RATE * 2  # mono, 16-bit
WAV_HEADER = 44  # ffmpeg's wav muxer with bitexact and no metadata writes the plain header
DECODE_BASE_SECONDS = 60.0
DECODE_SECONDS_PER_AUDIO_SECOND = 0.1  # ffmpeg decodes audio hundreds of times faster than real time
CANONICAL_FOUND = "already 16 kHz mono 16-bit PCM WAV"
TOOLS_RECHECK_SECONDS = 5.0
_TOOLS_SEEN: dict[tuple[str, str], tuple[float, bool]] = {}
INLINE_COPY_BYTES = 64 * 1024  # a canonical WAV up to this size is copied on the IOLoop (2 s of audio)
UNKNOWN_DURATION = 36000.0  # the decode time limit's basis when neither the file nor the limit gives one
FORMATS = ",".join(sorted(ALLOWED_FORMATS))
_DECODER_CHOSEN: dict[tuple, bool] = {}


class IntakeError(ServiceError):
    """The file is not accepted: the Kind of refusal and a message for the client (no server paths);
    Kind.CLIENT_LEFT when stop() ended it and nobody is left to answer."""


@dataclass(frozen=True)
class Media:
    format: str  # the container ffprobe found, e.g. "flac"
    duration: float  # seconds of audio in the canonical file
    canonical_path: Path


def describe_seconds(seconds: float) -> str:
    """36000 -> "10 hours"; 5400 -> "1 hour 30 minutes"; 42.4 -> "42 seconds"."""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    for value, unit in ((hours, "hour"), (minutes, "minute"), (secs, "second")):
        if value:
            parts.append(f"{value} {unit}{'' if value == 1 else 's'}")
    if hours:
        parts = parts[:2] if minutes else parts[:1]
    return " ".join(parts) or f"{seconds:.1f} seconds"


class Intake:
    """One file's intake; stop() kills its ffprobe/ffmpeg (the client left)."""

    # Decodes at once per process: each is one busy core, and the engine needs the others.
    _slots: asyncio.Semaphore | None = None

    def __init__(self, config: Config) -> None:
        self.ffprobe = config.WHISPER_FFPROBE
        self.ffmpeg = config.WHISPER_FFMPEG
        self.max_seconds = config.WHISPER_MAX_AUDIO_SECONDS
        self._run = BoundedRun()
        self._canceled = threading.Event()
        self.warm = warm_decoder_wanted(config)
        self._memory = config.WHISPER_DECODER_MEMORY_MB * 1024 * 1024

    def stop(self) -> None:
        self._canceled.set()
        self._run.stop()

    async def accept(self, path: Path, out_dir: Path, shown_name: str = "upload") -> Media:
        """accept_sync() in an executor thread, never on the IOLoop; except a small canonical
        WAV, whose copy costs less than the trip to a thread (about 0.1 ms for a second of audio)."""
        if path.stat().st_size <= INLINE_COPY_BYTES:
            media = self._copied(path, out_dir / CANONICAL_NAME, shown_name)
            if media is not None:
                return media
        if Intake._slots is None:
            Intake._slots = asyncio.Semaphore(max(1, (os.cpu_count() or 1)))
        async with Intake._slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self.accept_sync, path, out_dir, shown_name)

    def accept_sync(self, path: Path, out_dir: Path, shown_name: str = "upload") -> Media:
        out = out_dir / CANONICAL_NAME
        media = self._copied(path, out, shown_name)
        if media is not None:
            return media
        if self.warm:
            media = self._warm(path, out, shown_name)
            if media is not None:
                return media
        try:
            probed = probe(self.ffprobe, path, self._run)
        except ProbeRefused as exc:
            if exc.kind is Kind.UNAVAILABLE:
                raise IntakeError(Kind.UNAVAILABLE, f"the server cannot check uploads now: ffprobe found {exc.found}") from None
            raise IntakeError(exc.kind, f"the uploaded file '{shown_name}' is not audio or video with sound: "
                                          f"ffprobe found {exc.found}. Accepted: {ACCEPTED_TEXT}") from None
        except RunCanceled:
            raise IntakeError(Kind.CLIENT_LEFT, "the client left") from None
        if self.max_seconds and probed.duration is not None and probed.duration > self.max_seconds:
            raise IntakeError(Kind.TOO_LARGE, self._too_long(shown_name, probed.duration, exact=True))
        self._decode(path, out, probed.demuxer, probed.duration, shown_name)
        seconds = max(0.0, (out.stat().st_size - WAV_HEADER) / BYTES_PER_SECOND)
        return self._checked(out, seconds, probed.format_name, f"ffprobe found {probed.found}", shown_name)

    def _copied(self, path: Path, out: Path, shown_name: str) -> Media | None:
        """A 16 kHz mono PCM WAV copied as it is (no ffprobe or ffmpeg to start), or None."""
        # Without ffprobe and ffmpeg the server refuses every upload (503), a WAV as well: an
        # operator sees the broken install at once, not on the first MP3.
        if not self.warm and not self._tools_installed():
            return None
        max_frames = int(self.max_seconds * SAMPLE_RATE) if self.max_seconds else None
        # The same time limit as the decode by ffmpeg, for the audio the file can hold at most.
        timeout = decode_timeout(min(path.stat().st_size / BYTES_PER_SECOND, self.max_seconds or UNKNOWN_DURATION))
        try:
            frames = copy_if_canonical(path, out, max_frames, stopped=self._canceled.is_set,
                                       deadline=time.monotonic() + timeout)
        except TooManyChunks:
            raise IntakeError(Kind.UNSUPPORTED_MEDIA, f"the uploaded file '{shown_name}' is a WAV with more than "
                                   f"{MAX_CHUNKS_BEFORE_DATA} chunks before its audio; a real recording has a "
                                   "handful (re-save it, or send another format)") from None
        except FastPathStopped:
            raise IntakeError(Kind.CLIENT_LEFT, "the client left") from None
        except FastPathTimeout:
            raise IntakeError(Kind.UNSUPPORTED_MEDIA, f"the audio of '{shown_name}' could not be decoded within {timeout:.0f} s") from None
        except OSError as exc:
            out.unlink(missing_ok=True)
            raise IntakeError(*_disk_error(exc)) from None
        if frames is None:
            return None
        return self._checked(out, frames / SAMPLE_RATE, "wav", CANONICAL_FOUND, shown_name)

    def _warm(self, path: Path, out: Path, shown_name: str) -> Media | None:
        """Probe and decode in a warm decoder process; None: let ffprobe/ffmpeg decide (a refusal,
        a file PyAV's FFmpeg cannot read, or no decoder process to be had)."""
        try:
            with shared_pool(os.cpu_count() or 1, self._memory).lease() as decoder:
                try:
                    probed = decoder.ask({"op": "probe", "path": str(path.resolve()), "formats": FORMATS},
                                         PROBE_TIMEOUT_SECONDS, self._canceled)
                except DecoderTimeout:
                    raise IntakeError(Kind.UNSUPPORTED_MEDIA, f"the uploaded file '{shown_name}' is not audio or video with sound: "
                                           f"nothing the decoder could read within {PROBE_TIMEOUT_SECONDS:.0f} s. "
                                           f"Accepted: {ACCEPTED_TEXT}") from None
                if not probed.get("ok") or not probed.get("audio"):
                    return None  # ffprobe names what it is and why it is refused
                duration = probed.get("duration")
                if self.max_seconds and duration is not None and duration > self.max_seconds:
                    decoder.ask({"op": "close"}, PROBE_TIMEOUT_SECONDS, None)  # it kept the file open for a decode
                    raise IntakeError(Kind.TOO_LARGE, self._too_long(shown_name, duration, exact=True))
                basis = duration if duration is not None else (self.max_seconds or UNKNOWN_DURATION)
                timeout = decode_timeout(basis)
                # A second past the limit, as ffmpeg's -t: enough to tell "longer" from "exactly the limit".
                max_frames = int((self.max_seconds + 1) * SAMPLE_RATE) if self.max_seconds else None
                try:
                    decoded = decoder.ask({"op": "decode", "path": str(path.resolve()), "out": str(out.resolve()),
                                           "demuxer": probed["demuxer"], "formats": FORMATS,
                                           "max_frames": max_frames}, timeout, self._canceled)
                except DecoderTimeout:
                    out.unlink(missing_ok=True)
                    raise IntakeError(Kind.UNSUPPORTED_MEDIA, f"the audio of '{shown_name}' could not be decoded within "
                                           f"{timeout:.0f} s") from None
                if not decoded.get("ok") or not decoded.get("frames"):
                    out.unlink(missing_ok=True)
                    return None  # ffmpeg decides, and says why if it cannot either
        except DecoderCanceled:
            out.unlink(missing_ok=True)
            raise IntakeError(Kind.CLIENT_LEFT, "the client left") from None
        except DecoderCrashed as exc:
            out.unlink(missing_ok=True)
            log.warning("intake %s: warm decoder killed: %s", out.parent.name, exc)
            raise IntakeError(Kind.UNSUPPORTED_MEDIA, f"the audio of '{shown_name}' could not be decoded: the decoder crashed or "
                                   f"ran out of memory on it (WHISPER_DECODER_MEMORY_MB)") from None
        except DecoderUnavailable as exc:
            log.warning("intake %s: no warm decoder (%s): ffprobe and ffmpeg decide", out.parent.name, exc)
            return None
        seconds = max(0.0, (out.stat().st_size - WAV_HEADER) / BYTES_PER_SECOND)
        return self._checked(out, seconds, probed["format_name"], f"the decoder found {probed['found']}",
                             shown_name)

    def _tools_installed(self) -> bool:
        # A PATH search is ~0.1 ms a program: remembered for a few seconds, per pair of names.
        key = (self.ffprobe, self.ffmpeg)
        now = clock.monotonic()
        known = _TOOLS_SEEN.get(key)
        if known is None or now - known[0] > TOOLS_RECHECK_SECONDS:
            known = _TOOLS_SEEN[key] = (now, shutil.which(self.ffprobe) is not None
                                        and shutil.which(self.ffmpeg) is not None)
        return known[1]

    def _checked(self, out: Path, seconds: float, format_name: str, found: str, shown_name: str) -> Media:
        """The canonical file's length against the limit; it goes when refused."""
        if self.max_seconds and seconds > self.max_seconds:
            out.unlink()
            raise IntakeError(Kind.TOO_LARGE, self._too_long(shown_name, seconds, exact=False))
        if seconds <= 0:
            out.unlink()
            raise IntakeError(Kind.UNSUPPORTED_MEDIA, f"the uploaded file '{shown_name}' holds no audio samples ({found})")
        log.debug("intake %s: %s, %.2f s", out.parent.name, found, seconds)
        return Media(format_name, seconds, out)

    def _decode(self, source: Path, out: Path, demuxer: str, declared: float | None, shown_name: str) -> None:
        argv = [self.ffmpeg, "-nostdin", "-hide_banner", "-v", "error", *common_args(), "-f", demuxer,
                "-i", "file:" + str(source.resolve()),
                "-map", "0:a:0", "-vn", "-sn", "-dn", "-ac", "1", "-ar", str(SAMPLE_RATE), "-c:a", "pcm_s16le",
                "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:a", "+bitexact"]
        if self.max_seconds:
            # A second past the limit: enough to tell "longer than allowed" from "exactly the limit".
            argv += ["-t", f"{self.max_seconds + 1:g}"]
        argv += ["-f", "wav", "-y", "file:" + str(out.resolve())]
        timeout = decode_timeout(declared if declared is not None else (self.max_seconds or UNKNOWN_DURATION))
        try:
            done = self._run(argv, timeout, 0, cwd=str(out.parent))
        except RunTimeout:
            raise IntakeError(Kind.UNSUPPORTED_MEDIA, f"the audio of '{shown_name}' could not be decoded within {timeout:.0f} s") from None
        except RunCanceled:
            raise IntakeError(Kind.CLIENT_LEFT, "the client left") from None
        except FileNotFoundError:
            raise IntakeError(Kind.UNAVAILABLE, f"the server cannot decode uploads now: WHISPER_FFMPEG={self.ffmpeg} "
                                   "is not installed") from None
        if done.returncode != 0 or not out.is_file():
            reason = _last_line(done.stderr, (str(source.resolve()), str(out.resolve())))
            if "No space left on device" in reason:
                out.unlink(missing_ok=True)
                raise IntakeError(*_disk_error(OSError(errno.ENOSPC, reason)))
            raise IntakeError(Kind.UNSUPPORTED_MEDIA, f"the audio of '{shown_name}' could not be decoded: {reason}")

    def _too_long(self, shown_name: str, seconds: float, exact: bool) -> str:
        length = describe_seconds(seconds) if exact else f"more than {describe_seconds(self.max_seconds)}"
        return (f"the audio of '{shown_name}' lasts {length} ({seconds:.0f} s); this server accepts at most "
                f"{describe_seconds(self.max_seconds)} (WHISPER_MAX_AUDIO_SECONDS={self.max_seconds:g})")


def decode_timeout(audio_seconds: float) -> float:
    """The time limit of turning an upload into the canonical file, by ffmpeg or by the WAV copy."""
    return DECODE_BASE_SECONDS + DECODE_SECONDS_PER_AUDIO_SECOND * audio_seconds


def warm_decoder_wanted(config: Config) -> bool:
    """WHISPER_DECODER: pyav, ffmpeg, or auto (pyav where PyAV is installed and WHISPER_FFPROBE and
    WHISPER_FFMPEG are left at their defaults: an operator who names a particular ffmpeg gets it)."""
    key = (config.WHISPER_DECODER, config.WHISPER_FFPROBE, config.WHISPER_FFMPEG)
    chosen = _DECODER_CHOSEN.get(key)
    if chosen is None:
        if config.WHISPER_DECODER == "ffmpeg":
            chosen = False
        elif config.WHISPER_DECODER == "pyav" or (config.WHISPER_FFPROBE, config.WHISPER_FFMPEG) == ("ffprobe", "ffmpeg"):
            chosen = pyav_installed()
            if not chosen:
                log.warning("PyAV is not installed: uploads are probed and decoded by %s and %s, one process "
                            "start each", config.WHISPER_FFPROBE, config.WHISPER_FFMPEG)
        else:
            chosen = False
        _DECODER_CHOSEN[key] = chosen
    return chosen


def _disk_error(exc: OSError) -> tuple[Kind, str]:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Kind.STORAGE_FULL, "the server has no disk space left for this upload's audio; try again later"
    return Kind.INTERNAL, f"the server could not write this upload's audio ({exc.strerror or 'I/O error'})"


def _last_line(stderr: str, paths: tuple[str, ...]) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    line = lines[-1] if lines else "ffmpeg gave no reason"
    for path in paths:
        line = line.replace("file:" + path, "the file").replace(path, "the file")
    return line[:300]
