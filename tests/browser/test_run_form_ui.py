"""The quickstart deployment's run form, as a person sees it in the Prefect UI.

Real chromium on the form `prefect server start` serves for the deployment that
`loraflow deploy` registered: no 'Property is type "None"', no "is a const and cannot
be changed", a description's `<repo_id>` placeholder shown as written, and in each
section the common fields first, the "Advanced: …" ones after them. Screenshots go to
LORAFLOW_SCREENSHOTS (docs/ when refreshing the docs' run-form.png and
run-form-advanced.png), else a temporary folder.

Chromium is Debian's (/usr/bin/chromium), driven by Playwright from PyPI, as in
test_ui_run.py; without it the test is skipped, and fails when CI=true.
"""
from __future__ import annotations

import pytest
from ui_kit import SHOTS, schema_property

pytestmark = pytest.mark.browser

NOISE = ('Property is type "None"', "is a const and cannot be changed")
SECTIONS = ("Model", "Data", "Publish", "Lora (Optional)", "Training (Optional)",
            "Quantization (Optional)")






def _labels(section) -> list[str]:
    """The property labels inside a section, in page order."""
    return [t.strip() for t in
            section.locator("span.schema-form-property__label").all_inner_texts()]


def test_the_run_form_is_free_of_noise_keeps_placeholders_and_groups_advanced_fields(
        stack, browser):
    deployment = stack.deployment("flows/finetune.py:finetune", "quickstart")
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    try:
        page.goto(f"{stack.ui}/deployments/deployment/{deployment['id']}/run")
        publish = schema_property(page, "Publish")
        merged = schema_property(publish, "Merged (Optional)")
        merged.wait_for(timeout=30_000)
        training = schema_property(page, "Training (Optional)")
        schema_property(training, "Advanced: Data Parallel (Optional)").wait_for(timeout=30_000)
        page.wait_for_load_state("networkidle")

        text = page.locator("body").inner_text()
        assert [n for n in NOISE if n in text] == []
        # The placeholder as written (inside a code span), not eaten as an HTML tag.
        assert "<repo_id>-merged" in merged.inner_text()
        # The sections a person must fill come first; in every section the advanced
        # fields after the common ones.
        labels = _labels(page)
        assert [label for label in labels if label in SECTIONS] == list(SECTIONS), labels
        for name in ("Model", "Lora (Optional)", "Training (Optional)"):
            labels = _labels(schema_property(page, name))[1:]  # [0] is the section's own
            advanced = [i for i, label in enumerate(labels) if label.startswith("Advanced: ")]
            assert advanced and advanced == list(range(advanced[0], len(labels))), labels
        # New fields render as their types say: a list of choices, a dropdown.
        assert schema_property(training, "Report To (Optional)").count() == 1

        SHOTS.mkdir(parents=True, exist_ok=True)
        publish.scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "run-form.png"))
        schema_property(training, "Advanced: Weight Decay (Optional)").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "run-form-advanced.png"))
    finally:
        page.close()
