"""The base handler: auth once in prepare(), CORS preflight, and every error as JSON."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from tornado.web import RequestHandler

from ..auth import AuthError, Identity
from ..authguard import Throttled
from ..errors import ServiceError
from ..service import Service

log = logging.getLogger("whisperd.http")


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
        self.service.requests_in_flight += 1
        if self.service.draining:
            raise ServiceError(503, "the server is shutting down; try again in a moment", {"Retry-After": "10"})

    async def prepare(self) -> None:
        self.begin()
        if self.request.method == "OPTIONS" or not self.requires_auth:
            return
        try:
            self.identity = await self.service.identify(self.request.headers.get("Authorization"),
                                                        self.request.remote_ip)
        except AuthError as exc:
            raise ServiceError(401, str(exc), {"WWW-Authenticate": 'Bearer realm="whisperd"'}) from None
        except Throttled as exc:
            raise ServiceError(429, str(exc), {"Retry-After": str(exc.retry_after)}) from None

    def on_finish(self) -> None:
        self._leave()

    def on_connection_close(self) -> None:
        self._leave()

    def _leave(self) -> None:
        if self._in_flight:
            self._in_flight = False
            self.service.requests_in_flight -= 1

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
        if isinstance(exc, ServiceError):
            self.set_status(exc.status)
            message = exc.message
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif status_code == 405:
            message = f"method {self.request.method} is not allowed here; allowed: {', '.join(self.allowed_methods)}"
            self.set_header("Allow", ", ".join(self.allowed_methods))
        elif exc is not None and (refusal := self.service.refusal_for(exc)) is not None:
            # faults: the job storage refused a write (read-only, full), or the database failed in
            # a way the ledger does not classify: the box's trouble, 503/507 with Retry-After.
            self.set_status(refusal.status)
            message = refusal.message
            for name, value in refusal.headers.items():
                self.set_header(name, value)
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
            raise ServiceError(404, f"no job with id {job_id!r}")
        return job


class NotFoundHandler(BaseHandler):
    requires_auth = False

    def prepare(self) -> None:
        raise ServiceError(404, f"no such endpoint: {self.request.path}; see /openapi.json for the API")
