"""Who is calling: the Bearer token in the Authorization header, checked by one pluggable function."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

_BEARER = re.compile(r"^Bearer +([A-Za-z0-9._~+/=-]{1,512})$")


@dataclass(frozen=True)
class Identity:
    name: str
    admin: bool = False

    def may_see(self, owner: str) -> bool:
        return self.admin or self.name == owner


ANONYMOUS = Identity("anonymous", admin=True)  # authorization disabled: one identity, as in the spec
ANY_TOKEN = Identity("anyone", admin=True)  # the spec's dummy verification: every token is the same caller


class AuthError(Exception):
    """401: the message tells the client what to send."""


def bearer_token(header: str | None) -> str:
    if not header:
        raise AuthError("missing Authorization header: send 'Authorization: Bearer <token>'")
    match = _BEARER.match(header.strip())
    if not match:
        raise AuthError("malformed Authorization header: expected 'Authorization: Bearer <token>'")
    return match.group(1)


def accept_any_token(token: str) -> Identity | None:
    """The spec's behaviour: any well-formed token is accepted."""
    return ANY_TOKEN


TokenValidator = Callable[[str], Identity | None]


class Authenticator:
    def __init__(self, enabled: bool, validate: TokenValidator = accept_any_token) -> None:
        self.enabled = enabled
        self.validate = validate

    def identify(self, header: str | None) -> Identity:
        if not self.enabled:
            return ANONYMOUS
        identity = self.validate(bearer_token(header))
        if identity is None:
            raise AuthError("invalid, expired or revoked token")
        return identity
