"""Run localhub in a background thread (tests, demos) or in the foreground (CLI)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import uvicorn

from localhub.app import build_app
from localhub.middleware import Fault


def parse_log_line(line: str) -> dict | None:
    """`METHOD PATH STATUS user=NAME` -> {method, path, status, user}; None for a malformed line."""
    parts = line.strip().split(" ")
    if len(parts) != 4 or not parts[3].startswith("user="):
        return None
    return {"method": parts[0], "path": parts[1], "status": int(parts[2]), "user": parts[3][5:]}


def _config(app, host: str, port: int, log_level: str) -> uvicorn.Config:
    # h11 explicitly: predictable HEAD handling and raw_path, whatever optional parsers are installed.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, http="h11",
                          lifespan="off", timeout_keep_alive=30)


class LocalHub:
    """A localhub server over `root`, started in a daemon thread.

    >>> hub = LocalHub(tmp_path).start(port=0)
    >>> hub.url            # 'http://127.0.0.1:PORT'
    >>> hub.stop()
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.app = build_app(self.root)
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL to use as HF_ENDPOINT."""
        if self.port is None:
            raise RuntimeError("LocalHub is not started")
        return f"http://{self.host}:{self.port}"

    def start(self, port: int = 0, host: str = "127.0.0.1", timeout: float = 15.0) -> "LocalHub":
        """Bind (port 0 = a free one), serve in a daemon thread, and return once /_localhub/health answers."""
        if self._thread is not None:
            raise RuntimeError("LocalHub already started")
        self.host = host
        # Bind here, not in uvicorn, so the chosen port is known before the thread starts (no race).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(_config(self.app, host, self.port, "warning"))
        errors: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self._server.serve(sockets=[sock]))
            except BaseException as e:  # surfaced by the health wait below
                errors.append(e)

        self._thread = threading.Thread(target=run, name=f"localhub:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while True:
            if errors:
                raise RuntimeError(f"localhub failed to start: {errors[0]!r}")
            try:
                with urllib.request.urlopen(f"{self.url}/_localhub/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"localhub did not become healthy within {timeout}s")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit and wait for the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = None
        self._thread = None

    def __enter__(self) -> "LocalHub":
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- test helpers

    def requests(self) -> list[dict]:
        """Every request served so far, from `<root>/requests.log`, as {method, path, status, user}."""
        try:
            lines = (self.root / "requests.log").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [d for d in (parse_log_line(line) for line in lines) if d is not None]

    def inject_fault(self, path_regex: str, status: int = 500, times: int = 1, method: str = "*",
                     **kind) -> None:
        """Make the next `times` requests whose decoded path matches `path_regex` fail.

        Args:
            path_regex: searched in the decoded request path.
            status: the status answered (kinds "status" and "after").
            times: how many matching requests.
            method: HTTP method or "*".
            **kind: kind= ("status", "after", "reset", "cut", "slow", "hook") and its
                parameters (after_bytes, retry_after, delay_s, hook): see localhub.middleware.
        """
        self.app.injector.add(Fault(method=method.upper(), path_regex=path_regex, status=status,
                                    times=times, **kind))

    def clear_faults(self) -> None:
        """Disarm every pending fault."""
        self.app.injector.clear()

    def fault_stats(self) -> dict:
        """Faults fired and body bytes sent/received per `METHOD PATH` (FaultInjector.stats)."""
        return self.app.injector.stats()

    def reset_fault_stats(self) -> None:
        """Zero the counters of fault_stats."""
        self.app.injector.reset_stats()


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve in the foreground until interrupted (the CLI's `serve`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = build_app(root)
    print(json.dumps({"url": f"http://{host}:{port}", "root": str(Path(root).resolve())}), flush=True)
    uvicorn.Server(_config(app, host, port, log_level)).run()
