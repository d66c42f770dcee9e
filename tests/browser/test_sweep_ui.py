"""A sweep run from its deployment, as a person sees it in the Prefect UI (headless
Chromium): the sweep's page lists its variants under "Subflow runs", and its
`loraflow-sweep-runs` artifact links each variant's run page.

The stack is tests/deploy_stack.py's; the variants run on the `sweep-variant`
deployment through the loraflow-local worker. Screenshot: docs/ui-sweep-run.png
(LORAFLOW_SCREENSHOTS=docs).
"""
from __future__ import annotations

import json

import pytest
from ui_kit import SHOTS

pytestmark = pytest.mark.browser

REPO = "loraflow-demo/sweep-ui"
GRID = {"lora.r": [7, 9]}  # ranks no other test trains: the variants really train




def test_the_sweep_page_lists_its_variants_and_links_their_runs(stack, browser):
    sweep = stack.deployment("flows/sweep.py:sweep", "sweep")
    profile = json.loads(json.dumps(sweep["parameters"]["profile"]))
    profile["publish"]["repo_id"] = REPO
    profile["training"].update(max_steps=4, logging_steps=2, save_steps=4)
    created = stack.create_run(sweep["id"], {"profile": profile, "grid": GRID,
                                             "publish": "none"})
    assert created.status_code == 201, created.text
    run = stack.wait_run(created.json()["id"], timeout=300)
    assert run["state_type"] == "COMPLETED", stack.logs_of(run["id"])[-3000:]
    children = {c["name"]: c for c in stack.children(run["id"])}
    assert set(children) == {"r7", "r9"}

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(f"{stack.ui}/runs/flow-run/{run['id']}")
        page.get_by_text("Completed").first.wait_for(timeout=30_000)
        page.get_by_text("Subflow Runs", exact=False).first.click()
        for name in children:
            page.get_by_role("link", name=name, exact=True).first.wait_for(timeout=30_000)
        page.wait_for_load_state("networkidle")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "ui-sweep-run.png"))

        # The markdown results link each variant's run page.
        (links,) = [a for a in stack.artifacts(run["id"]) if a["key"] == "loraflow-sweep-runs"]
        page.goto(f"{stack.ui}/artifacts/artifact/{links['id']}")
        for name, child in children.items():
            href = f"{stack.ui}/runs/flow-run/{child['id']}"
            page.locator(f"a[href='{href}']").first.wait_for(timeout=30_000)
        page.screenshot(path=str(SHOTS / "ui-sweep-table.png"))
    finally:
        page.close()
