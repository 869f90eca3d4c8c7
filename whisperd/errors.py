"""The one error a request can end in: an HTTP status and a message written for the client.

Whoever refuses something (a form rule, the upload reader, the service, a busy ledger) raises
ServiceError; the base handler answers every one the same way (handlers/base.py), so a status
is decided in one place and a message never leaks a path or a secret by accident.
"""

from __future__ import annotations


class ServiceError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
