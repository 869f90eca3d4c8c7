"""The minimum rate of a transfer (a multipart body, a tus PATCH, a url= fetch): slower ones are cut.

A trickle (a byte every 20 s) keeps a connection, an upload slot and a file open for as long as
the other clocks allow; WHISPER_UPLOAD_MIN_BYTES_PER_SECOND, averaged over
WHISPER_UPLOAD_RATE_WINDOW_SECONDS, is the one floor every way in is held to.
"""

from __future__ import annotations

from typing import Callable

from tornado.ioloop import PeriodicCallback

from .config import Config


def too_slow(got: int, window: float, floor: int) -> str:
    """Why a transfer was cut, for the client (the caller adds what it cut)."""
    return (f"{got / window / 1024:.1f} KiB/s over the last {window:g} s, below the minimum of {floor / 1024:g} KiB/s "
            "(WHISPER_UPLOAD_MIN_BYTES_PER_SECOND)")


class RateFloor:
    """Counts bytes; once per window calls on_slow(bytes in that window) if they were too few.

    `declared`: the transfer's whole length when known, so that its last bytes need not fill a
    whole window. After on_slow the watch is stopped."""

    def __init__(self, config: Config, on_slow: Callable[[int], None], declared: int | None = None,
                 already: int = 0) -> None:
        self.floor = config.WHISPER_UPLOAD_MIN_BYTES_PER_SECOND
        self.window = config.WHISPER_UPLOAD_RATE_WINDOW_SECONDS
        self.on_slow = on_slow
        self.declared = declared
        self.received = already
        self._at_check = already
        self._timer: PeriodicCallback | None = None

    def start(self) -> "RateFloor":
        if self.floor and self._timer is None:
            self._timer = PeriodicCallback(self._check, self.window * 1000)
            self._timer.start()
        return self

    def add(self, count: int) -> None:
        self.received += count

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def message(self, got: int) -> str:
        return too_slow(got, self.window, self.floor)

    def _check(self) -> None:
        got = self.received - self._at_check
        self._at_check = self.received
        wanted = self.floor * self.window
        if self.declared is not None:
            wanted = min(wanted, self.declared - self.received + got)
        if got >= wanted or self._timer is None:
            return
        self.stop()
        self.on_slow(got)
