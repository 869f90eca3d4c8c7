"""Server VAD: per-frame speech probabilities (Silero, 32 ms frames) into turns, as OpenAI's server_vad.

Speech starts at the first frame at or above `threshold`; the turn's audio begins
`prefix_padding_ms` earlier. It stops after `silence_duration_ms` of frames below the threshold
less 0.15 (hysteresis, as Silero's own get_speech_timestamps), and the turn ends where the
silence began plus a little padding.
"""

from __future__ import annotations

import dataclasses

FRAME_MS = 32
DEFAULTS = {"threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
END_PADDING_MS = 96  # keep a little of the silence: a cut right at the last frame clips final consonants


@dataclasses.dataclass
class Turn:
    event: str  # "started" or "stopped"
    at_ms: int  # audio_start_ms (with the prefix padding) or audio_end_ms


class Turns:
    def __init__(self, threshold: float, prefix_padding_ms: int, silence_duration_ms: int) -> None:
        self.threshold = threshold
        self.prefix_padding_ms = prefix_padding_ms
        self.silence_duration_ms = silence_duration_ms
        self.position_ms = 0  # audio judged so far
        self.speaking = False
        self._silent_since: int | None = None

    def feed(self, probs: list[float]) -> list[Turn]:
        out: list[Turn] = []
        low = max(0.01, self.threshold - 0.15)
        for prob in probs:
            start = self.position_ms
            self.position_ms += FRAME_MS
            if not self.speaking:
                if prob >= self.threshold:
                    self.speaking = True
                    self._silent_since = None
                    out.append(Turn("started", max(0, start - self.prefix_padding_ms)))
                continue
            if prob >= low:
                self._silent_since = None
                continue
            if self._silent_since is None:
                self._silent_since = start
            if self.position_ms - self._silent_since >= self.silence_duration_ms:
                self.speaking = False
                out.append(Turn("stopped", min(self.position_ms, self._silent_since + END_PADDING_MS)))
                self._silent_since = None
        return out

    @property
    def pausing(self) -> bool:
        """Speech has gone quiet (the turn may be about to end)."""
        return self.speaking and self._silent_since is not None

    def end_if_silent(self) -> int | None:
        """While speech has gone quiet: where the turn will end (its `stopped` at_ms) should the
        quiet last silence_duration_ms; None while speaking or outside a turn."""
        if not self.pausing:
            return None
        assert self._silent_since is not None
        frames = max(1, -(-self.silence_duration_ms // FRAME_MS))  # feed() stops at the end of this frame
        return self._silent_since + min(frames * FRAME_MS, END_PADDING_MS)

    @property
    def quiet_ms(self) -> int:
        """How long the current quiet inside a turn has lasted (0 while speaking)."""
        return self.position_ms - self._silent_since if self.pausing and self._silent_since is not None else 0

    def reset(self, position_ms: int) -> None:
        """After a clear or a client commit: a new turn starts with the next speech."""
        self.position_ms = position_ms
        self.speaking = False
        self._silent_since = None
