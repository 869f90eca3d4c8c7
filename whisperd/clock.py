"""The wall clock, read in one place so that a test can move it (WHISPERD_CLOCK_OFFSET_FILE).

Like the crash points in faults.py, the hook is for the fault-injection tests: a file holding a
number of seconds added to the wall clock, read at each call. Unset, it costs a dict lookup.
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
    """The wall clock as an aware UTC datetime: the service's default clock for retention."""
    return datetime.fromtimestamp(wall_time(), timezone.utc)
