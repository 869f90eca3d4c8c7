"""Named crash points for the fault-injection tests: WHISPERD_CRASH_AT=<point> kills the process there.

Each point sits between two steps whose order matters for durability (a file moved but its row
not yet written, a row marked but its files not yet removed, ...). Unset, it costs a dict lookup.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "upload-committed",   # upload renamed into place, job row not written yet
    "job-accepted",       # job row committed, 202 not sent yet
    "engine-started",     # engine running, nothing recorded about its end
    "result-sent",        # result written to the client, delivery not recorded yet
    "delivery-recorded",  # delivery recorded, files not removed yet
    "retention-marked",   # jobs marked expired, files not removed yet
)


def crash_point(name: str) -> None:
    if os.environ.get("WHISPERD_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# Named failure points: WHISPERD_FAIL_AT=<point> raises there, as an unexpected bug would; the
# tests check that nothing is left half-done behind it.
FAIL_POINTS = (
    "intake-done",  # upload decoded into its canonical file, job not submitted yet
    "engine-pid",   # the engine started; recording its pid raises as an unclassified database error would
    "ledger-submit",  # the job's row is about to be written; the ledger raises as an unclassified error would
)


class InjectedFault(RuntimeError):
    """Raised at a fail point (tests only)."""


def fail_point(name: str) -> None:
    if os.environ.get("WHISPERD_FAIL_AT") == name:
        raise InjectedFault(f"injected failure at {name}")
