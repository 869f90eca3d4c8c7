"""What start-up (or a dead worker's release) found in the ledger and took back."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Recovery:
    requeued: list[str] = field(default_factory=list)
    poisoned: list[str] = field(default_factory=list)
    live_jobs: set[str] = field(default_factory=set)
    engine_pids: dict[str, int] = field(default_factory=dict)
    webhooks_pending: list[str] = field(default_factory=list)
    live_tokens: int = 0
    canceled: list[str] = field(default_factory=list)  # cancel asked before the crash: ended Canceled
    job_rows: int = 0  # every job the ledger knows, ended or not (a reset ledger has none)
