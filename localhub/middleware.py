"""ASGI middleware: the request log and fault injection.

Both are plain ASGI (not Starlette's BaseHTTPMiddleware) so streamed downloads pass through untouched.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from localhub.auth import InvalidToken, Users

logger = logging.getLogger("localhub")

# scope key where the log middleware leaves the caller for the app: a User, None (anonymous) or INVALID.
USER_KEY = "localhub.user"
INVALID = object()


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class RequestLog:
    """Appends `METHOD PATH STATUS user=<name or ->` to `<root>/requests.log` and logs it.

    PATH is the raw (percent-encoded) path without the query string: it never contains spaces, so a
    line splits cleanly, and query strings (which carry LFS upload tickets) stay out of the log.
    Tokens never appear: only the resolved user name is written.
    """

    def __init__(self, app, root: Path, users: Users):
        self.app = app
        self.path = Path(root) / "requests.log"
        self.users = users
        self._lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            user = self.users.from_authorization(_header(scope, b"authorization"))
        except InvalidToken:
            user = INVALID
        scope[USER_KEY] = user
        logged = False

        def write(status: int) -> None:
            raw = scope.get("raw_path") or scope["path"].encode()
            name = user.name if user not in (None, INVALID) else "-"
            line = f"{scope['method']} {raw.decode('latin-1')} {status} user={name}"
            logger.info(line)
            with self._lock, open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")

        async def send_wrapper(message):
            nonlocal logged
            # Log before the response leaves: once a client has its answer, the line is on disk.
            if message["type"] == "http.response.start" and not logged:
                logged = True
                write(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not logged:  # the app failed before answering; uvicorn will send a 500
                write(500)


@dataclass
class Fault:
    """Fail the next `times` requests matching method and path regex with `status`."""

    method: str
    path_regex: str
    status: int
    times: int

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and self.method in ("*", method) and re.search(self.path_regex, path) is not None


class FaultInjector:
    """Holds the armed faults and answers matching requests with an error before they reach the app.

    Faults match against the decoded path (what a human writes a regex for) and are consumed in order.
    """

    def __init__(self, app):
        self.app = app
        self.faults: list[Fault] = []
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> None:
        re.compile(fault.path_regex)  # fail on a bad regex now, not on the next request
        with self._lock:
            self.faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [dict(f.__dict__) for f in self.faults if f.times > 0]

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.matches(method, path):
                    f.times -= 1
                    return f
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith("/_localhub/"):
            return await self.app(scope, receive, send)
        fault = self._take(scope["method"], scope["path"])
        if fault is None:
            return await self.app(scope, receive, send)
        # Read the request body first so the connection stays usable for the client's next request.
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False) and message["type"] == "http.request"
        body = json.dumps({"error": "injected fault"}).encode()
        await send({
            "type": "http.response.start",
            "status": fault.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-error-message", b"injected fault"),
            ],
        })
        await send({"type": "http.response.body", "body": body if scope["method"] != "HEAD" else b""})
