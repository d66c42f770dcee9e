"""The environment, read in one place; everything else gets these values passed down.

The Hub endpoint and token come from the same variables every Hugging Face tool reads
(HF_ENDPOINT, HF_TOKEN), so a profile never carries a secret and a run against
localhub is the same code as a run against huggingface.co.
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ENDPOINT = "https://huggingface.co"


def loraflow_home() -> Path:
    """Root of loraflow's own data: downloads, prepared datasets, runs, cache records."""
    home = Path(os.environ.get("LORAFLOW_HOME") or Path.home() / ".cache" / "loraflow")
    return home.expanduser().resolve()


def hub_endpoint() -> str:
    """The Hub URL the clients talk to (HF_ENDPOINT), without a trailing slash."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_token() -> str | None:
    """The Hub token from HF_TOKEN (or the client's own token file). Never log it."""
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def prepare_client_environment() -> None:
    """Settings the Hub clients read at import time; call before importing them.

    A self-hosted endpoint (localhub, a mirror) speaks plain HTTP/LFS, not Xet.
    """
    if hub_endpoint() != DEFAULT_ENDPOINT:
        os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    # Telemetry calls would only time out on machines without internet.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def result_storage():
    """Where Prefect keeps the cached steps' result records (LORAFLOW_RESULT_STORAGE).

    Unset: LORAFLOW_HOME/results. A path: that directory (e.g. on a shared mount). A
    block slug `<block-type>/<name>` (e.g. `local-file-system/loraflow-results`, or a
    remote file system block): that saved Prefect block, for several machines.
    """
    value = os.environ.get("LORAFLOW_RESULT_STORAGE", "").strip()
    if not value:
        return loraflow_home() / "results"
    if "://" in value:
        raise ValueError(f"LORAFLOW_RESULT_STORAGE={value!r}: a URL is not a storage "
                         "setting. Fix: save a Prefect storage block for it and give its "
                         "slug (<block-type>/<name>), or give a directory path.")
    is_slug = (not value.startswith(("/", ".", "~")) and value.count("/") == 1
               and all(value.split("/")))
    return value if is_slug else Path(value).expanduser().resolve()


def lock_lease_seconds() -> float:
    """How long a lock held from another host survives without a heartbeat
    (LORAFLOW_LOCK_LEASE_S, default 120): after that its holder is presumed dead."""
    raw = os.environ.get("LORAFLOW_LOCK_LEASE_S", "").strip()
    try:
        value = float(raw) if raw else 120.0
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"LORAFLOW_LOCK_LEASE_S={raw!r}: expected a positive number of "
                         "seconds, e.g. 120.")
    return value
