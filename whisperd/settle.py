"""What a recovery report asks of this node, done in one place: stop the engines it names, remove
the files of the jobs it ended, count those ends.

A report comes from start-up (ledger.prepare), from a dead worker process's release
(ledger.release_worker, in the supervisor) or from a dead node's expired leases (nodes.py).
"""

from __future__ import annotations

import logging
from typing import Callable

from . import metrics
from .engines import kill_orphan_group
from .ledger import Recovery

log = logging.getLogger("whisperd")


def settle(report: Recovery, remove_files: Callable[[str], None], stop_engines: bool = True) -> list[str]:
    """Apply `report`; returns the jobs it ended (failed as poison, or canceled as asked).

    stop_engines=False for another node's report: its engine pids are that node's, not ours."""
    if stop_engines:
        for job_id, pid in report.engine_pids.items():
            if kill_orphan_group(pid, job_id):
                log.warning("stopped engine pid %d left running by a process that is gone (job %s)", pid, job_id)
    ended = report.poisoned + report.canceled
    for job_id in ended:  # ended just now: by the ledger's word, their files go
        remove_files(job_id)
    for _ in report.poisoned:
        metrics.job_finished("Failed", None)
    for _ in report.canceled:
        metrics.job_finished("Canceled", None)
    return ended
