"""What every browser test shares: Debian's chromium driven by Playwright, where
screenshots go, and how to find a field of Prefect's schema form.

Chromium is Debian's (/usr/bin/chromium, `apt-get install chromium`), driven by
Playwright from PyPI; `playwright install` (a download) is never run. Without chromium a
test is skipped — loudly, and as a failure when CI=true.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("LORAFLOW_CHROMIUM", "/usr/bin/chromium"))
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]
# LORAFLOW_SCREENSHOTS=docs refreshes the screenshots the docs show.
SHOTS = Path(os.environ["LORAFLOW_SCREENSHOTS"]) if os.environ.get("LORAFLOW_SCREENSHOTS") \
    else Path(tempfile.mkdtemp(prefix="loraflow-shots-"))


def require_chromium() -> None:
    """Skip (fail with CI=true) when playwright or chromium is missing."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing = "playwright is not installed (pip install -e '.[browser]')"
    else:
        missing = None if CHROMIUM.exists() else f"{CHROMIUM} not found (apt-get install chromium)"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run on CI: {missing}")
        pytest.skip(f"BROWSER TESTS SKIPPED: {missing}")


def schema_property(scope, label: str):
    """The innermost schema-form property (a page or a section) whose own label is `label`."""
    return scope.locator(
        f"xpath=.//div[contains(@class,'schema-form-property')]"
        f"[./div[contains(@class,'p-label__header')]//span[contains(@class,"
        f"'schema-form-property__label') and normalize-space()='{label}']]").first
