"""Publishing users can trust: card, lineage, tags, idempotent push, refusals, faults,
merged weights — through the real flow and clients against localhub.

Training is shared with the other integration tests through LORAFLOW_HOME: the train
key leaves out the publish section, so publishing elsewhere reuses the cached run.
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

import pytest

from flows.cli import run_profile
from flows.cli_publish import finished_runs
from flows.publish import publish_run, publish_section_for
from profiles.loader import load_profile

BASE, DATASET = "tinylabs/tiny-llama", "tinylabs/tiny-instruct"


def _run(as_user, repo_id: str, *overrides: str) -> dict:
    with as_user("demo"):
        profile = load_profile("quickstart", [f"publish.repo_id={repo_id}", *overrides])
        return run_profile("quickstart", profile)


def _api(hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=hub.token("demo"))


def _download(hub, repo_id: str, filename: str, revision: str) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, revision=revision, endpoint=hub.url,
                                token=hub.token("demo"), cache_dir=tempfile.mkdtemp()))


def _card_tables(text: str) -> dict[str, str]:
    """`| key | value |` rows of the card's markdown tables, as a dict."""
    rows = re.findall(r"^\| (.+?) \| (.+?) \|$", text, re.M)
    return {k.strip("`"): v for k, v in rows}


@pytest.fixture(scope="module")
def published(hub, as_user):
    report = _run(as_user, "loraflow-demo/card-check")
    assert report["status"] == "completed", report["error"]
    return report


def test_card_round_trips_and_agrees_with_profile_and_lineage(published, hub):
    from huggingface_hub import ModelCard

    repo, commit = "loraflow-demo/card-check", published["hub"]["commit"]
    profile = load_profile("quickstart", ["publish.repo_id=loraflow-demo/card-check"])
    lineage = json.loads(_download(hub, repo, "loraflow.json", commit).read_text())
    card = ModelCard.load(repo, token=hub.token("demo"))
    meta = card.data
    assert meta.base_model == BASE and meta.base_model_relation == "adapter"
    assert meta.library_name == "peft" and meta.pipeline_tag == "text-generation"
    assert set(meta.tags) >= {"loraflow", "lora", f"base_model:adapter:{BASE}"}
    assert meta.datasets == [DATASET]
    assert meta.license == "apache-2.0"  # inherited from the base model's card
    assert meta.eval_results[0].metric_value == round(lineage["metrics"]["eval_loss"], 6)

    # Lineage: the profile as run, the inputs' content ids, the adapter's hash.
    # ... with publish.tag as published: the card pins its snippets to it.
    as_run = profile.model_dump(mode="json")
    as_run["publish"]["tag"] = published["hub"]["tag"]
    assert lineage["profile"] == as_run
    assert lineage["base_model"]["commit"] == hub.commit(BASE)
    assert lineage["dataset"]["commit"] == hub.commit(DATASET)
    adapter = _download(hub, repo, "adapter_model.safetensors", commit).read_bytes()
    assert lineage["adapter"]["sha256"] == hashlib.sha256(adapter).hexdigest()
    assert re.fullmatch(r"[0-9a-f-]{36}", lineage["flow_run_id"])
    assert lineage["speed"] == {"liger_kernel": False, "liger_kernels": [],   # on CPU
                                "torch_compile": False, "offloaded_layers": 0,
                                "fp8_layers": 0, "fp8_backward": None}

    # The body, value by value against the profile and the lineage.
    rows = _card_tables(card.text)
    assert int(rows["lora.r"]) == profile.lora.r
    assert int(rows["lora.alpha"]) == profile.lora.alpha
    assert float(rows["training.learning_rate"]) == profile.training.learning_rate
    assert int(rows["training.max_steps"]) == profile.training.max_steps
    assert int(rows["optimizer steps"]) == lineage["metrics"]["steps"]
    assert float(rows["last logged loss"]) == round(lineage["metrics"]["last_loss"], 4)
    assert float(rows["eval loss"]) == round(lineage["metrics"]["eval_loss"], 4)
    base_pin = re.search(r"Base model: `(.+?)` at commit `([0-9a-f]{40})`", card.text)
    assert base_pin.groups() == (BASE, lineage["base_model"]["commit"])
    data_pin = re.search(r"Dataset: `(.+?)` at commit `([0-9a-f]{40})`", card.text)
    assert data_pin.groups() == (DATASET, lineage["dataset"]["commit"])
    assert lineage["flow_run_id"] in card.text and "{" not in card.data.to_yaml()
    png = _download(hub, repo, "loss_curve.png", commit).read_bytes()
    assert png.startswith(b"\x89PNG") and "(loss_curve.png)" in card.text


