"""The ledger's errors, the same whichever backend raised them."""

from ..errors import Kind, ServiceError


class LedgerError(Exception):
    """The ledger could not do what was asked (base class)."""


class LedgerUnavailable(LedgerError, ServiceError):
    """The ledger cannot be opened or is closed (start-up, shutdown, database gone).

    str() is the detail, for the log and the command line; a client gets Kind.UNAVAILABLE without
    it (it may name a path), and may try again or another instance."""

    transient = False  # True: the ledger is open but its database is away for now (PostgreSQL)

    def __init__(self, detail: str) -> None:
        ServiceError.__init__(self, Kind.UNAVAILABLE, "the job ledger is not available (the server is stopping?); "
                                                      "try again in a moment", 10)
        self.args = (detail,)

    def __str__(self) -> str:
        return self.args[0]


class LedgerBusy(LedgerError, ServiceError):
    """Someone else held the ledger past the wait limit (an operator's sqlite3 session, say).

    To a client that is the service being briefly unavailable, whichever request ran into it:
    so it is a ServiceError (Kind.UNAVAILABLE), and the handlers answer it like any other."""

    def __init__(self) -> None:
        ServiceError.__init__(self, Kind.UNAVAILABLE, "the job ledger is busy; try again in a moment", 5)


class TokenNameTaken(LedgerError):
    """A token in force already has this name."""


class QuotaExceeded(LedgerError):
    """submit() with a Quota: the owner is over `limit` ("max_queued" or "max_audio_seconds"),
    having `used` (jobs active, or audio seconds since the quota's day start) before this job."""

    def __init__(self, limit: str, used: float) -> None:
        super().__init__(f"{limit} exceeded ({used:g} used)")
        self.limit = limit
        self.used = used


class UploadUnusable(LedgerError):
    """submit() with an upload_id: that upload is not finished, expired, or already became a job;
    the job was not inserted either."""

    def __init__(self, upload_id: str) -> None:
        super().__init__(f"upload {upload_id} cannot become this job (used, unfinished or expired)")
        self.upload_id = upload_id
