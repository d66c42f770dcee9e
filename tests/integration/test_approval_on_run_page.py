"""Approval on the run's page: a deployment run with `publish.when: on_approval` suspends
itself after the local check and the samples, with a typed Resume form; resuming it
through Prefect's API (`resume_flow_run(run_id, run_input=…)`) publishes to the repo
named in the input, rejecting it publishes nothing. And the `overrides` parameter that
changes a field or two without restating the profile.

Through the shared stack (tests/deploy_stack.py): `prefect server`, `loraflow deploy`,
and a process worker whose runs talk to localhub.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from deploy_stack import get_stack

from profiles.loader import load_profile
from tasks.errors import ProfileError

FIRST_REPO = "loraflow-demo/approval-page-first"      # the inline run that trains
ASKED_REPO = "loraflow-demo/approval-page-asked"      # what the gated run's profile names
APPROVED_REPO = "loraflow-demo/approval-page-chosen"  # what the approver types in
GATED = {"publish.when": "on_approval", "publish.repo_id": ASKED_REPO}
MAX_STEPS = 8


@pytest.fixture(scope="module")
def stack(request, hub):
    return get_stack(request, hub)


@pytest.fixture(scope="module")
def deployment(stack):
    return stack.deploy_variant("approval-page", profile={
        "publish": {"repo_id": FIRST_REPO},
        "training": {"max_steps": MAX_STEPS, "save_steps": MAX_STEPS, "logging_steps": 4}})


@pytest.fixture(scope="module")
def trained(stack, deployment):
    """One inline run that trains and publishes to FIRST_REPO: the gated runs below are
    cache hits of its training."""
    created = stack.create_run(deployment["id"], {})
    assert created.status_code == 201, created.text
    run = stack.wait_run(created.json()["id"], timeout=300)
    assert run["state_type"] == "COMPLETED", stack.logs_of(run["id"])[-3000:]
    assert stack.task_states(run["id"])["train"] == "Completed"
    return run


def _api(hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=hub.token("demo"))


def suspended_run(stack, deployment, overrides: dict) -> dict:
    """Start a gated run and wait until it waits for its approval."""
    created = stack.create_run(deployment["id"], {"overrides": overrides})
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]

    def paused():
        run = stack.flow_run(run_id)
        assert run["state_type"] not in ("FAILED", "CRASHED", "COMPLETED"), \
            stack.logs_of(run_id)[-3000:]
        return run["state_type"] == "PAUSED"

    stack.wait_for(paused, 240, "the run suspended for approval")
    return stack.flow_run(run_id)


def resume(stack, run_id: str, run_input: dict) -> None:
    """Prefect's own client, against the stack's server."""
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        resume_flow_run(run_id, run_input=run_input)


def run_input_schema(stack, run_id: str) -> dict:
    """The Resume form's JSON schema, as the run saved it (what the UI renders)."""
    rows = stack.api.post(f"/flow_runs/{run_id}/input/filter",
                          json={"prefix": "suspended-", "limit": 10}).json()
    schema = next(r for r in rows if r["key"].endswith("-schema"))
    return json.loads(schema["value"])


