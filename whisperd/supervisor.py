"""Several HTTP worker processes on one listening socket: fork them, forward stop signals, replace the dead.

With a warm engine, one more child runs the engine host (engines/shared.py): the box's one engine
worker, which the HTTP processes reach over a local socket. It starts first, is replaced like
the others when it dies, and is stopped last, once every HTTP process has finished its jobs.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Callable

from . import clock

log = logging.getLogger("whisperd.supervisor")
MAX_RESTARTS_PER_MINUTE = 10


ENGINE_HOST = -1  # the engine host's index among the children


def run_workers(count: int, child_main: Callable[[int], int], on_child_died: Callable[[int], None],
                engine_host: Callable[[], int] | None = None) -> int:
    """Runs child_main(i) in `count` forked processes (and engine_host() in one more, if given)
    until they have all exited; returns 0 or 1."""
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
                code = engine_host() if index == ENGINE_HOST else child_main(index)
            finally:
                os._exit(code)
        children[pid] = index

    def signal_children(signum: int, host: bool) -> None:
        for pid, index in list(children.items()):
            if (index == ENGINE_HOST) == host:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    continue

    stop_signal = signal.SIGTERM

    def forward(signum: int, _frame) -> None:
        nonlocal stopping, stop_signal
        stopping, stop_signal = True, signum
        signal_children(signum, host=False)  # the engine host goes once they are done
        if not any(index != ENGINE_HOST for index in children.values()):
            signal_children(signum, host=True)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if engine_host is not None:
        spawn(ENGINE_HOST)
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
            if not any(i != ENGINE_HOST for i in children.values()):
                signal_children(stop_signal, host=True)
            continue
        how = f"exit status {os.WEXITSTATUS(status)}" if os.WIFEXITED(status) else f"signal {os.WTERMSIG(status)}"
        log.error("%s process %d ended unexpectedly (%s)", "engine host" if index == ENGINE_HOST else "worker",
                  pid, how)
        on_child_died(pid)
        now = clock.monotonic()
        restarts[:] = [t for t in restarts if now - t < 60] + [now]
        if len(restarts) > MAX_RESTARTS_PER_MINUTE:
            log.error("workers keep dying (%d restarts in a minute): stopping", len(restarts))
            forward(signal.SIGTERM, None)
            failed = True
            continue
        spawn(index)
    return 1 if failed else 0