def test_versions_are_tagged_and_republishing_adds_no_commit(published, hub, as_user):
    repo = "loraflow-demo/versions"
    first = _run(as_user, repo)
    assert first["hub"]["tag"] == "v1" and first["hub"]["new_commit"]
    run_dir = str(Path(first["adapter"]["path"]).parent)
    commits_before = len(_api(hub).list_repo_commits(repo))
    with as_user("demo"):
        again = publish_run(run_dir, publish_section_for(run_dir, {"repo_id": repo}))
    assert (again["commit"], again["tag"], again["new_commit"]) == (first["hub"]["commit"],
                                                                    "v1", False)
    assert len(_api(hub).list_repo_commits(repo)) == commits_before
    second = _run(as_user, repo, "lora.r=4")
    assert second["hub"]["tag"] == "v2" and second["hub"]["commit"] != first["hub"]["commit"]
    tags = {t.name: t.target_commit for t in _api(hub).list_repo_refs(repo).tags}
    assert tags == {"v1": first["hub"]["commit"], "v2": second["hub"]["commit"]}
    listed = {r["run_dir"]: r for r in finished_runs()}[run_dir]
    assert {"repo_id": repo, "commit": first["hub"]["commit"], "tag": "v1",
            "endpoint": hub.url} in listed["published"]


def test_existing_public_repo_is_refused_when_private_is_asked(published, hub, as_user):
    repo = "loraflow-demo/already-public"
    api = _api(hub)
    api.create_repo(repo, private=False)
    commits_before = [c.commit_id for c in api.list_repo_commits(repo)]
    report = _run(as_user, repo)
    assert report["status"] == "failed" and report["error"]["type"] == "PublishError"
    assert "publish.private" in report["error"]["message"]
    assert [c.commit_id for c in api.list_repo_commits(repo)] == commits_before
    assert "adapter_model.safetensors" not in api.list_repo_files(repo)


def test_failed_commit_then_rerun_lands_exactly_one_commit(published, hub, as_user):
    repo = "loraflow-demo/flaky-commit"
    hub.server.inject_fault(path_regex=f"^/api/models/{repo}/commit/", status=500, times=1,
                            method="POST")
    failed = _run(as_user, repo)
    assert failed["status"] == "failed" and failed["error"]["type"] == "PublishError"
    assert failed["steps"]["publish"]["state"] == "failed"
    lfs_puts = [r for r in hub.requests() if r["method"] == "PUT" and r["status"] < 300]
    assert lfs_puts, "the LFS upload should have succeeded before the commit failed"
    api = _api(hub)
    assert "adapter_model.safetensors" not in api.list_repo_files(repo)
    commits_after_failure = len(api.list_repo_commits(repo))

    rerun = _run(as_user, repo)
    assert rerun["status"] == "completed", rerun["error"]
    assert rerun["steps"]["train"]["state"] == "cached"
    assert len(api.list_repo_commits(repo)) == commits_after_failure + 1
    assert rerun["hub"]["tag"] == "v1"


def test_merged_weights_load_without_peft_and_match_base_plus_adapter(published, hub, as_user):
    import torch
    from huggingface_hub import snapshot_download
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    repo = "loraflow-demo/merge-check"
    report = _run(as_user, repo, "publish.merged=true")
    assert report["status"] == "completed", report["error"]
    merged_repo = report["hub"]["merged"]["repo_id"]
    assert merged_repo == f"{repo}-merged"
    with tempfile.TemporaryDirectory() as cache:
        merged_dir = snapshot_download(merged_repo, revision=report["hub"]["merged"]["commit"],
                                       cache_dir=cache, endpoint=hub.url,
                                       token=hub.token("demo"))
        base_dir = snapshot_download(BASE, revision=hub.commit(BASE), cache_dir=cache,
                                     endpoint=hub.url, token=hub.token("demo"))
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)
        assert merged.dtype == torch.bfloat16
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
        reference = PeftModel.from_pretrained(base, report["adapter"]["path"])
        ids = torch.tensor([[1, 4, 8, 15, 16, 23, 42]])
        with torch.no_grad():
            got, want = merged(input_ids=ids).logits.float(), reference(input_ids=ids).logits.float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert not any("lora" in name for name in merged.state_dict())
