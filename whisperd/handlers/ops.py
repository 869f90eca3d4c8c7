"""Operations endpoints: /health for load balancers, /metrics for Prometheus, /openapi.json."""

from __future__ import annotations

import asyncio
import ipaddress
import os
from pathlib import Path

from .. import metrics
from ..config import REPO_DIR
from ..errors import Kind, ServiceError
from .base import BaseHandler

OPENAPI_PATH = REPO_DIR / "openapi.json"
LEDGER_CHECK_SECONDS = 3.0


class HealthHandler(BaseHandler):
    requires_auth = False  # probes carry no token; the answer holds nothing secret
    # One probe at a time per process. It is never cancelled: a write cut off between BEGIN
    # and ROLLBACK would leave the shared writer connection inside a transaction.
    _probe: asyncio.Task | None = None

    async def get(self) -> None:
        checks = {"process": "ok", "ledger": "ok", "engine": "ok"}
        failing = None
        probe = HealthHandler._probe
        if probe is None or probe.done():
            # Kept by the class attribute; its error is the finding, read below.
            probe = HealthHandler._probe = asyncio.ensure_future(self.service.check_ledger_writable())
            probe.add_done_callback(lambda task: task.cancelled() or task.exception())
        try:
            await asyncio.wait_for(asyncio.shield(probe), LEDGER_CHECK_SECONDS)
        except asyncio.TimeoutError:
            checks["ledger"] = failing = f"ledger not writable: no write lock within {LEDGER_CHECK_SECONDS:g} s"
        except Exception as exc:  # any failure to write is the finding, whatever its kind
            checks["ledger"] = failing = f"ledger not writable: {exc.__class__.__name__}: {exc}"[:300]
        command = Path(self.service.config.WHISPER_CMD)
        if not self.service.config.runs_jobs:
            checks["engine"] = "not used (WHISPER_NODE_ROLE=api)"
        elif not command.is_file() or not os.access(command, os.X_OK):
            checks["engine"] = "engine command (WHISPER_CMD) is missing or not executable"
            failing = failing or checks["engine"]
        else:
            engine_ok, why = self.service.engine_healthy()
            if not engine_ok:
                checks["engine"] = f"engine worker cannot start: {why}"
                failing = failing or checks["engine"]
        storage = self.service.storage_problem()
        checks["storage"] = storage or "ok"
        failing = failing or storage
        problems = self.service.problems()
        if problems:
            checks["jobs"] = "; ".join(problems)[:1000]
            failing = failing or checks["jobs"]
        else:
            checks["jobs"] = "ok"
        if failing:
            self.send_json({"status": "fail", "error": failing, "checks": checks}, 503)
        else:
            self.send_json({"status": "ok", "checks": checks})


class MetricsHandler(BaseHandler):
    async def prepare(self) -> None:
        if self.service.config.WHISPER_METRICS_AUTH:
            await super().prepare()
            return
        self.begin()
        if self.request.method != "OPTIONS" and not _loopback(self.request.remote_ip):
            raise ServiceError(Kind.FORBIDDEN, "/metrics answers local callers only; set WHISPER_METRICS_AUTH=true "
                                "to scrape it from elsewhere with a Bearer token")

    async def get(self) -> None:
        counts = await self.service.status_counts()
        self.set_header("Content-Type", metrics.CONTENT_TYPE)
        self.finish(metrics.exposition(counts, self.service.engine_status()))


class OpenApiHandler(BaseHandler):
    requires_auth = False  # a client generator needs the document before it has a token
    _document: bytes | None = None

    def get(self) -> None:
        if OpenApiHandler._document is None:
            OpenApiHandler._document = OPENAPI_PATH.read_bytes()
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "public, max-age=300")
        self.finish(OpenApiHandler._document)


def _loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
