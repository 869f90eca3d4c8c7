"""What a refusal is, in the service's words: a Kind and a message written for the client.

Whoever refuses something (a form rule, the upload reader, intake, the fetcher, the service, a
busy ledger, the token check) raises a ServiceError (or a subclass named for where it comes from)
with the Kind of refusal; none of them knows HTTP. The base handler (handlers/base.py) holds the
one table that turns a Kind into a status and headers, so a status is decided in one place and a
message never leaks a path or a secret by accident.
"""

from __future__ import annotations

from enum import Enum


class Kind(Enum):
    """Why a request is refused (handlers/base.py's STATUS maps each to an HTTP answer)."""

    INVALID = "invalid"  # the request breaks a rule of the API
    UNAUTHENTICATED = "unauthenticated"  # no valid credentials
    FORBIDDEN = "forbidden"  # valid credentials, not allowed here
    NOT_FOUND = "not found"
    TOO_SLOW = "too slow"  # the client sent its body too slowly
    CONFLICT = "conflict"  # the thing is not in a state that allows this
    GONE = "gone"  # it existed and is no more (delivered, expired, canceled)
    UNSUPPORTED_PROTOCOL = "unsupported protocol"  # a protocol version this server does not speak
    TOO_LARGE = "too large"
    UNSUPPORTED_MEDIA = "unsupported media"
    NO_RESULT = "no result"  # the job ended without one (failed)
    LOCKED = "locked"  # someone else is changing it now
    OVER_LIMIT = "over limit"  # a cap, a quota or a throttle: retry later
    CHECKSUM_MISMATCH = "checksum mismatch"
    CLIENT_LEFT = "client left"  # nobody is left to answer
    INTERNAL = "internal"
    UPSTREAM_FAILED = "upstream failed"  # a server we asked (a media URL) failed us
    UNAVAILABLE = "unavailable"  # the service cannot do it now (stopping, busy, a tool missing)
    TIMED_OUT = "timed out"  # it did not finish in the time allowed
    STORAGE_FULL = "storage full"


class ServiceError(Exception):
    """A refusal: its Kind, a message for the client, and, when a retry makes sense, after how many
    seconds. `headers` is only for the HTTP layer's own protocols (tus, OpenAI's client hints)."""

    def __init__(self, kind: Kind, message: str, retry_after: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after
        self.headers = headers or {}
