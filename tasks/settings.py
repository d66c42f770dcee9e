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


def lock_dir() -> Path:
    """Where the cache locks live: LORAFLOW_HOME/locks (shared by every host that shares
    the home, which is what makes them cross-host locks)."""
    return loraflow_home() / "locks"


def check_home_writable() -> Path:
    """LORAFLOW_HOME, created if missing and proven writable by writing a file in it.

    Called when a run starts, before any download: a read-only or unwritable home would
    otherwise surface as a foreign OSError deep inside a step. A real write is tried
    because permission bits say nothing for root or on read-only mounts.

    Returns:
        The resolved home directory.
    Raises:
        SettingsError: naming LORAFLOW_HOME, the path, the cause and the fix.
    """
    import tempfile

    from tasks.errors import SettingsError

    home = loraflow_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=home, prefix=".write-check-"):
            pass
    except OSError as exc:
        variable = "LORAFLOW_HOME" if os.environ.get("LORAFLOW_HOME") else \
            "LORAFLOW_HOME (unset, so its default)"
        raise SettingsError(
            f"{variable}={home}: loraflow cannot write there ({type(exc).__name__}: "
            f"{exc.strerror or exc}). Fix: set LORAFLOW_HOME to a directory you can write "
            "(it holds downloads, datasets, runs and cache records), or make this one "
            "writable.", variable="LORAFLOW_HOME") from None
    return home


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


# Prefect's own default is 20 s; a first run on a fresh PREFECT_HOME took 19 s to start
# its temporary server on a 2-core machine at load 2, and longer under more load.
PREFECT_STARTUP_TIMEOUT_S = "120"


def prepare_prefect_environment() -> None:
    """Prefect settings loraflow needs, unless the user set them; call before `import
    prefect`, which reads its settings once, at import (prefect/context.py's root
    settings context).

    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: how long the CLI waits for Prefect's
    temporary API server (ephemeral mode, no PREFECT_API_URL) to answer. Set in the
    environment or in the active Prefect profile, the user's value wins: an environment
    variable would override the profile, so the profile is read first.
    """
    name = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    if name not in os.environ and name not in _active_prefect_profile():
        os.environ[name] = PREFECT_STARTUP_TIMEOUT_S
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _active_prefect_profile() -> dict:
    """The settings of the active Prefect profile (PREFECT_PROFILES_PATH, default
    PREFECT_HOME/profiles.toml; PREFECT_PROFILE or the file's `active`), read without
    importing prefect, which would load its settings before they are prepared."""
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    active = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    profile = (data.get("profiles") or {}).get(active)
    return profile if isinstance(profile, dict) else {}


def debug_enabled() -> bool:
    """LORAFLOW_DEBUG=1 (or `loraflow --debug`): show tracebacks of expected errors."""
    return os.environ.get("LORAFLOW_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


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
                         "seconds. Fix: set it to e.g. 120, or unset it for the default.")
    return value
