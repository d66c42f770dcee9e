"""Continuing an adapter: model.id names the seeded adapter repo `tinylabs/tiny-llama-lora`;
preflight resolves its base (tiny-llama at the commit adapter_config.json pins), download fetches
both, and training goes on from the seeded adapter weights — one run of the real flow against
localhub with the real clients. Then what preflight refuses, before any weight is read.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from homes import loraflow_home  # tests/

from flows.cli import run_profile
from profiles.loader import load_profile
from tasks.errors import ProfileError

ADAPTER = "tinylabs/tiny-llama-lora"
BASE = "tinylabs/tiny-llama"
REPO = "loraflow-demo/continued-adapter"


def _profile(*overrides):
    return load_profile("quickstart", [f"model.id={ADAPTER}", f"publish.repo_id={REPO}",
                                       "training.max_steps=20", "training.save_steps=10",
                                       *overrides])


@pytest.fixture(scope="module", autouse=True)
def own_home(session_dir):
    with loraflow_home(session_dir / "loraflow-continue") as home:
        yield home


@pytest.fixture(scope="module")
def run(hub, as_user):
    with as_user("demo"):
        report = run_profile("continue", _profile())
    assert report["status"] == "completed", report["error"]
    return report


def test_the_base_comes_from_adapter_config_and_is_pinned(run, hub):
    assert run["base_model"] == {"repo_id": BASE, "commit": hub.commit(BASE)}
    assert run["continued_from"] == {"repo_id": ADAPTER, "commit": hub.commit(ADAPTER)}
    run_dir = Path(run["adapter"]["path"]).parent
    inputs = json.loads((run_dir / "inputs.json").read_text())
    assert inputs["base"]["commit"] == hub.commit(BASE)
    assert inputs["adapter"]["commit"] == hub.commit(ADAPTER)
    assert set(inputs["adapter"]["files"]) == {"adapter_config.json",
                                               "adapter_model.safetensors"}


def test_training_started_from_the_seeded_weights_and_moved_every_tensor(run):
    import numpy as np
    from safetensors.torch import load_file

    from localhub.seed_adapters import adapter_tensors

    run_dir = Path(run["adapter"]["path"]).parent
    start = load_file(str(run_dir / "adapter_init.safetensors"))
    seeded = adapter_tensors()
    assert set(start) == set(seeded)
    assert all(np.array_equal(start[k].numpy(), seeded[k]) for k in seeded)   # not fresh
    assert any(start[k].abs().max() > 0 for k in start if ".lora_B." in k)    # fresh B = 0
    after = load_file(str(Path(run["adapter"]["path"]) / "adapter_model.safetensors"))
    assert set(after) == set(start)
    assert [k for k in after if (after[k] == start[k]).all()] == []
    assert run["metrics"]["last_loss"] < run["metrics"]["first_loss"]


def test_card_lineage_and_published_config_name_the_adapter_and_base(run, hub):
    from huggingface_hub import HfApi, hf_hub_download

    commit = run["hub"]["commit"]
    api = HfApi(endpoint=hub.url, token=hub.token("demo"))
    card = api.hf_hub_download(REPO, "README.md", revision=commit)
    text = Path(card).read_text()
    assert f"Continued from adapter `{ADAPTER}` at commit `{hub.commit(ADAPTER)}`" in text
    lineage = json.loads(Path(api.hf_hub_download(REPO, "loraflow.json", revision=commit))
                         .read_text())
    assert lineage["continued_from"]["repo_id"] == ADAPTER
    assert lineage["continued_from"]["commit"] == hub.commit(ADAPTER)
    assert lineage["continued_from"]["base_revision_from"] == "adapter_config"
    config = json.loads(Path(hf_hub_download(REPO, "adapter_config.json", revision=commit,
                                             endpoint=hub.url, token=hub.token("demo")))
                        .read_text())
    # The published adapter can itself be continued: its base is a Hub id at a commit.
    assert (config["base_model_name_or_path"], config["revision"]) == (BASE, hub.commit(BASE))
    assert run["steps"]["verify"]["state"] == "completed"


def test_a_second_run_is_cached(run, as_user):
    with as_user("demo"):
        again = run_profile("continue", _profile())
    assert again["steps"]["download"]["state"] == again["steps"]["train"]["state"] == "cached"


# ----------------------------------------------------------------- refused up front

def _preflight(as_user, profile):
    from tasks.preflight import run_preflight

    with as_user("demo"):
        return run_preflight(profile)


def test_preflight_reports_the_adapter(hub, as_user):
    report = _preflight(as_user, _profile())
    assert report.adapter.repo_id == ADAPTER and report.adapter.commit == hub.commit(ADAPTER)
    assert (report.adapter.base_id, report.adapter.base_revision) == (BASE, hub.commit(BASE))
    assert report.base_model.repo_id == BASE and report.base_model.commit == hub.commit(BASE)
    assert _preflight(as_user, _profile(f"model.base_id={BASE}",
                                        f"model.base_revision={hub.commit(BASE)}")).adapter


def _initial_commit(hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=hub.token("demo")).list_repo_commits(BASE)[-1].commit_id


@pytest.mark.parametrize("overrides, field, says", [
    (["lora.r=4"], "lora", "lora.r: 4, the adapter has 8"),
    (["lora.target_modules=[q_proj, v_proj]"], "lora", "lora.target_modules"),
    (["lora.use_dora=true"], "lora", "lora.use_dora"),
    (["lora.method=loha"], "lora.method", "set lora.method to lora"),
    (["lora.init=gaussian"], "lora.init", "remove lora.init"),
    (["model.base_id=tinylabs/tiny-bert"], "model.base_id", BASE),
    (["model.task=seq-classification", "data.format=text-label"], "model.task", "CAUSAL_LM"),
    ([], "model.base_revision", "set model.base_revision to"),
])
def test_a_profile_that_does_not_describe_the_adapter_is_refused(hub, as_user, own_home,
                                                                  overrides, field, says):
    if field == "model.base_revision":
        overrides = [f"model.base_revision={_initial_commit(hub)}"]
    try:
        profile = _profile(*overrides)
    except ProfileError as exc:  # refused by the schema already
        pytest.fail(f"the schema refused {overrides}: {exc}")
    downloads = own_home / "downloads"
    before = sorted(downloads.rglob("*")) if downloads.exists() else []
    with pytest.raises(ProfileError) as err:
        _preflight(as_user, profile)
    message = str(err.value)
    assert field in message and says in message and "Fix" in message, message
    assert (sorted(downloads.rglob("*")) if downloads.exists() else []) == before


@pytest.mark.parametrize("override, field", [
    ("model.base_id=tinylabs/tiny-llama", "model.base_id"),
    ("lora.low_cpu_mem_usage=true", "lora.low_cpu_mem_usage"),
])
def test_adapter_only_options_on_a_base_model_are_refused(hub, as_user, override, field):
    profile = load_profile("quickstart", [override])
    with pytest.raises(ProfileError) as err:
        _preflight(as_user, profile)
    assert field in str(err.value) and "Fix" in str(err.value)
