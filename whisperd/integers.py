"""The one strict parser for every whole number that comes from outside: headers, query parameters,
form fields, and the headers of a server we fetch from.

(Not "numbers.py": engine_worker.py runs as a script from this directory, where that name would
hide the standard library's numbers module.)"""

from __future__ import annotations

from .errors import Kind, ServiceError


def is_ascii_number(text: str) -> bool:
    """Digits 0-9 only: str.isdigit() also takes "²" and "٣", which int() then refuses (or reads)."""
    return bool(text) and text.isascii() and text.isdigit()


# The one parser for every whole number a client (or a server we fetch from) sends: headers,
# query parameters, form fields. str.isdigit() passes "²", which int() then refuses (a 500);
# int() itself reads "٣" as 3 and takes " 7", "+7" and "1_000"; an unbounded number overflows
# SQLite's 64 bits later on.
MAX_INTEGER = 2**63 - 1
_MAX_DIGITS = len(str(MAX_INTEGER))


class BadInteger(ValueError):
    """Not a whole number in ASCII digits within the allowed range; str() says so, naming the input."""


def strict_int(text: str | None, name: str, maximum: int = MAX_INTEGER, minimum: int = 0) -> int:
    """`text` as a whole number: ASCII digits 0-9 only (no sign, space, exponent or other script's
    digits), from minimum to maximum; BadInteger (a ValueError) otherwise, with a message naming
    `name` that a client can act on."""
    shown = repr(str(text)[:40]) if text is not None else "nothing"
    if text is None or not is_ascii_number(text) or len(text.lstrip("0")) > _MAX_DIGITS:
        raise BadInteger(f"{name} must be a whole number from {minimum} to {maximum} in digits 0-9, got {shown}")
    value = int(text)
    if not minimum <= value <= maximum:
        raise BadInteger(f"{name} must be a whole number from {minimum} to {maximum}, got {shown}")
    return value


def integer_input(text: str | None, name: str, maximum: int = MAX_INTEGER, minimum: int = 0) -> int:
    """strict_int(), refused as the client's 400."""
    try:
        return strict_int(text, name, maximum, minimum)
    except BadInteger as exc:
        raise ServiceError(Kind.INVALID, str(exc)) from None
