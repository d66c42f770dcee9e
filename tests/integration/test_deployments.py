"""Deployments as a user meets them: `loraflow deploy` against a fresh `prefect server`,
runs the server's scheduler creates, automations that call a webhook, publishing on
approval — all through a process worker whose runs talk to localhub.

The stack (server, webhook receiver, worker) is shared with tests/browser through
tests/deploy_stack.py; the worker has its own LORAFLOW_HOME, and every test publishes
to repos of its own, so the in-process flow tests see nothing of these runs.
"""
from __future__ import annotations

import json
import time

import pytest
import yaml
from deploy_stack import PREFECT_FILE, anchor_in, get_stack

NIGHTLY_DATA = "loraflow-demo/nightly-data"
NIGHTLY_REPO = "loraflow-demo/nightly-check"
APPROVAL_REPO = "loraflow-demo/approval-check"
INTERVAL_S = 30
CACHED_STEPS = ("download", "dataset", "train", "verify")


@pytest.fixture(scope="module")
def stack(request, hub):
    return get_stack(request, hub)


def _api(hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=hub.token("demo"))


def _published(hub, repo_id: str) -> tuple[list[str], dict[str, str]]:
    """(commit ids newest first, {tag: commit}) of a model repo."""
    api = _api(hub)
    commits = [c.commit_id for c in api.list_repo_commits(repo_id)]
    return commits, {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags}


def test_loraflow_deploy_registers_every_deployment_without_a_prompt(stack, hub):
    result = stack.deploy_result
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["status"] == "completed"
    wanted = {d["name"] for d in yaml.safe_load(PREFECT_FILE.read_text())["deployments"]}
    on_server = {d["name"]: d for d in stack.deployments()}
    assert wanted <= set(on_server)
    for name in wanted:
        d = on_server[name]
        assert d["enforce_parameter_schema"] is True
        assert {"flows.deploy.load_hub_token": {"secret": "loraflow-hf-token"}} in d["pull_steps"]
    nightly = on_server["llama-3.2-1b-lora-nightly"]
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    # GPU work on GPU pools: the quickstart's CPU worker (loraflow-local) never gets it.
    assert nightly["work_pool_name"] == "loraflow-gpu"
    assert not [n for n, d in on_server.items()
                if "gpu" in d["tags"] and d["work_pool_name"] == "loraflow-local"]
    pools = {p["name"]: p["type"] for p in stack.api.post("/work_pools/filter", json={}).json()}
    assert pools.items() >= {"loraflow-local": "process", "loraflow-gpu": "process",
                             "loraflow-docker": "docker", "loraflow-k8s": "kubernetes"}.items()
    automations = {a["name"] for a in stack.api.post("/automations/filter", json={}).json()}
    assert {"loraflow-run-failed", "loraflow-version-published"} <= automations
    # The token is in the Secret block only: in no deployment, parameter or job variable.
    assert hub.token("demo") not in json.dumps(stack.deployments())
    assert hub.token("demo") not in result.stdout + result.stderr

    # The documented command alone, again (pools exist now): idempotent, no prompt.
    again = stack.run_prefect("--no-prompt", "deploy", "--all", "--prefect-file",
                              str(PREFECT_FILE))
    assert again.returncode == 0, again.stdout + again.stderr
    assert {d["name"] for d in stack.deployments()} >= wanted
    stack.pause_scheduled_deployments()


def test_a_bad_value_is_refused_before_a_run_exists(stack):
    deployment = stack.deployment("flows/finetune.py:finetune", "quickstart")
    profile = json.loads(json.dumps(deployment["parameters"]["profile"]))
    profile["quantization"]["mode"] = "nf3"
    profile["lora"]["r"] = 0
    refused = stack.create_run(deployment["id"], {"profile": profile})
    assert refused.status_code == 409, refused.text
    assert "nf3" in refused.text
    assert stack.runs_of(deployment["id"]) == []


def _auto_runs(stack, deployment_id: str) -> list[dict]:
    return [r for r in stack.runs_of(deployment_id) if r["auto_scheduled"]]


