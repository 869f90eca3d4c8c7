"""The base handler: auth once in prepare(), CORS preflight, and every error as JSON."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from tornado.web import HTTPError, RequestHandler

from ..auth import AuthError, Identity
from ..ledger import LedgerBusy, LedgerUnavailable
from ..service import Service

log = logging.getLogger("whisperd.http")


class ApiError(HTTPError):
    """An error answered as {"error": message}; the message is written for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, reason=HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else None)
        self.message = message
        self.headers = headers or {}


class BaseHandler(RequestHandler):
    allowed_methods = ("OPTIONS", "GET")
    requires_auth = True
    identity: Identity

    def initialize(self, service: Service) -> None:
        self.service = service

    def set_default_headers(self) -> None:
        # Bearer tokens, not cookies, carry the credentials: any origin may call.
        self.set_header("Access-Control-Allow-Origin", "*")
        self.set_header("Cache-Control", "no-store")

    async def prepare(self) -> None:
        if self.request.method == "OPTIONS" or not self.requires_auth:
            return
        try:
            self.identity = await self.service.auth.identify(self.request.headers.get("Authorization"))
        except AuthError as exc:
            raise ApiError(401, str(exc), {"WWW-Authenticate": 'Bearer realm="whisperd"'}) from None

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

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            message = exc.message
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif isinstance(exc, LedgerBusy):
            # Held past the wait limit by someone else (an operator's sqlite3 session, say).
            self.set_status(503)
            self.set_header("Retry-After", "5")
            message = "the job ledger is busy; try again in a moment"
        elif isinstance(exc, LedgerUnavailable):
            # The shared database is away (restarting, network): the request may be tried again.
            self.set_status(503)
            self.set_header("Retry-After", "5")
            message = "the job ledger is unavailable; try again in a moment"
        elif status_code == 405:
            message = f"method {self.request.method} is not allowed here; allowed: {', '.join(self.allowed_methods)}"
            self.set_header("Allow", ", ".join(self.allowed_methods))
        elif status_code >= 500:
            message = "internal server error (see the server log)"
        else:
            message = self._reason or HTTPStatus(status_code).phrase
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(self.error_body(message, exc), ensure_ascii=False))

    def error_body(self, message: str, exc: BaseException | None) -> dict[str, Any]:
        """The JSON of an error; the OpenAI-compatible handlers answer in OpenAI's shape instead."""
        return {"error": message}

    def job_or_404(self, job, job_id: str):
        """Unknown jobs and jobs of other identities look the same: 404."""
        if job is None or not self.identity.may_see(job.owner):
            raise ApiError(404, f"no job with id {job_id!r}")
        return job


class NotFoundHandler(BaseHandler):
    requires_auth = False

    def prepare(self) -> None:
        raise ApiError(404, f"no such endpoint: {self.request.path}; see the README for the API")
