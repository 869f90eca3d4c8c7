"""Failed token checks: remembered briefly, and rate-limited per client address and per token prefix.

A wrong token for a live prefix costs the server a slow hash. Without a memory and a limit, a
flood of them (the prefix is no secret) takes the CPU from every real job. So:
- a token that just failed fails again at once, without a hash (keyed by a digest of it, so
  that no memory here ever holds a token);
- each address and each prefix may fail WHISPER_AUTH_FAILURES_PER_MINUTE times a minute (a
  token bucket: that many at once, then one every 60/N s); beyond it, 429 with Retry-After,
  without a hash. A token that was verified before is not affected (tokens.py checks its cache
  first), so the holder of a prefix under attack keeps working.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

from ..clock import monotonic
from ..errors import Kind, ServiceError

REMEMBER_SECONDS = 30.0
MAX_ENTRIES = 10_000  # per table; the oldest go first


class Throttled(ServiceError):
    """Too many failed checks from this address or for this prefix: retry after `retry_after` s."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(Kind.OVER_LIMIT, f"too many failed token checks; try again in {retry_after} s", retry_after)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class _Buckets:
    """Token buckets by key: `capacity` failures at once, refilled at `rate` per second."""

    def __init__(self, capacity: int, rate: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (level, at)

    def _level(self, key: str, now: float) -> float:
        level, at = self._state.get(key, (float(self.capacity), now))
        return min(float(self.capacity), level + (now - at) * self.rate)

    def wait_seconds(self, key: str, now: float) -> float:
        """0 when a failure may still be tried; else the seconds until one may."""
        level = self._level(key, now)
        return 0.0 if level >= 1 else (1 - level) / self.rate

    def refund(self, key: str, now: float) -> None:
        if key in self._state:
            self._state[key] = (min(float(self.capacity), self._level(key, now) + 1), now)

    def spend(self, key: str, now: float) -> None:
        self._state[key] = (max(0.0, self._level(key, now) - 1), now)
        self._state.move_to_end(key)
        while len(self._state) > MAX_ENTRIES:
            self._state.popitem(last=False)


class FailureGuard:
    def __init__(self, failures_per_minute: int, clock=monotonic) -> None:
        self.clock = clock
        self._addresses = _Buckets(failures_per_minute, failures_per_minute / 60.0)
        self._prefixes = _Buckets(failures_per_minute, failures_per_minute / 60.0)
        self._failed: OrderedDict[bytes, float] = OrderedDict()  # digest -> when it failed

    def recently_failed(self, digest: bytes) -> bool:
        at = self._failed.get(digest)
        if at is None:
            return False
        if self.clock() - at > REMEMBER_SECONDS:
            del self._failed[digest]
            return False
        return True

    def take(self, address: str | None, prefix: str | None) -> None:
        """Spend one failure of this address and this prefix before the check (Throttled when none is
        left), so that concurrent requests cannot all pass while the first hashes are still running;
        a check that succeeds gives it back (give_back)."""
        now = self.clock()
        wait = max(self._addresses.wait_seconds(address, now) if address else 0.0,
                   self._prefixes.wait_seconds(prefix, now) if prefix else 0.0)
        if wait > 0:
            raise Throttled(max(1, math.ceil(wait)))
        if address:
            self._addresses.spend(address, now)
        if prefix:
            self._prefixes.spend(prefix, now)

    def give_back(self, address: str | None, prefix: str | None) -> None:
        now = self.clock()
        if address:
            self._addresses.refund(address, now)
        if prefix:
            self._prefixes.refund(prefix, now)

    def failed(self, digest: bytes) -> None:
        """Remember a token that failed (its failure was spent by take())."""
        self._failed[digest] = self.clock()
        self._failed.move_to_end(digest)
        while len(self._failed) > MAX_ENTRIES:
            self._failed.popitem(last=False)
