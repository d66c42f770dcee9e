"""ASGI middleware: the request log and fault injection.

Both are plain ASGI (not Starlette's BaseHTTPMiddleware) so streamed downloads pass through untouched.

Fault kinds (what a flaky Hub does to a client), each armed for the next `times` matching requests:

- ``status``: answer `status` (with `Retry-After` when `retry_after` is set) before the app sees the
  request: a rate limit or an overloaded front end; nothing happens server-side.
- ``after``: the app handles the request (a commit or a tag lands), the client gets `status` instead of
  the app's answer: a change that happened although the client was told it failed.
- ``reset``: the app answers, and the connection is closed after `after_bytes` bytes of the response body
  (a download cut mid-file).
- ``cut``: the request body is cut after `after_bytes` bytes: the app sees the client go away (an upload
  never completes) and the client sees the connection closed without an answer.
- ``slow``: nothing is answered for `delay_s` seconds, or until the client gives up, whichever is first;
  then the app answers (to a client that is still there).
- ``hook`` (in-process only, not over HTTP): `hook()` runs in a worker thread, then the request goes on
  untouched — a test's way to change the world (fill a disk) at one exact point of a client's run.

Closing a connection without completing the answer: uvicorn (h11) closes the transport when the ASGI
callable returns a value other than None, and logs one error line naming it (CLOSED below). ASGI has no
"abort" message, and this is the one path that drops a connection whether or not an answer started.
The request log writes such a request with status 499 (nginx's "closed without an answer").
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from localhub.auth import InvalidToken, Users

logger = logging.getLogger("localhub")

# scope key where the log middleware leaves the caller for the app: a User, None (anonymous) or INVALID.
USER_KEY = "localhub.user"
INVALID = object()
# scope key the fault injector sets when it closed the connection without a complete answer.
CLOSED_KEY = "localhub.closed"
CLOSED_STATUS = 499


class _Closed:
    """Returned by the ASGI callable to make uvicorn close the connection (see the module docstring)."""

    def __repr__(self) -> str:
        return "localhub fault injection: connection closed on purpose"

    __str__ = __repr__


CLOSED = _Closed()


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
            # The inner result is passed on: CLOSED asks uvicorn to drop the connection.
            return await self.app(scope, receive, send_wrapper)
        finally:
            if not logged:  # no answer started: closed on purpose, or the app failed (uvicorn sends 500)
                write(CLOSED_STATUS if scope.get(CLOSED_KEY) else 500)


KINDS = ("status", "after", "reset", "cut", "slow", "hook")


@dataclass
class Fault:
    """One armed fault: the next `times` requests matching method and path regex get `kind` (see module doc).

    Args:
        method: HTTP method, or "*" for any.
        path_regex: searched in the decoded path.
        status: the status answered (kinds ``status`` and ``after``).
        times: how many matching requests it applies to.
        kind: one of KINDS.
        after_bytes: ``reset``: response body bytes sent before the close; ``cut``: request body bytes
            the app gets before the client "goes away".
        retry_after: ``status``: seconds for a Retry-After header.
        delay_s: ``slow``: the longest time the answer is held.
        hook: ``hook``: called (in a worker thread) before the request goes on; in-process only.
        ranged: None matches any request; True only those with a Range header (a resumed download,
            a safetensors header read), False only those without (a whole-file download).
    """

    method: str
    path_regex: str
    status: int = 500
    times: int = 1
    kind: str = "status"
    after_bytes: int = 0
    retry_after: Optional[int] = None
    delay_s: float = 0.0
    hook: Optional[Callable[[], None]] = field(default=None, repr=False, compare=False)
    ranged: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.kind == "hook" and self.hook is None:
            raise ValueError("a 'hook' fault needs a callable (in-process only)")
        if self.times < 0 or self.after_bytes < 0 or self.delay_s < 0:
            raise ValueError("times, after_bytes and delay_s must not be negative")

    def matches(self, method: str, path: str, ranged: bool = False) -> bool:
        return (self.times > 0 and self.method in ("*", method) and self.ranged in (None, ranged)
                and re.search(self.path_regex, path) is not None)

    def describe(self) -> dict:
        """The fault as JSON (the hook shown as a flag)."""
        d = {k: v for k, v in self.__dict__.items() if k != "hook"}
        d["hook"] = self.hook is not None
        return d


class FaultInjector:
    """Holds the armed faults, applies them to matching requests, and counts what happened.

    Faults match against the decoded path (what a human writes a regex for) and are consumed in order.
    Counters (`stats`): every fault that fired (kind, method, path, status, time), and the body bytes
    sent and received per `METHOD PATH` for every request — what a test needs to say how many bytes a
    client fetched twice. Admin paths (/_localhub/) are neither faulted nor counted.
    """

    def __init__(self, app):
        self.app = app
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._fired: list[dict] = []
        self._sent: dict[str, int] = {}
        self._received: dict[str, int] = {}
        self._arrivals: list[tuple[float, str]] = []

    def add(self, fault: Fault) -> None:
        re.compile(fault.path_regex)  # fail on a bad regex now, not on the next request
        with self._lock:
            self.faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [f.describe() for f in self.faults if f.times > 0]

    def stats(self) -> dict:
        """What happened since the last reset.

        Returns:
            {"fired": [{kind, method, path, status, at}], "bytes_sent": {"GET /p": n},
            "bytes_received": {"PUT /p": n}, "arrivals": [{"at", "line"}]}; `at` is
            time.monotonic() in the server's process (the tests' own, for an in-process hub).
        """
        with self._lock:
            return {"fired": [dict(f) for f in self._fired], "bytes_sent": dict(self._sent),
                    "bytes_received": dict(self._received),
                    "arrivals": [{"at": at, "line": line} for at, line in self._arrivals]}

    def reset_stats(self) -> None:
        with self._lock:
            self._fired.clear()
            self._sent.clear()
            self._received.clear()
            self._arrivals.clear()

    def _take(self, method: str, path: str, ranged: bool) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.matches(method, path, ranged):
                    f.times -= 1
                    self._fired.append({"kind": f.kind, "method": method, "path": path,
                                        "status": f.status if f.kind in ("status", "after") else None,
                                        "at": time.monotonic()})
                    return f
        return None

    def _count(self, table: dict, key: str, n: int) -> None:
        if n:
            with self._lock:
                table[key] = table.get(key, 0) + n

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith("/_localhub/"):
            return await self.app(scope, receive, send)
        key = f"{scope['method']} {scope['path']}"
        with self._lock:
            self._arrivals.append((time.monotonic(), key))

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                self._count(self._received, key, len(message.get("body", b"")))
            return message

        async def counted_send(message):
            if message["type"] == "http.response.body":
                self._count(self._sent, key, len(message.get("body", b"")))
            await send(message)

        fault = self._take(scope["method"], scope["path"], _header(scope, b"range") is not None)
        if fault is None:
            return await self.app(scope, counted_receive, counted_send)
        # The injected answers go out uncounted: the counters say what the app itself sent.
        return await getattr(self, f"_{fault.kind}")(fault, scope, counted_receive, counted_send, send)

    # ---- the kinds

    @staticmethod
    async def _read_body(receive) -> list[dict]:
        messages, more = [], True
        while more:
            message = await receive()
            messages.append(message)
            more = message["type"] == "http.request" and message.get("more_body", False)
        return messages

    @staticmethod
    async def _answer(scope, send, fault: Fault) -> None:
        body = json.dumps({"error": "injected fault"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"x-error-message", b"injected fault")]
        if fault.retry_after is not None:
            headers.append((b"retry-after", str(fault.retry_after).encode()))
        await send({"type": "http.response.start", "status": fault.status, "headers": headers})
        await send({"type": "http.response.body", "body": body if scope["method"] != "HEAD" else b""})

    async def _status(self, fault, scope, receive, send, raw_send):
        # Read the request body first so the connection stays usable for the client's next request.
        await self._read_body(receive)
        await self._answer(scope, raw_send, fault)

    async def _after(self, fault, scope, receive, send, raw_send):
        async def swallow(message):  # the app's own answer never reaches the client
            pass

        await self.app(scope, receive, swallow)
        await self._answer(scope, raw_send, fault)

    async def _reset(self, fault, scope, receive, send, raw_send):
        sent, cut = 0, False

        async def cutting_send(message):
            nonlocal sent, cut
            if cut:
                return
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                room = fault.after_bytes - sent
                if len(body) >= room:
                    cut = True
                    await send({"type": "http.response.body", "body": body[:room], "more_body": True})
                    return
                sent += len(body)
            await send(message)

        await self.app(scope, receive, cutting_send)
        if not cut:  # the answer was shorter than after_bytes: it went out whole
            return None
        scope[CLOSED_KEY] = True
        return CLOSED

    async def _cut(self, fault, scope, receive, send, raw_send):
        got, cut = 0, False

        async def cutting_receive():
            nonlocal got, cut
            if cut:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                room = fault.after_bytes - got
                if len(body) >= room or not message.get("more_body", False):
                    cut = True
                    return {"type": "http.request", "body": body[:room], "more_body": True}
                got += len(body)
            return message

        async def no_answer(message):
            pass

        await self.app(scope, cutting_receive, no_answer)
        scope[CLOSED_KEY] = True
        return CLOSED

    async def _slow(self, fault, scope, receive, send, raw_send):
        messages = await self._read_body(receive)
        gone = False
        if not any(m["type"] == "http.disconnect" for m in messages):
            try:  # after the body, uvicorn's receive() returns only when the client disconnects
                gone = (await asyncio.wait_for(receive(), fault.delay_s))["type"] == "http.disconnect"
            except asyncio.TimeoutError:
                pass
        else:
            gone = True
        if gone:  # the client gave up: nobody to answer
            scope[CLOSED_KEY] = True
            return None
        replay = iter(messages)

        async def replay_receive():
            return next(replay, None) or await receive()

        return await self.app(scope, replay_receive, send)

    async def _hook(self, fault, scope, receive, send, raw_send):
        await asyncio.to_thread(fault.hook)
        return await self.app(scope, receive, send)
