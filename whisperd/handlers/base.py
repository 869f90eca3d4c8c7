"""The base handler: auth once in prepare(), CORS preflight, and every error as JSON.

STATUS is the one place a refusal's Kind (errors.py) becomes an HTTP status and headers."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from tornado.web import RequestHandler

from ..identity.auth import Identity
from ..errors import Kind, ServiceError
from ..service import Service

log = logging.getLogger("whisperd.http")

# Every Kind of refusal and its HTTP status. A refusal with retry_after also gets Retry-After.
STATUS: dict[Kind, int] = {
    Kind.INVALID: 400,
    Kind.UNAUTHENTICATED: 401,
    Kind.FORBIDDEN: 403,
    Kind.NOT_FOUND: 404,
    Kind.TOO_SLOW: 408,
    Kind.CONFLICT: 409,
    Kind.GONE: 410,
    Kind.UNSUPPORTED_PROTOCOL: 412,
    Kind.TOO_LARGE: 413,
    Kind.UNSUPPORTED_MEDIA: 415,
    Kind.NO_RESULT: 422,
    Kind.LOCKED: 423,
    Kind.OVER_LIMIT: 429,
    Kind.CHECKSUM_MISMATCH: 460,  # tus's checksum extension
    Kind.CLIENT_LEFT: 499,  # nginx's word for it: never written, only counted
    Kind.INTERNAL: 500,
    Kind.UPSTREAM_FAILED: 502,
    Kind.UNAVAILABLE: 503,
    Kind.TIMED_OUT: 504,
    Kind.STORAGE_FULL: 507,
}
# Headers a Kind always carries, whoever raised it.
KIND_HEADERS: dict[Kind, dict[str, str]] = {
    Kind.UNAUTHENTICATED: {"WWW-Authenticate": 'Bearer realm="whisperd"'},
}


def status_of(error: ServiceError) -> int:
    return STATUS[error.kind]


def headers_of(error: ServiceError) -> dict[str, str]:
    """The refusal's headers: its Kind's, Retry-After when it says when, then the protocol's own."""
    headers = dict(KIND_HEADERS.get(error.kind, {}))
    if error.retry_after:
        headers["Retry-After"] = str(error.retry_after)
    headers.update(error.headers)
    return headers


class BaseHandler(RequestHandler):
    allowed_methods = ("OPTIONS", "GET")
    requires_auth = True
    identity: Identity
    _in_flight = False

    def initialize(self, service: Service) -> None:
        self.service = service

    def set_default_headers(self) -> None:
        # Bearer tokens, not cookies, carry the credentials: any origin may call.
        self.set_header("Access-Control-Allow-Origin", "*")
        self.set_header("Cache-Control", "no-store")

    def begin(self) -> None:
        """Count the request until it is finished or dropped (shutdown closes the ledger only
        when none is left), and refuse it with 503 while the server stops."""
        self._in_flight = True
        self.service.request_began()
        if self.service.draining:
            raise ServiceError(Kind.UNAVAILABLE, "the server is shutting down; try again in a moment", 10)

    async def prepare(self) -> None:
        self.begin()
        if self.request.method == "OPTIONS" or not self.requires_auth:
            return
        # AuthError and Throttled are ServiceErrors: write_error answers them (401, 429).
        self.identity = await self.service.identify(self.request.headers.get("Authorization"),
                                                    self.request.remote_ip)

    def on_finish(self) -> None:
        self._leave()

    def on_connection_close(self) -> None:
        self._leave()

    def _leave(self) -> None:
        if self._in_flight:
            self._in_flight = False
            self.service.request_ended()

    def options(self, *args: Any) -> None:
        methods = ", ".join(self.allowed_methods)
        self.set_header("Allow", methods)
        self.set_header("Access-Control-Allow-Methods", methods)
        self.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.set_header("Access-Control-Max-Age", "86400")
        self.set_status(200)
        self.finish()

    def send_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(body, ensure_ascii=False))

    def log_exception(self, typ, value, tb) -> None:  # type: ignore[override]
        if isinstance(value, ServiceError):
            return  # an answer, not a fault: the access log records its status
        super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if exc is not None and not isinstance(exc, ServiceError) and status_code != 405:
            # The job storage refused a write (read-only, full), or the database failed in a way
            # the ledger does not classify: the box's trouble, 503/507 with Retry-After.
            exc = self.service.refusal_for(exc) or exc
        if isinstance(exc, ServiceError):
            self.set_status(status_of(exc))
            message = exc.message
            for name, value in headers_of(exc).items():
                self.set_header(name, value)
        elif status_code == 405:
            message = f"method {self.request.method} is not allowed here; allowed: {', '.join(self.allowed_methods)}"
            self.set_header("Allow", ", ".join(self.allowed_methods))
        elif status_code >= 500:
            message = "internal server error (see the server log)"
        else:
            message = self._reason or HTTPStatus(status_code).phrase
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(self.error_body(message, exc), ensure_ascii=False))

    def answer_now(self, error: ServiceError) -> None:
        """Refuse while the body is still arriving (from data_received): the error goes out now."""
        self.send_error(status_of(error), exc_info=(type(error), error, None))

    def error_body(self, message: str, exc: BaseException | None) -> dict[str, Any]:
        """The JSON of an error; the OpenAI-compatible handlers answer in OpenAI's shape instead."""
        return {"error": message}

    def job_or_404(self, job, job_id: str):
        """Unknown jobs and jobs of other identities look the same: 404."""
        if job is None or not self.identity.may_see(job.owner):
            raise ServiceError(Kind.NOT_FOUND, f"no job with id {job_id!r}")
        return job


class NotFoundHandler(BaseHandler):
    requires_auth = False

    def prepare(self) -> None:
        raise ServiceError(Kind.NOT_FOUND, f"no such endpoint: {self.request.path}; see /openapi.json for the API")
