"""Fixtures of the browser tests: one headless chromium and one deployment stack
(tests/deploy_stack.py: a `prefect server`, the deployments, a worker) per test module."""
from __future__ import annotations

import pytest
from deploy_stack import get_stack
from ui_kit import CHROMIUM, LAUNCH_ARGS, require_chromium


@pytest.fixture(scope="module")
def browser():
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def stack(request, hub, browser):
    return get_stack(request, hub)
