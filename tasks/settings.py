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