def test_an_approved_run_publishes_to_the_repo_named_in_the_input(stack, deployment,
                                                                  trained, hub):
    from huggingface_hub.errors import RepositoryNotFoundError

    run = suspended_run(stack, deployment, GATED)
    assert run["state"]["name"] == "Suspended"
    states = stack.task_states(run["id"])
    assert states["train"] == "Cached"  # the training of FIRST_REPO's run
    assert states["local_check"] in ("Completed", "Cached") and "publish" not in states
    assert states["samples"] == "Cached"  # taken by the inline run
    # The form: pre-filled from the profile, the samples in its description.
    schema = run_input_schema(stack, run["id"])
    props = schema["properties"]
    assert props["repo_id"]["default"] == ASKED_REPO
    assert props["decision"]["enum"] == ["approve", "reject"]
    assert "approver" in schema["required"]
    description = stack.api.post(f"/flow_runs/{run['id']}/input/filter", json={
        "prefix": "suspended-", "limit": 10}).json()
    assert any("**Prompt 1:**" in r["value"] and "- adapter: " in r["value"]
               for r in description if r["key"].endswith("-description"))

    # The waiting note names the run directory too (`loraflow publish RUN_DIR` still works).
    note = next(a for a in stack.artifacts(run["id"]) if (a["key"] or "").endswith("-approval"))
    run_dir = re.search(r"run_dir: (\S+)", note["data"]).group(1)
    assert (Path(run_dir) / "record.json").is_file()

    resume(stack, run["id"], {"decision": "approve", "approver": "Ada", "note": "reads well",
                              "repo_id": APPROVED_REPO, "tag": "approved-1"})
    done = stack.wait_run(run["id"], timeout=240)
    assert done["state_type"] == "COMPLETED", stack.logs_of(run["id"])[-3000:]
    states = stack.task_states(run["id"])
    assert states["train"] == "Cached" and states["publish"] == "Completed"
    assert states["verify"] in ("Completed", "Cached")

    api = _api(hub)
    tags = {t.name: t.target_commit for t in api.list_repo_refs(APPROVED_REPO).tags}
    assert list(tags) == ["approved-1"]
    lineage = json.loads(open(api.hf_hub_download(APPROVED_REPO, "loraflow.json",
                                                  revision="approved-1")).read())
    assert lineage["approval"]["approver"] == "Ada"
    assert lineage["approval"]["note"] == "reads well"
    assert lineage["approval"]["flow_run_id"] == run["id"] and lineage["approval"]["at"]
    assert lineage["profile"]["publish"]["repo_id"] == APPROVED_REPO
    card = open(api.hf_hub_download(APPROVED_REPO, "README.md", revision="approved-1")).read()
    assert "## Samples" in card
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_refs(ASKED_REPO)  # the profile's repo: nobody approved that one
    outcome = next(a for a in stack.artifacts(run["id"])
                   if (a["key"] or "").endswith("-approval") and "Approved by" in a["data"])
    assert APPROVED_REPO in outcome["data"] and "approved-1" in outcome["data"]
    stack.wait_for(lambda: stack.webhook.matching(f"published {APPROVED_REPO}"), 60,
                   "the published notification")


def test_a_rejected_run_ends_completed_and_pushes_nothing(stack, deployment, trained, hub):
    from huggingface_hub.errors import RepositoryNotFoundError

    rejected_repo = "loraflow-demo/approval-page-rejected"
    run = suspended_run(stack, deployment, {**GATED, "publish.repo_id": rejected_repo})
    resume(stack, run["id"], {"decision": "reject", "approver": "Bo", "note": "too short",
                              "repo_id": rejected_repo, "tag": ""})
    done = stack.wait_run(run["id"], timeout=240)
    assert done["state_type"] == "COMPLETED", stack.logs_of(run["id"])[-3000:]
    assert "publish" not in stack.task_states(run["id"])
    with pytest.raises(RepositoryNotFoundError):
        _api(hub).list_repo_refs(rejected_repo)
    outcome = next(a for a in stack.artifacts(run["id"])
                   if (a["key"] or "").endswith("-approval") and "Rejected by" in a["data"])
    assert "nothing was published" in outcome["data"] and "too short" in outcome["data"]


def test_a_refused_override_fails_the_run_naming_the_field(stack, deployment):
    created = stack.create_run(deployment["id"], {"overrides": {"lora.r": 0}})
    assert created.status_code == 201, created.text
    run = stack.wait_run(created.json()["id"], timeout=180)
    assert run["state_type"] == "FAILED"
    assert "lora.r" in run["state"]["message"], run["state"]["message"]
    assert "train" not in stack.task_states(run["id"])


# ------------------------------------------------ the overrides parameter, in-process

def test_overrides_follow_the_set_rules():
    from flows.finetune import apply_overrides

    profile = load_profile("quickstart")
    assert apply_overrides(profile, {}) is profile
    changed = apply_overrides(profile, {"lora.r": 4, "training.learning_rate": "1e-4",
                                        "lora.target_modules": "[q_proj, v_proj]"})
    assert changed.lora.r == 4 and changed.training.learning_rate == 1e-4
    assert changed.lora.target_modules == ["q_proj", "v_proj"]
    assert changed.data == profile.data  # everything else as it was


@pytest.mark.parametrize("overrides, field", [
    ({"lora.r": 0}, "lora.r"),
    ({"lora.rank": 4}, "lora.rank"),
    ({"lora": 4}, "lora"),
    ({"lora.r": True}, "lora.r"),
])
def test_a_refused_override_names_the_field(overrides, field):
    from flows.finetune import apply_overrides

    with pytest.raises(ProfileError) as err:
        apply_overrides(load_profile("quickstart"), overrides)
    assert field in str(err.value)
