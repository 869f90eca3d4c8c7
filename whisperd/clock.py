"""The wall clock, read in one place so that a test can move it (WHISPERD_CLOCK_OFFSET_FILE).

Every part of whisperd that asks what time it is asks here (utc_now, now_iso, wall_time), and
writes a time for the ledger with iso(). Like the crash points in faults.py, the hook is for
the fault-injection tests: a file holding a number of seconds added to the wall clock, read at
each call. Unset, it costs a dict lookup. (Durations are measured with time.monotonic, which no
test needs to move.)
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone


def wall_time() -> float:
    """Seconds since the epoch, as retention sees them."""
    path = os.environ.get("WHISPERD_CLOCK_OFFSET_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                return time.time() + float(handle.read().strip() or 0)
        except (OSError, ValueError):
            pass
    return time.time()


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
