"""This process's open live sessions: the box-wide and per-token limits, revocation, graceful stop."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

_by_service: "weakref.WeakKeyDictionary[Any, set[Any]]" = weakref.WeakKeyDictionary()


def sessions(service: Any) -> set[Any]:
    """The open session handlers of this service (each has .identity and .finish_and_close())."""
    return _by_service.setdefault(service, set())


def count_for(service: Any, name: str) -> int:
    return sum(1 for handler in sessions(service) if handler.identity.name == name)


async def drain(service: Any, timeout: float) -> None:
    """SIGTERM: every session commits its open utterance, gets its completed transcripts, and is
    closed with 1001 (going away). Called before the engine stops."""
    open_now = list(sessions(service))
    if open_now:
        await asyncio.wait([asyncio.ensure_future(handler.finish_and_close(timeout)) for handler in open_now],
                           timeout=timeout + 1)
