"""Incoming audio to what Whisper wants: 16 kHz mono signed 16-bit little-endian.

OpenAI's formats: audio/pcm (pcm16) at 24 kHz, audio/pcmu and audio/pcma (G.711 at 8 kHz). Each
append is converted once as it arrives (the resampler keeps its state between chunks), never per
transcription pass. The server venv has no numpy: the standard library's audioop (C) does it.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():  # deprecated since 3.11, removed in 3.13; a port is pinned then
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # noqa: E402

RATE = 16000
BYTES_PER_SECOND = RATE * 2
# format name -> (input rate, bytes per input sample)
FORMATS = {"pcm16": (24000, 2), "g711_ulaw": (8000, 1), "g711_alaw": (8000, 1)}


class Converter:
    """One session's converter: keeps the resampler's state and an odd trailing byte between chunks."""

    def __init__(self, fmt: str) -> None:
        self.format = fmt
        self.rate, self.width = FORMATS[fmt]
        self._state = None
        self._odd = b""

    def input_seconds(self, raw: bytes) -> float:
        return len(raw) / (self.rate * self.width)

    def to_pcm16k(self, raw: bytes) -> bytes:
        if self.format == "pcm16":
            raw = self._odd + raw
            cut = len(raw) - len(raw) % 2
            raw, self._odd = raw[:cut], raw[cut:]
            linear = raw
        elif self.format == "g711_ulaw":
            linear = audioop.ulaw2lin(raw, 2)
        else:
            linear = audioop.alaw2lin(raw, 2)
        if not linear:
            return b""
        out, self._state = audioop.ratecv(linear, 2, 1, self.rate, RATE, self._state)
        return out


def level(pcm: bytes) -> int:
    """The RMS level of a pcm16 chunk (the fake engine's VAD and tests use it)."""
    return audioop.rms(pcm, 2) if pcm else 0
