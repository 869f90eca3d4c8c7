"""Running jobs' segments as the engine produces them, to whoever in this process listens (stream=true).

The warm engine worker writes a `segment` event per chunk of text it decodes; the engine that
reads that event in this process (engines/worker.py, or engines/shared.py's client relaying the
engine host's) publishes it here under the job's id, and a `stream=true` handler waiting on that
job in this same process listens. Nothing is kept: a segment nobody listens to is dropped, and a
listener that missed some (the job ran in another process or node, or on the CLI engine, which
gives its text only at the end) gets the rest of the text from the job's result when it ends.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

Listener = Callable[[int, str], None]  # (the segment's index in the job, its text)


class SegmentFeed:
    def __init__(self) -> None:
        self._listeners: dict[str, list[Listener]] = {}

    @contextlib.contextmanager
    def listen(self, job_id: str, listener: Listener) -> Iterator[None]:
        self._listeners.setdefault(job_id, []).append(listener)
        try:
            yield
        finally:
            listeners = self._listeners.get(job_id, [])
            if listener in listeners:
                listeners.remove(listener)
            if not listeners:
                self._listeners.pop(job_id, None)

    def listened(self, job_id: str) -> bool:
        return job_id in self._listeners

    def publish(self, job_id: str, index: int, text: str) -> None:
        for listener in list(self._listeners.get(job_id, ())):
            listener(index, text)


FEED = SegmentFeed()  # one per process: the engines publish where that process's handlers listen
