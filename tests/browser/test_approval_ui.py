"""Approval on the run's page, in headless Chromium: a deployment run with
`publish.when: on_approval` waits Suspended; its page has a Resume button whose form
(Prefect's own, rendered from the run's `Approval` input) shows the samples, is filled
in — the approver's name and another repo than the profile's — and submitted; the run
then publishes there. The samples artifact renders as a table.

The training is a cache hit of an earlier inline run that published to another repo.
Screenshots: approval-resume-form.png and samples.png (LORAFLOW_SCREENSHOTS=docs
refreshes the ones docs/approval.md shows).
"""
from __future__ import annotations

import json

import pytest
from ui_kit import SHOTS, schema_property

pytestmark = pytest.mark.browser

FIRST_REPO = "loraflow-demo/approval-ui-first"
ASKED_REPO = "loraflow-demo/approval-ui-asked"
APPROVED_REPO = "loraflow-demo/approval-ui-chosen"
MAX_STEPS = 30  # enough for the adapter to say something in the screenshot




def _suspended(stack, run_id: str):
    run = stack.flow_run(run_id)
    assert run["state_type"] not in ("FAILED", "CRASHED", "COMPLETED"), \
        stack.logs_of(run_id)[-3000:]
    return run["state_type"] == "PAUSED"


def test_resume_form_on_the_run_page_publishes_where_it_says(stack, browser, hub):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    deployment = stack.deploy_variant("approval-ui", profile={
        "publish": {"repo_id": FIRST_REPO},
        "training": {"max_steps": MAX_STEPS, "save_steps": MAX_STEPS, "logging_steps": 4}})
    first = stack.create_run(deployment["id"], {})
    assert first.status_code == 201, first.text
    done = stack.wait_run(first.json()["id"], timeout=300)
    assert done["state_type"] == "COMPLETED", stack.logs_of(done["id"])[-3000:]

    created = stack.create_run(deployment["id"], {"overrides": {
        "publish.when": "on_approval", "publish.repo_id": ASKED_REPO}})
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    stack.wait_for(lambda: _suspended(stack, run_id), 240, "the run suspended for approval")
    assert stack.task_states(run_id)["train"] == "Cached"

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        # The samples artifact renders as a table (markdown, no image to break).
        samples = next(a for a in stack.artifacts(run_id)
                       if (a["key"] or "").endswith("-samples"))
        page.goto(f"{stack.ui}/artifacts/artifact/{samples['id']}")
        page.get_by_text("Prompt 3:").wait_for(timeout=30_000)
        assert page.locator("li", has_text="adapter:").count() == 3  # one per prompt
        page.wait_for_timeout(500)
        page.screenshot(path=str(SHOTS / "samples.png"), full_page=True)

        page.goto(f"{stack.ui}/runs/flow-run/{run_id}")
        page.get_by_text("Suspended").first.wait_for(timeout=30_000)
        page.get_by_role("button", name="Resume").first.click()
        modal = page.locator(".p-modal").filter(has_text="Resume Flow Run")
        modal.wait_for(timeout=30_000)
        # The description: what is being approved, its metrics and samples.
        modal.get_by_text("Approve this adapter?").wait_for(timeout=30_000)
        assert modal.locator("table").count() == 1  # the metrics
        assert modal.locator("li", has_text="adapter:").count() == 3  # the samples
        box = "input, textarea"
        repo = schema_property(modal, "Repo Id (Optional)").locator(box).first
        assert repo.input_value() == ASKED_REPO  # pre-filled from the profile
        approver = schema_property(modal, "Approver").locator(box).first
        approver.fill("Ada")
        repo.fill(APPROVED_REPO)
        schema_property(modal, "Note (Optional)").locator(box).first.fill(
            "samples read well")
        schema_property(modal, "Tag (Optional)").locator(box).first.fill("ui-approved")
        repo.blur()
        repo.scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "approval-resume-form.png"))
        answers = []

        def record(response):
            if response.url.endswith("/resume"):
                try:
                    answers.append(f"{response.status}: {response.text()[:2000]}")
                except Exception as exc:  # noqa: BLE001 — a body that could not be read
                    answers.append(f"{response.status}: ({exc})")

        page.on("response", record)
        # As in test_ui_run: on the loaded 2-core box the UI's Submit now and then sends
        # nothing; like a person, click it once more while the form is still open.
        for attempt in range(2):
            if modal.is_visible():
                modal.get_by_role("button", name="Submit").click()
            try:
                stack.wait_for(lambda: stack.flow_run(run_id)["state_type"] != "PAUSED", 30,
                               "the run resumed")
                break
            except TimeoutError:
                page.screenshot(path=str(SHOTS / f"approval-submit-{attempt}.png"))
                print(f"Submit #{attempt + 1} did not resume the run; answers: {answers}")
        else:
            raise AssertionError(f"the Resume form did not resume the run: {answers}")

        run = stack.wait_run(run_id, timeout=240)
        assert run["state_type"] == "COMPLETED", stack.logs_of(run_id)[-3000:]
    finally:
        page.close()

    api = HfApi(endpoint=hub.url, token=hub.token("demo"))
    tags = {t.name: t.target_commit for t in api.list_repo_refs(APPROVED_REPO).tags}
    assert list(tags) == ["ui-approved"]
    lineage = json.loads(open(api.hf_hub_download(APPROVED_REPO, "loraflow.json",
                                                  revision="ui-approved")).read())
    assert lineage["approval"]["approver"] == "Ada"
    assert lineage["approval"]["note"] == "samples read well"
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_refs(ASKED_REPO)
