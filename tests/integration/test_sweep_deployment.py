"""A sweep started from its deployment, as a user starts it from the UI: the sweep's
run on the loraflow-local worker starts each variant through the sweep-variant
deployment (`run_deployment(as_subflow=True)`), so the worker runs them side by side as
flow runs linked to the sweep's run and tagged with it; the best variant's publish
verifies and emits `loraflow.adapter.published`, which the version-published
automation sends to the webhook.

The stack (server, worker, webhook) is tests/deploy_stack.py's, shared with
test_deployments.py and the browser tests.
"""
from __future__ import annotations

import json

import pytest
from deploy_stack import get_stack

REPO = "loraflow-demo/sweep-deployed"
GRID = {"lora.r": [3, 5]}


@pytest.fixture(scope="module")
def stack(request, hub):
    return get_stack(request, hub)


def _sweep_profile(stack) -> dict:
    deployment = stack.deployment("flows/sweep.py:sweep", "sweep")
    profile = json.loads(json.dumps(deployment["parameters"]["profile"]))
    profile["publish"]["repo_id"] = REPO
    profile["training"].update(max_steps=4, logging_steps=2, save_steps=4)
    return profile


def test_the_sweep_deployment_has_a_typed_grid_and_runs_variants_on_a_deployment(stack):
    sweep = stack.deployment("flows/sweep.py:sweep", "sweep")
    schema = sweep["parameter_openapi_schema"]["properties"]
    assert schema["grid"]["type"] == "object"
    assert schema["grid"]["additionalProperties"]["type"] == "array"
    assert schema["publish"]["enum"] == ["all", "best", "none"]
    variant = stack.deployment("flows/sweep.py:train_variant", "sweep-variant")
    assert sweep["parameters"]["variant_deployment"] == "loraflow-train-variant/sweep-variant"
    assert sweep["work_pool_name"] == variant["work_pool_name"] == "loraflow-local"
    # A grid that is not field → list is refused by the server before a run exists.
    refused = stack.create_run(sweep["id"], {"grid": {"lora.r": 4}})
    assert refused.status_code == 409, refused.text


def test_a_sweep_from_its_deployment_links_its_variants_and_notifies_its_publication(stack,
                                                                                      hub):
    from huggingface_hub import HfApi

    sweep = stack.deployment("flows/sweep.py:sweep", "sweep")
    variant_deployment = stack.deployment("flows/sweep.py:train_variant", "sweep-variant")
    created = stack.create_run(sweep["id"], {"profile": _sweep_profile(stack), "grid": GRID,
                                             "publish": "best",
                                             "max_concurrent_trainings": 2})
    assert created.status_code == 201, created.text
    run = stack.wait_run(created.json()["id"], timeout=420)
    assert run["state_type"] == "COMPLETED", stack.logs_of(run["id"])[-3000:]

    # Every variant ran through the sweep-variant deployment, linked to the sweep's run
    # (Prefect's parent task run) and tagged with the sweep and the variant.
    children = {c["name"]: c for c in stack.children(run["id"])}
    assert set(children) >= {"r3", "r5"}, children
    publish_runs = [n for n in children if n.endswith("-publish")]
    assert len(publish_runs) == 1 and len(children) == 3
    for name, child in children.items():
        assert child["deployment_id"] == variant_deployment["id"]
        assert child["state_type"] == "COMPLETED", stack.logs_of(child["id"])[-3000:]
        assert {f"sweep:{run['id']}", f"variant:{name.removesuffix('-publish')}"} <= set(
            child["tags"]), child["tags"]
        parent = stack.api.get(f"/task_runs/{child['parent_task_run_id']}").json()
        assert parent["flow_run_id"] == run["id"]
    for name in ("r3", "r5"):
        assert stack.task_states(children[name]["id"])["train"] == "Completed"
        assert "publish" not in stack.task_states(children[name]["id"])

    # The best variant's publish: its training cached, then the flow's publish path.
    (publish_run,) = publish_runs
    states = stack.task_states(children[publish_run]["id"])
    assert states["train"] == "Cached"
    assert states["publish"] == "Completed" and states["verify"] == "Completed", states
    tags = {t.name: t.target_commit for t in HfApi(endpoint=hub.url, token=hub.token(
        "demo")).list_repo_refs(REPO).tags}
    assert list(tags) == ["v1"]

    # The results table links each variant's run page and the published commit.
    (table,) = [a for a in stack.artifacts(run["id"]) if a["key"] == "loraflow-sweep"]
    rows = {r["variant"]: r for r in json.loads(table["data"])}
    for name in ("r3", "r5"):
        assert rows[name]["run"] == f"{stack.ui}/runs/flow-run/{children[name]['id']}"
    best = rows[publish_run.removesuffix("-publish")]
    assert best["commit"] == tags["v1"] and best["commit_url"].endswith(f"/commit/{tags['v1']}")
    assert best["publish_run"] == f"{stack.ui}/runs/flow-run/{children[publish_run]['id']}"
    (links,) = [a for a in stack.artifacts(run["id"]) if a["key"] == "loraflow-sweep-runs"]
    assert f"]({stack.ui}/runs/flow-run/{children['r3']['id']})" in links["data"]

    # The published event reached the version-published automation's webhook.
    stack.wait_for(lambda: stack.webhook.matching(f"published {REPO}"), 60,
                   "the sweep's published notification")
    (note,) = stack.webhook.matching(f"published {REPO}")
    assert note["subject"].endswith("v1") and tags["v1"] in note["body"]
