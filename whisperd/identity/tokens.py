"""API tokens: made once, stored as a public prefix plus a salted slow hash, checked per request.

A token reads `wd_<prefix>_<secret>`: the prefix finds the row (and lets an operator tell
tokens apart in `token list` and in the ledger) without revealing anything that opens the API.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from datetime import timedelta

from .. import metrics
from .auth import Identity
from ..clock import iso, monotonic, seconds_since, utc_now
from ..jobs import TokenRecord
from ..ledger import Ledger
from .limits import Limits

PREFIX_BYTES = 4  # 8 hex digits: enough to find a row, useless to a guesser
SECRET_BYTES = 24  # 192 bits: no guessing, whatever the hash costs
# The secret has 192 random bits: no stretching makes it easier or harder to guess, so the hash
# only has to make a stolen ledger useless, which one HMAC round already does. A modest stretch
# stays as defence in depth; each unverified request pays it, so it is kept small (~1 ms, not
# the 35 ms of 120 000 rounds). Tokens made earlier keep the rounds stored with them.
ITERATIONS = 4_000
ALGORITHM = f"pbkdf2_sha256${ITERATIONS}"
TOKEN_FORMAT = re.compile(r"^wd_([0-9a-f]{8})_([0-9a-f]{48})$")
NAME_FORMAT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
LAST_USE_EVERY_SECONDS = 60.0  # at most one ledger write a minute per token, not one per request
CACHE_SIZE = 1024
# A token's row is read again after this long: a revocation or an expiry takes effect within it
# in every worker process, and a burst of requests costs one ledger read a second per token.
RECHECK_SECONDS = 1.0
# Slow hashes at once per process: a flood of wrong tokens for a known prefix then queues here
# instead of taking every executor thread (which the upload probe needs too).
CONCURRENT_HASHES = 2


def new_token() -> tuple[str, str]:
    """(token, prefix) for a fresh token."""
    prefix = secrets.token_hex(PREFIX_BYTES)
    return f"wd_{prefix}_{secrets.token_hex(SECRET_BYTES)}", prefix


def hash_token(token: str, salt: bytes, algorithm: str = ALGORITHM) -> str:
    name, _, rounds = algorithm.partition("$")
    if name != "pbkdf2_sha256" or not rounds.isdigit():
        raise ValueError(f"unknown token hash algorithm {algorithm!r}")
    return hashlib.pbkdf2_hmac("sha256", token.encode(), salt, int(rounds)).hex()


def hashed_for_storage(token: str) -> tuple[str, str, str]:
    """(algorithm, salt hex, hash hex) to keep in the ledger instead of the token."""
    salt = secrets.token_bytes(16)
    return ALGORITHM, salt.hex(), hash_token(token, salt)


def expiry(days: float | None) -> str | None:
    if days is None:
        return None
    return iso(utc_now() + timedelta(days=days))


def prefix_of(token: str) -> str | None:
    match = TOKEN_FORMAT.match(token)
    return match.group(1) if match else None


class LedgerTokens:
    """The default validator: tokens made by `whisperd.py token create`, looked up in the ledger.

    The slow hash runs once per token and process; after that a request costs a SHA-256 and, at
    most once a second per prefix, one indexed read (so a revocation or expiry takes effect
    within RECHECK_SECONDS in every worker; an unknown prefix is remembered as long).
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        # sha256(token) -> the stored hash it was verified against; keyed by a digest so
        # that the cache never holds a usable token.
        self._verified: OrderedDict[bytes, str] = OrderedDict()
        self._touched: dict[int, float] = {}
        self._hashing = asyncio.Semaphore(CONCURRENT_HASHES)
        self._rows: OrderedDict[str, tuple[float, TokenRecord | None]] = OrderedDict()  # prefix -> (read at, row)

    async def __call__(self, token: str) -> Identity | None:
        prefix = prefix_of(token)
        if prefix is None:
            return None
        record = await self._row(prefix)
        if record is None or not record.in_force():
            return None
        if not await self._matches(token, record):
            return None
        await self._record_use(record)
        return Identity(record.name, admin=record.admin, limits=limits_of(record))

    async def _row(self, prefix: str) -> TokenRecord | None:
        now = monotonic()
        known = self._rows.get(prefix)
        if known is not None and now - known[0] < RECHECK_SECONDS:
            return known[1]
        record = await self.ledger.token_by_prefix(prefix)
        self._rows[prefix] = (now, record)
        self._rows.move_to_end(prefix)
        while len(self._rows) > CACHE_SIZE:
            self._rows.popitem(last=False)
        return record

    async def _matches(self, token: str, record: TokenRecord) -> bool:
        key = hashlib.sha256(token.encode()).digest()
        known = self._verified.get(key)
        if known is not None and hmac.compare_digest(known, record.hash):
            self._verified.move_to_end(key)
            return True
        loop = asyncio.get_running_loop()
        metrics.token_hashed()
        try:
            async with self._hashing:
                computed = await loop.run_in_executor(None, hash_token, token, bytes.fromhex(record.salt),
                                                      record.algorithm)
        except ValueError:
            return False
        if not hmac.compare_digest(computed, record.hash):
            return False
        self._verified[key] = record.hash
        while len(self._verified) > CACHE_SIZE:
            self._verified.popitem(last=False)
        return True

    def verified_before(self, digest: bytes) -> bool:
        """This process verified the token with this sha256 digest already (it may since be revoked)."""
        return digest in self._verified

    async def _record_use(self, record: TokenRecord) -> None:
        now = monotonic()
        last = self._touched.get(record.id)
        if last is not None and now - last < LAST_USE_EVERY_SECONDS:
            return
        self._touched[record.id] = now
        if record.last_used_at and _age_seconds(record.last_used_at) < LAST_USE_EVERY_SECONDS:
            return  # another worker wrote it a moment ago
        await self.ledger.touch_token(record.id)

    async def none_exist(self) -> bool:
        return await self.ledger.live_token_count() == 0


def limits_of(record: TokenRecord) -> Limits:
    return Limits(record.max_queued, record.max_audio_minutes_per_day, record.max_file_size,
                  record.max_open_uploads, record.max_upload_bytes)


def _age_seconds(stamp: str) -> float:
    return seconds_since(stamp)
