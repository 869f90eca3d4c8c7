"""Several HTTP worker processes on one listening socket: fork them, forward stop signals, replace the dead."""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Callable

log = logging.getLogger("whisperd.supervisor")
MAX_RESTARTS_PER_MINUTE = 10


def run_workers(count: int, child_main: Callable[[int], int], on_child_died: Callable[[int], None]) -> int:
    """Runs child_main(i) in `count` forked processes until they have all exited; returns 0 or 1."""
    children: dict[int, int] = {}
    stopping = False
    restarts: list[float] = []

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                code = child_main(index)
            finally:
                os._exit(code)
        children[pid] = index

    def forward(signum: int, _frame) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                continue

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(count):
        spawn(index)
    failed = False
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        if index is None:
            continue
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if stopping:
            failed |= not clean
            continue
        how = f"exit status {os.WEXITSTATUS(status)}" if os.WIFEXITED(status) else f"signal {os.WTERMSIG(status)}"
        log.error("worker process %d ended unexpectedly (%s)", pid, how)
        on_child_died(pid)
        now = time.monotonic()
        restarts[:] = [t for t in restarts if now - t < 60] + [now]
        if len(restarts) > MAX_RESTARTS_PER_MINUTE:
            log.error("workers keep dying (%d restarts in a minute): stopping", len(restarts))
            forward(signal.SIGTERM, None)
            failed = True
            continue
        spawn(index)
    return 1 if failed else 0
