"""GET /transcription/{id}/events: the job's status as server-sent events until it ends."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tornado.iostream import StreamClosedError

from ..errors import ServiceError
from ..jobs import Job
from ..ledger import LedgerError
from .base import BaseHandler
from .transcription import status_body

# Progress is written to the ledger (at most once a second) by whichever worker runs the job,
# so a stream served by another worker has to look; an end in this worker wakes it at once.
POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0  # a comment line now and then keeps proxies from closing an idle stream


def _gone(job: Job) -> dict[str, Any] | None:
    """The last event of a job GET /transcription/{id} answers with 410."""
    if job.status == "Canceled":
        return {"status": "Canceled", "data": f"job {job.id} was canceled at {job.finished_at}"}
    if job.expired_at:
        return {"status": job.status, "data": f"job {job.id} expired at {job.expired_at}; its files are deleted"}
    return None


class JobEventsHandler(BaseHandler):
    allowed_methods = ("OPTIONS", "GET")
    _closed = False

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self._closed = True

    async def get(self, job_id: str) -> None:
        job = self.job_or_404(await self.service.job(job_id), job_id)
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("X-Accel-Buffering", "no")  # nginx would otherwise hold events back
        loop = asyncio.get_running_loop()
        last: dict[str, Any] | None = None
        number = 0
        quiet_since = loop.time()
        while not self._closed:
            try:
                current = await self.service.job(job.id)
                if current is None:  # rows are never deleted; a stream already under way just ends
                    break
                body = _gone(current) or await status_body(self.service, current)
            except (LedgerError, ServiceError):  # the ledger stayed away past its retries
                self._end(number + 1, job.id, last, "the job ledger is unavailable; the job goes on: "
                                                    "reconnect in a moment, or poll status_url")
                return
            ended = current.finished or current.expired_at is not None
            if body != last:
                number += 1
                self.write(f"id: {number}\nevent: status\ndata: {json.dumps(body, ensure_ascii=False)}\n\n")
                last, quiet_since = body, loop.time()
            elif loop.time() - quiet_since >= KEEPALIVE_SECONDS:
                self.write(": keep-alive\n\n")
                quiet_since = loop.time()
            try:
                await self.flush()
            except StreamClosedError:
                return
            if ended:
                break
            if self.service.draining:
                self._end(number + 1, job.id, last, "the server is shutting down; the job goes on: reconnect in a "
                                                    "moment, or poll status_url")
                return
            await self.service.wait_change(job.id, POLL_SECONDS)
        if not self._closed:
            self.finish()

    def _end(self, number: int, job_id: str, last: dict[str, Any] | None, reason: str) -> None:
        """A stream that stops before its job ends says why in a last `end` event (EventSource
        clients would otherwise reconnect without knowing the job is fine)."""
        if self._closed:
            return
        body = {"job_id": job_id, "status_url": f"/transcription/{job_id}",
                "status": (last or {}).get("status"), "reason": reason}
        self.write(f"id: {number}\nevent: end\ndata: {json.dumps(body, ensure_ascii=False)}\n\n")
        self.finish()
