"""Webhooks: when a job ends, POST a signed JSON notice to its callback_url, retrying with backoff.

Delivery runs on the IOLoop (Tornado's AsyncHTTPClient) and never blocks a request. Every
attempt is a job_events row: webhook-delivered, webhook-retry, webhook-failed or
webhook-refused, with the URL shown without its query (it may hold the receiver's token).
A notice not delivered or given up when the server stops or dies is sent again at its next
start (ledger.prepare marks it webhook-pending; one worker claims it): at least once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import uuid
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

from tornado.httpclient import HTTPRequest
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from .clock import wall_time
from .config import Config
from .jobs import Job
from .ledger import Ledger
from .urlpolicy import CheckingResolver, HostPolicy, PolicyError, check_url, resolve_checked

log = logging.getLogger("whisperd.webhooks")
SIGNATURE_HEADER = "X-Whisperd-Signature"
TIMESTAMP_HEADER = "X-Whisperd-Timestamp"
STOP_GRACE_SECONDS = 2.0  # at shutdown, a delivery already under way may finish this long
MAX_RESPONSE_BYTES = 1024 * 1024  # read and dropped: only the receiver's status code matters
REMEMBERED_JOBS = 10_000


def sign(secret: bytes, body: bytes) -> str:
    """The X-Whisperd-Signature value: HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def shown_url(url: str) -> str:
    """scheme://host:port/path: enough to tell where it went, without a token in the query."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path or '/'}"


def _discard(_chunk: bytes) -> None:
    pass


class WebhookSender:
    def __init__(self, config: Config, ledger: Ledger) -> None:
        self.ledger = ledger
        self.policy = HostPolicy.parse(config.WHISPER_WEBHOOK_ALLOWED_HOSTS)
        self.secret = (config.WHISPER_WEBHOOK_SECRET or "").encode("utf-8")
        self.max_attempts = config.WHISPER_WEBHOOK_MAX_ATTEMPTS
        self.backoff = config.WHISPER_WEBHOOK_BACKOFF_SECONDS
        self.timeout = config.WHISPER_WEBHOOK_TIMEOUT_SECONDS
        self._client: SimpleAsyncHTTPClient | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._started: OrderedDict[str, None] = OrderedDict()  # recent ids: a job's end is sent once

    @property
    def enabled(self) -> bool:
        return bool(self.secret)

    async def check_destination(self, url: str) -> None:
        """At submission: PolicyError (a 400) when the URL or its host may not be called."""
        _scheme, host, port = check_url(url)
        try:
            await resolve_checked(self.policy, host, port)
        except OSError as exc:
            raise PolicyError(str(exc)) from None

    def job_ended(self, job: Job) -> None:
        """Start delivering the job's end, once per job in this process."""
        if not job.callback_url or not self.enabled or job.id in self._started:
            return
        self._started[job.id] = None
        if len(self._started) > REMEMBERED_JOBS:
            self._started.popitem(last=False)
        task = asyncio.ensure_future(self._deliver(job))
        self._tasks[job.id] = task
        task.add_done_callback(lambda _t, job_id=job.id: self._tasks.pop(job_id, None))

    async def resume(self, jobs: list[Job]) -> None:
        """Notices a previous run left unsent (the start marked them pending)."""
        for job in jobs:
            if self.enabled:
                self.job_ended(job)
            else:
                await self._record(job, "webhook-failed", "not sent: WHISPER_WEBHOOK_SECRET is no longer set")

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_GRACE_SECONDS)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            self._client.close()

    def _http(self) -> SimpleAsyncHTTPClient:
        if self._client is None:
            # Its own instance: the shared client would not connect through our resolver.
            self._client = SimpleAsyncHTTPClient(force_instance=True, resolver=CheckingResolver(policy=self.policy),
                                                 max_body_size=MAX_RESPONSE_BYTES)
        return self._client

    def _payload(self, job: Job, attempt: int, delivery: str) -> tuple[bytes, dict[str, str]]:
        stamp = str(int(wall_time()))
        body: dict[str, Any] = {
            "event": "job.finished",
            "job_id": job.id,
            "status": job.status,
            "status_url": f"/transcription/{job.id}",
            "result_url": f"/transcription/{job.id}/result" if job.status == "Completed" else None,
            "error": None if job.status == "Completed" else job.error,
            "warnings": job.warnings,
            "finished_at": job.finished_at,
            # The timestamp is inside the signed body too, so a replay cannot freshen it.
            "timestamp": int(stamp),
            "delivery_id": delivery,
            "attempt": attempt,
        }
        raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "whisperd-webhook/1",
            "X-Whisperd-Event": "job.finished",
            "X-Whisperd-Delivery": delivery,
            TIMESTAMP_HEADER: stamp,
            SIGNATURE_HEADER: sign(self.secret, raw),
        }
        return raw, headers

    async def _deliver(self, job: Job) -> None:
        where = shown_url(job.callback_url or "")
        delivery = str(uuid.uuid4())  # the same for every attempt: receivers can drop repeats
        try:
            for attempt in range(1, self.max_attempts + 1):
                body, headers = self._payload(job, attempt, delivery)
                request = HTTPRequest(
                    job.callback_url, method="POST", body=body, headers=headers, follow_redirects=False,
                    connect_timeout=self.timeout, request_timeout=self.timeout,
                    streaming_callback=_discard,
                )
                of = f"attempt {attempt} of {self.max_attempts} to {where}"
                try:
                    response = await self._http().fetch(request, raise_error=False)
                except PolicyError as exc:
                    # The host now resolves somewhere it may not go (DNS rebinding): final.
                    await self._record(job, "webhook-refused", f"{of}: {exc}")
                    return
                except Exception as exc:  # connection refused, reset, timeout, DNS: worth retrying
                    outcome = f"network error ({exc.__class__.__name__}: {str(exc)[:200]})"
                    retry = True
                else:
                    outcome = f"HTTP {response.code}"
                    if 200 <= response.code < 300:
                        await self._record(job, "webhook-delivered", f"{of}: {outcome}")
                        return
                    retry = response.code >= 500 or response.code == 599
                if not retry or attempt == self.max_attempts:
                    why = "not retried (a 4xx or 3xx answer)" if not retry else "no attempts left"
                    await self._record(job, "webhook-failed", f"{of}: {outcome}; {why}")
                    return
                delay = self.backoff * 2 ** (attempt - 1)
                await self._record(job, "webhook-retry", f"{of}: {outcome}; next attempt in {delay:g} s")
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            # Not final: the next start finds no webhook-delivered/failed row and sends it again.
            await self._record(job, "webhook-interrupted", f"to {where}: the server stopped; the notice is sent again at the next start")
        except Exception:
            log.exception("job %s: webhook delivery broke", job.id)

    async def _record(self, job: Job, event: str, detail: str) -> None:
        level = logging.INFO if event == "webhook-delivered" else logging.WARNING
        log.log(level, "job %s: %s: %s", job.id, event, detail)
        try:
            await self.ledger.add_event(job.id, event, detail)
        except Exception:  # the ledger is closing; the log line above is the record
            log.warning("job %s: could not record %s in the ledger", job.id, event)
