"""The clock, read in one place so that a test can move it (WHISPERD_CLOCK_OFFSET_FILE).

Every part of whisperd that asks what time it is asks here (utc_now, now_iso, wall_time), and
writes a time for the ledger with iso(); every cache or window that decides by elapsed time (a
token's row read again after a second, the auth guard's buckets, a lease's renewal, retention's
jump check) reads monotonic() here. Like the crash points in faults.py, the hook is for the
tests: a file holding seconds added to the clocks, read at each call, "W" (the wall clock
stepped by W: a jump, which the monotonic clock does not see) or "W M" (the monotonic clock
moved by M too: W = M is time passing). Unset, it costs a dict lookup. What stays on
time.monotonic() or loop.time() elsewhere measures a duration or arms an IOLoop timer (the loop
keeps its own clock, which no file moves).
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone

OFFSET_FILE = "WHISPERD_CLOCK_OFFSET_FILE"


def offsets() -> tuple[float, float]:
    """(wall, monotonic) seconds the test moved the clocks by; (0, 0) unless OFFSET_FILE is set."""
    path = os.environ.get(OFFSET_FILE)
    if not path:
        return 0.0, 0.0
    try:
        with open(path, encoding="utf-8") as handle:
            numbers = [float(word) for word in handle.read().split()[:2]]
    except (OSError, ValueError):
        return 0.0, 0.0
    return (numbers[0] if numbers else 0.0), (numbers[1] if len(numbers) > 1 else 0.0)


def wall_time() -> float:
    """Seconds since the epoch, as retention sees them."""
    return time.time() + offsets()[0]


def monotonic() -> float:
    """time.monotonic(), as the caches and windows that decide by elapsed time see it."""
    return time.monotonic() + offsets()[1]


def utc_now() -> datetime:
    """The wall clock as an aware UTC datetime (also the service's default clock for retention)."""
    return datetime.fromtimestamp(wall_time(), timezone.utc)


def iso(moment: datetime) -> str:
    """The ledger's text form of a time: UTC, millisecond precision, sortable as text."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def now_iso(at: datetime | None = None) -> str:
    """iso() of `at`, else of now."""
    return iso(at or utc_now())


def seconds_since(stamp: str) -> float:
    """How long ago an iso() time was (may be negative); +inf for a malformed one."""
    try:
        then = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return float("inf")
    return (utc_now() - then).total_seconds()
