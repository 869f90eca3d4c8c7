"""Who is calling: the Bearer token in the Authorization header, checked by one pluggable function."""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from ..errors import Kind, ServiceError
from .limits import UNSET, Limits
from .. import metrics
from .guard import FailureGuard, Throttled, token_digest

_BEARER = re.compile(r"^Bearer +([A-Za-z0-9._~+/=-]{1,512})$")


@dataclass(frozen=True)
class Identity:
    name: str
    admin: bool = False
    # The token's own limits (ledger tokens); UNSET: the WHISPER_TOKEN_MAX_* defaults apply.
    limits: Limits = UNSET

    def may_see(self, owner: str) -> bool:
        return self.admin or self.name == owner


ANONYMOUS = Identity("anonymous", admin=True)  # authorization disabled: one identity, as in the spec
ANY_TOKEN = Identity("anyone", admin=True)  # the spec's dummy verification: every token is the same caller


class AuthError(ServiceError):
    """No valid credentials: the message tells the client what to send."""

    def __init__(self, message: str) -> None:
        super().__init__(Kind.UNAUTHENTICATED, message)


def bearer_token(header: str | None) -> str:
    if not header:
        raise AuthError("missing Authorization header: send 'Authorization: Bearer <token>'")
    match = _BEARER.match(header.strip())
    if not match:
        raise AuthError("malformed Authorization header: expected 'Authorization: Bearer <token>'")
    return match.group(1)


def accept_any_token(token: str) -> Identity | None:
    """The spec's dummy check: any well-formed token is accepted (WHISPER_API_ALLOW_ANY_TOKEN=true)."""
    return ANY_TOKEN


# Called with the token; returns an Identity (or an identity name), or None to refuse.
# May be a plain function or a coroutine function.
TokenValidator = Callable[[str], Any]

NO_TOKENS = (
    "no API token exists yet: on the server, run `python whisperd.py token create --name YOUR_NAME` "
    "and send the token it prints as 'Authorization: Bearer <token>'"
)


def load_validator(spec: str) -> TokenValidator:
    """WHISPER_TOKEN_VALIDATOR=module:function, imported once at start."""
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure stops start-up with one line
        raise ValueError(f"WHISPER_TOKEN_VALIDATOR={spec}: cannot import {module_name} ({exc.__class__.__name__}: {exc})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"WHISPER_TOKEN_VALIDATOR={spec}: {module_name} has no function {function_name}")
    return function


INVALID = "invalid, expired or revoked token"


class Authenticator:
    """Checks the Bearer token; with a `guard`, failed checks are remembered and rate-limited (authguard.py)."""

    def __init__(self, enabled: bool, validate: TokenValidator = accept_any_token,
                 none_exist: Callable[[], Awaitable[bool]] | None = None, guard: FailureGuard | None = None,
                 prefix_of: Callable[[str], str | None] | None = None,
                 verified_before: Callable[[bytes], bool] | None = None) -> None:
        self.enabled = enabled
        self.validate = validate
        self.none_exist = none_exist  # tells a refused caller that no token has been made yet
        self.guard = guard
        self.prefix_of = prefix_of or (lambda token: None)
        self.verified_before = verified_before or (lambda digest: False)

    async def identify(self, header: str | None, address: str | None = None) -> Identity:
        """The caller's identity; AuthError (401) or Throttled (429) otherwise."""
        if not self.enabled:
            return ANONYMOUS
        try:
            return await self._identify(header, address)
        except AuthError:
            if self.none_exist is not None and await self.none_exist():
                raise AuthError(NO_TOKENS) from None
            raise

    async def _identify(self, header: str | None, address: str | None) -> Identity:
        token = bearer_token(header)
        digest = token_digest(token)
        prefix = self.prefix_of(token)
        if self.guard is not None and self.guard.recently_failed(digest):
            metrics.auth_refused("remembered")
            raise AuthError(INVALID)
        spent = False
        if self.guard is not None and not self.verified_before(digest):
            try:
                self.guard.take(address, prefix)
            except Throttled:
                metrics.auth_refused("throttled")
                raise
            spent = True
        try:
            identity = self.validate(token)
            if inspect.isawaitable(identity):
                identity = await identity
        except BaseException:  # the check itself broke (a busy ledger): the caller did not fail it
            if spent:
                self.guard.give_back(address, prefix)
            raise
        if isinstance(identity, str) and identity:
            identity = Identity(identity)
        if identity is None:
            if self.guard is not None:
                self.guard.failed(digest)
            raise AuthError(INVALID)
        if spent:
            self.guard.give_back(address, prefix)
        if not isinstance(identity, Identity):
            raise TypeError(f"the token validator returned {type(identity).__name__}, not an Identity, a name or None")
        return identity