def _completed_auto_runs(stack, deployment_id: str, n: int, timeout: float) -> list[dict]:
    def done():
        runs = _auto_runs(stack, deployment_id)[:n]
        bad = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED", "CANCELLED")]
        assert not bad, stack.logs_of(bad[0]["id"])[-3000:]
        return len(runs) == n and all(r["state_type"] == "COMPLETED" for r in runs)

    stack.wait_for(done, timeout, f"{n} completed scheduled runs")
    return _auto_runs(stack, deployment_id)[:n]


def _seconds(a: str, b: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def test_scheduled_runs_retrain_only_when_the_dataset_moved(stack, hub):
    from localhub.seed_data import dataset_files

    api = _api(hub)
    files = dataset_files()
    api.create_repo(NIGHTLY_DATA, repo_type="dataset", private=True, exist_ok=True)
    api.upload_file(path_or_fileobj=files["data/train.jsonl"], path_in_repo="data/train.jsonl",
                    repo_id=NIGHTLY_DATA, repo_type="dataset", commit_message="rows")
    deployment = stack.deploy_variant(
        "nightly-check",
        profile={"data": {"dataset": NIGHTLY_DATA, "data_files": "data/train.jsonl"},
                 "publish": {"repo_id": NIGHTLY_REPO}},
        schedules=[{"interval": INTERVAL_S, "anchor_date": anchor_in(6), "timezone": "UTC"}],
        concurrency_limit=1)  # as the project's nightly: a late run waits for the last one
    try:
        first, second = _completed_auto_runs(stack, deployment["id"], 2, 240)
        # Created by the server's scheduler (auto_scheduled), one interval apart.
        assert _seconds(first["expected_start_time"],
                        second["expected_start_time"]) == pytest.approx(INTERVAL_S)
        assert stack.task_states(first["id"])["train"] == "Completed"
        states = stack.task_states(second["id"])
        assert {s: states[s] for s in CACHED_STEPS} == dict.fromkeys(CACHED_STEPS, "Cached")
        assert states["publish"] == "Completed"  # idempotent: found its adapter there
        commits, tags = _published(hub, NIGHTLY_REPO)
        assert list(tags) == ["v1"] and commits[0] == tags["v1"]
        assert len(commits) == 2  # the repo's initial commit and v1: nothing from run 2

        # The dataset's branch moves: the next scheduled run retrains and publishes v2.
        rows = files["data/train.jsonl"].decode().splitlines()
        api.upload_file(path_or_fileobj=("\n".join(rows[::-1]) + "\n").encode(),
                        path_in_repo="data/train.jsonl", repo_id=NIGHTLY_DATA,
                        repo_type="dataset", commit_message="reorder rows")
        moved_at = time.time()

        def retrained():
            runs = _auto_runs(stack, deployment["id"])[2:]
            for run in runs:
                if run["state_type"] in ("FAILED", "CRASHED"):
                    raise AssertionError(stack.logs_of(run["id"])[-3000:])
                if run["state_type"] == "COMPLETED" and \
                        stack.task_states(run["id"]).get("train") == "Completed":
                    return run
            return None

        stack.wait_for(retrained, 240, "a scheduled run after the dataset moved")
        run = retrained()
        assert run["start_time"] and stack.task_states(run["id"])["dataset"] == "Completed"
        commits, tags = _published(hub, NIGHTLY_REPO)
        assert set(tags) == {"v1", "v2"} and commits[0] == tags["v2"] and len(commits) == 3
        assert time.time() - moved_at < 240
    finally:
        stack.api.patch(f"/deployments/{deployment['id']}", json={"paused": True})

    # The version-published automation: one notification per new version, none for run 2.
    stack.wait_for(lambda: len(stack.webhook.matching(f"published {NIGHTLY_REPO}")) >= 2, 30,
                   "two published notifications")
    time.sleep(2)
    notes = stack.webhook.matching(f"published {NIGHTLY_REPO}")
    assert sorted(n["subject"].rsplit(" ", 1)[-1] for n in notes) == ["v1", "v2"], notes


def test_a_failing_run_notifies_the_webhook_once_with_the_typed_error(stack):
    deployment = stack.deployment("flows/finetune.py:finetune", "quickstart")
    profile = json.loads(json.dumps(deployment["parameters"]["profile"]))
    profile["model"]["id"] = "tinylabs/no-such-model"
    created = stack.create_run(deployment["id"], {"profile": profile})
    assert created.status_code == 201, created.text
    run = stack.wait_run(created.json()["id"], timeout=120)
    assert run["state_type"] == "FAILED"
    assert "RepoNotFoundError" in run["state"]["message"], run["state"]["message"]
    error_artifact = next(a for a in stack.artifacts(run["id"]) if a["key"]
                          and a["key"].endswith("-error"))
    assert "RepoNotFoundError" in error_artifact["data"] and "preflight" in error_artifact["data"]

    stack.wait_for(lambda: stack.webhook.matching(run["name"]), 60, "the failure notification")
    time.sleep(5)  # a second notification would have arrived by now
    (note,) = stack.webhook.matching(run["name"])
    assert "Failed" in note["subject"] and "RepoNotFoundError" in note["body"]


def _run_dir_trained_by(stack, run_id: str) -> str:
    """The worker's run directory whose training record names `run_id`."""
    for record in (stack.loraflow_home / "runs").glob("*/record.json"):
        if json.loads(record.read_text()).get("flow_run_id") == run_id:
            return str(record.parent)
    raise AssertionError(f"no run directory trained by {run_id}")


def test_an_approved_publish_lands_one_commit_and_notifies_once(stack, hub):
    """The `on-approval` deployment (`loraflow publish RUN_DIR` as a deployment) publishes
    a run that trained and was not published: one commit, one notification, and
    nothing more when it is approved a second time. (A gated deployment run waits on its
    own page: tests/integration/test_approval_on_run_page.py.)"""
    from huggingface_hub.errors import RepositoryNotFoundError

    deployment = stack.deploy_variant(
        "approval-check", profile={"publish": {"repo_id": APPROVAL_REPO, "when": "on_approval"}})
    created = stack.create_run(deployment["id"], {})
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]

    def waiting():
        run = stack.flow_run(run_id)
        assert run["state_type"] not in ("FAILED", "CRASHED"), stack.logs_of(run_id)[-3000:]
        return run["state_type"] == "PAUSED"

    stack.wait_for(waiting, 240, "the gated run waiting for approval")
    states = stack.task_states(run_id)
    assert states["local_check"] == "Completed" and "publish" not in states
    with pytest.raises(RepositoryNotFoundError):
        _published(hub, APPROVAL_REPO)
    run_dir = _run_dir_trained_by(stack, run_id)
    # Nobody answers on the run's page; it is published another way, then let go.
    stack.api.post(f"/flow_runs/{run_id}/set_state",
                   json={"state": {"type": "CANCELLED", "message": "approved elsewhere"},
                         "force": True})

    # Someone approves: they run the on-approval deployment with that run_dir.
    publish = stack.deployment("flows/publish.py:publish_run", "on-approval")
    target = {"repo_id": APPROVAL_REPO}
    created = stack.create_run(publish["id"], {"run_dir": run_dir, "publish": target})
    assert created.status_code == 201, created.text
    approved = stack.wait_run(created.json()["id"], timeout=120)
    assert approved["state_type"] == "COMPLETED", stack.logs_of(approved["id"])[-3000:]
    commits, tags = _published(hub, APPROVAL_REPO)
    assert list(tags) == ["v1"] and commits[0] == tags["v1"] and len(commits) == 2
    files = set(_api(hub).list_repo_files(APPROVAL_REPO, revision=tags["v1"]))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    stack.wait_for(lambda: stack.webhook.matching(f"published {APPROVAL_REPO}"), 60,
                   "the published notification")

    # Approved a second time: nothing new lands, and nobody is told of a new version.
    created = stack.create_run(publish["id"], {"run_dir": run_dir, "publish": target})
    again = stack.wait_run(created.json()["id"], timeout=120)
    assert again["state_type"] == "COMPLETED", stack.logs_of(again["id"])[-3000:]
    assert _published(hub, APPROVAL_REPO) == (commits, tags)
    time.sleep(5)  # the first notification came within seconds of its run
    notes = stack.webhook.matching(f"published {APPROVAL_REPO}")
    assert [n["subject"].rsplit(" ", 1)[-1] for n in notes] == ["v1"], notes
