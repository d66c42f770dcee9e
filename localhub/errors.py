"""The one exception type handlers raise; app.py turns it into a Hub-style error response."""

from __future__ import annotations


class HubError(Exception):
    """An error answer: HTTP status, optional `X-Error-Code`, and a message.

    The client maps `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) to typed
    exceptions and shows `X-Error-Message`; both go in headers because HEAD responses have no body.
    """

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
