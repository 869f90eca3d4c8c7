"""Wake-ups across nodes: every job event is a NOTIFY on one channel; each process LISTENs.

The payload is "<event>:<job id>" (accepted, started, completed, cancel-requested, progress,
...). LISTEN needs a connection of its own, never one lent by a pool: a pooled connection
goes back to the pool and its LISTEN with it. When that connection breaks, the listener
reconnects and tells its callback ("reconnected", None): whatever was missed meanwhile, the
1 s ticks and a fresh look catch up.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

log = logging.getLogger("whisperd.notify")
CHANNEL = "whisperd"
CHECK_SECONDS = 5.0  # a connection that died silently (no FIN) is found by a query this often
MAX_BACKOFF = 2.0


class Listener:
    def __init__(self, connect: Callable[[], Awaitable[Any]], callback: Callable[[str, str | None], None]) -> None:
        self._connect = connect
        self._callback = callback
        self._task: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _deliver(self, _conn, _pid, _channel, payload: str) -> None:
        event, _, job_id = payload.partition(":")
        try:
            self._callback(event, job_id or None)
        except Exception:  # a bug in one waiter must not stop the wake-ups of everyone else
            log.exception("notification handler failed")

    async def _run(self) -> None:
        backoff = 0.1
        first = True
        while not self._stopping:
            try:
                conn = await self._connect()
            except Exception as exc:  # the database is down or restarting: keep trying
                log.debug("listener cannot connect (%s); retrying", exc.__class__.__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = 0.1
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c: lost.set())
            try:
                await conn.add_listener(CHANNEL, self._deliver)
                if not first:
                    log.info("listening for other nodes' changes again")
                    self._callback("reconnected", None)
                first = False
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), CHECK_SECONDS)
                    except asyncio.TimeoutError:
                        await conn.fetchval("SELECT 1", timeout=CHECK_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lost the listening connection (%s); reconnecting", exc.__class__.__name__)
            finally:
                if not conn.is_closed():
                    conn.terminate()
