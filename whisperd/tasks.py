"""Background tasks that are kept (asyncio holds only weak references) and whose errors are logged."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Coroutine

log = logging.getLogger("whisperd.tasks")
_alive: set[asyncio.Task] = set()


def spawn(coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task:
    """Run `coro` in the background; a failure is logged with `what`, never lost."""
    task = asyncio.ensure_future(coro)
    _alive.add(task)

    def done(finished: asyncio.Task) -> None:
        _alive.discard(finished)
        if finished.cancelled():
            return
        exc = finished.exception()
        if exc is not None:
            log.error("background task failed: %s", what, exc_info=exc)

    task.add_done_callback(done)
    return task
