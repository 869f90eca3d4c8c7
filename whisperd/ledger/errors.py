"""The ledger's errors, the same whichever backend raised them."""


class LedgerError(Exception):
    """The ledger could not do what was asked (base class)."""


class LedgerUnavailable(LedgerError):
    """The ledger cannot be opened or is closed (start-up, shutdown, database gone)."""


class LedgerBusy(LedgerError):
    """Someone else held the ledger past the wait limit; the caller may try again shortly."""


class TokenNameTaken(LedgerError):
    """A token in force already has this name."""


class QuotaExceeded(LedgerError):
    """submit() with a Quota: the owner is over `limit` ("max_queued" or "max_audio_seconds"),
    having `used` (jobs active, or audio seconds since the quota's day start) before this job."""

    def __init__(self, limit: str, used: float) -> None:
        super().__init__(f"{limit} exceeded ({used:g} used)")
        self.limit = limit
        self.used = used
