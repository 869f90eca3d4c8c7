"""One clock: every part of whisperd that reads the wall time reads whisperd/clock.py, so moving
that clock (WHISPERD_CLOCK_OFFSET_FILE) moves token expiry, usage windows, tus expiry, metrics
ages and webhook stamps alike; and the caches and windows that decide by elapsed time read its
monotonic(), so a test moves them too instead of waiting."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

from whisperd import clock, metrics

from whisperd.identity import guard, limits, tokens
from whisperd.handlers import tus

WHISPERD = Path(__file__).resolve().parents[2] / "whisperd"
DAYS = 40


def lines_matching(paths, pattern: str) -> list[str]:
    """path:line of every line of these files that matches `pattern`."""
    return [f"{path.relative_to(WHISPERD)}:{number}" for path in paths
            for number, line in enumerate(path.read_text().splitlines(), 1) if re.search(pattern, line)]


def test_no_module_reads_the_wall_clock_but_clock_py():
    # engine_worker.py runs in the engine's process, beside whisperd, not in it.
    paths = [p for p in WHISPERD.rglob("*.py") if p.name not in ("clock.py", "engine_worker.py")]
    readers = lines_matching(paths, r"datetime\.now\(|datetime\.utcnow\(|\btime\.time\(\)|time\.gmtime\(\)")
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


# What decides by elapsed time (a cache, a rate window, a lease's renewal, retention's jump check);
# elsewhere time.monotonic() and loop.time() measure a duration or arm an IOLoop timer.
ELAPSED_TIME_DECIDES = ("identity", "nodes.py", "retention.py", "supervisor.py", "handlers/multipart_upload.py")


def test_the_caches_and_windows_read_the_monotonic_clock_of_clock_py():
    places = [WHISPERD / name for name in ELAPSED_TIME_DECIDES]
    paths = [p for place in places for p in ([place] if place.is_file() else sorted(place.rglob("*.py")))]
    assert len(paths) >= len(ELAPSED_TIME_DECIDES) + 3  # identity/ has several modules
    readers = lines_matching(paths, r"\btime\.monotonic\b|\bloop\.time\(")
    assert not readers, f"read the monotonic clock themselves (use clock.monotonic()): {readers}"


def test_moving_the_monotonic_clock_moves_the_token_cache_and_the_failure_memory(tmp_path, monkeypatch):
    offset = tmp_path / "offset"
    offset.write_text("0 0")
    monkeypatch.setenv("WHISPERD_CLOCK_OFFSET_FILE", str(offset))
    reads = []

    class Ledger:
        async def token_by_prefix(self, prefix):
            reads.append(prefix)
            return None  # no such token: refused, and the answer is remembered like a row

    check = tokens.LedgerTokens(Ledger())
    token = "wd_0123abcd_" + "0" * 48

    async def ask(times):
        return [await check(token) for _ in range(times)]

    assert asyncio.run(ask(3)) == [None] * 3 and reads == ["0123abcd"]  # one read, then remembered
    offset.write_text(f"3600 {tokens.RECHECK_SECONDS / 2}")  # a wall-clock jump moves no cache
    asyncio.run(ask(1))
    assert len(reads) == 1
    offset.write_text(f"3600 {tokens.RECHECK_SECONDS}")  # time passes: the row is read again
    asyncio.run(ask(1))
    assert len(reads) == 2

    failures = guard.FailureGuard(6)
    digest = guard.token_digest(token)
    failures.failed(digest)
    assert failures.recently_failed(digest)
    offset.write_text(f"0 {tokens.RECHECK_SECONDS + guard.REMEMBER_SECONDS + 1}")
    assert not failures.recently_failed(digest)
