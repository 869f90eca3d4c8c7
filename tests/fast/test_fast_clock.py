"""One clock: every part of whisperd that reads the wall time reads whisperd/clock.py, so moving
that clock (WHISPERD_CLOCK_OFFSET_FILE) moves token expiry, usage windows, tus expiry, metrics
ages and webhook stamps alike."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

from whisperd import clock, metrics

from whisperd.identity import limits, tokens
from whisperd.handlers import tus

WHISPERD = Path(__file__).resolve().parents[2] / "whisperd"
DAYS = 40


def test_no_module_reads_the_wall_clock_but_clock_py():
    readers = []
    for path in WHISPERD.rglob("*.py"):
        if path.name == "clock.py" or path.name == "engine_worker.py":  # the engine runs beside us, not in
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"datetime\.now\(|datetime\.utcnow\(|\btime\.time\(\)|time\.gmtime\(\)", line):
                readers.append(f"{path.relative_to(WHISPERD)}:{number}")
    assert not readers, f"read the wall clock themselves (use whisperd/clock.py): {readers}"


def test_moving_the_clock_moves_every_reader(tmp_path, monkeypatch):
    offset = tmp_path / "offset"
    offset.write_text(str(DAYS * 86400))
    real = datetime.now(timezone.utc)
    monkeypatch.setenv("WHISPERD_CLOCK_OFFSET_FILE", str(offset))
    moved = real + timedelta(days=DAYS)
    assert abs((clock.utc_now() - moved).total_seconds()) < 60
    assert tokens.expiry(1) > clock.iso(moved)
    assert limits.usage_windows()[0] >= clock.iso(moved - timedelta(days=1))
    assert tus.iso_in(1) > clock.iso(moved)
    assert metrics.seconds_since(clock.iso(real)) > (DAYS - 1) * 86400
    assert clock.seconds_since(clock.iso(real)) > (DAYS - 1) * 86400
    offset.write_text("0")
    assert abs((clock.utc_now() - datetime.now(timezone.utc)).total_seconds()) < 60
