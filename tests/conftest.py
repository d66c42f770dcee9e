"""Shared fixtures: one localhub per test session, isolated Prefect and loraflow homes.

The Hub clients read HF_ENDPOINT when they are imported, so the endpoint (a free
loopback port chosen here) is set before any test module imports them; the server
itself starts in the `hub` fixture on that port.
"""
from __future__ import annotations

import os
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="loraflow-tests-"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HUB_PORT = _free_port()
os.environ.update(
    HF_ENDPOINT=f"http://127.0.0.1:{HUB_PORT}",
    HF_HUB_DISABLE_XET="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HOME=str(_SESSION_DIR / "hf-home"),
    PREFECT_HOME=str(_SESSION_DIR / "prefect"),
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    # Each CLI run or "pod" a test starts as a process brings up its own temporary Prefect
    # server (≈10 s cold); on a busy 2-core CI machine Prefect's default 20 s wait for it
    # ran out (RuntimeError: Timed out … ephemeral Prefect API server).
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    LORAFLOW_HOME=str(_SESSION_DIR / "loraflow"),
    TOKENIZERS_PARALLELISM="false",
)
os.environ.pop("HF_TOKEN", None)


class SeededHub:
    """The running localhub plus what `seed` created (users, repos)."""

    def __init__(self, server, seeded: dict):
        self.server, self.seeded = server, seeded
        self.url, self.root = server.url, server.root

    def token(self, user: str) -> str:
        return next(u["token"] for u in self.seeded["users"] if u["name"] == user)

    def commit(self, repo_id: str) -> str:
        return next(r["commit"] for r in self.seeded["repos"] if r["repo_id"] == repo_id)

    def requests(self) -> list[dict]:
        return self.server.requests()


@pytest.fixture(scope="session")
def hub():
    from localhub.seed import seed
    from localhub.server import LocalHub

    root = _SESSION_DIR / "localhub"
    server = LocalHub(root).start(port=HUB_PORT)
    try:
        yield SeededHub(server, seed(root))
    finally:
        server.stop()


@contextmanager
def hub_user(hub: SeededHub, user: str | None):
    """HF_TOKEN set to `user`'s token (None: no token) for the duration."""
    old = os.environ.get("HF_TOKEN")
    if user is None:
        os.environ.pop("HF_TOKEN", None)
    else:
        os.environ["HF_TOKEN"] = hub.token(user)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = old


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def as_user(hub):
    """`with as_user("demo"): ...` runs the body with that user's token in HF_TOKEN."""
    return lambda user: hub_user(hub, user)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """The seeded tiny Llama's files, written straight from the seed (no server needed)."""
    from localhub import seed_data

    d = tmp_path_factory.mktemp("tiny-llama")
    for name, data in seed_data.model_files().items():
        (d / name).write_bytes(data)
    return d


@pytest.fixture(scope="session")
def pattern_dataset(tmp_path_factory):
    """32 rows of a learnable pattern (consecutive ids, 32 tokens), saved as
    prepare_dataset saves them: training at the step level without the dataset step."""
    import datasets

    from tasks.contracts import DatasetManifest

    rows_n, length = 32, 32
    d = tmp_path_factory.mktemp("pattern-data")
    rows = [[4 + (i * 7 + j) % 500 for j in range(length)] for i in range(rows_n)]
    datasets.Dataset.from_dict({"input_ids": rows, "labels": rows,
                                "attention_mask": [[1] * length] * rows_n}).save_to_disk(
        str(d / "train"))
    return DatasetManifest(path=str(d), key="pattern", num_train=rows_n, num_eval=0,
                           train_tokens=rows_n * length)
