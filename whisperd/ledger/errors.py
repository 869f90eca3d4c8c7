"""The ledger's errors, the same whichever backend raised them."""


class LedgerError(Exception):
    """The ledger could not do what was asked (base class)."""


class LedgerUnavailable(LedgerError):
    """The ledger cannot be opened or is closed (start-up, shutdown, database gone)."""


class LedgerBusy(LedgerError):
    """Someone else held the ledger past the wait limit; the caller may try again shortly."""


class TokenNameTaken(LedgerError):
    """A token in force already has this name."""
