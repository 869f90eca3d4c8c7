"""GET /transcription/{id}/events: the job's status as server-sent events until it ends."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tornado.iostream import StreamClosedError

from ..jobs import Job
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
            current = await self.service.job(job.id)
            if current is None:  # rows are never deleted; a stream already under way just ends
                break
            body = _gone(current) or await status_body(self.service, current)
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
            if ended or self.service.draining:
                break
            await self.service.wait_change(job.id, POLL_SECONDS)
        if not self._closed:
            self.finish()
