"""The whole flow, end to end, against localhub with the real clients.

One quickstart run as the demo user is shared by the assertions about what it
produced; the cache and canary tests run the flow again in the same homes.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from homes import loraflow_home  # tests/

from flows.cli import run_profile
from profiles.loader import load_profile

REPO = "loraflow-demo/e2e-adapter"  # this module's own repo: its tags start at v1
BASE = "tinylabs/tiny-llama"


def _run(as_user, user="demo", overrides=()):
    with as_user(user):
        return run_profile("quickstart", load_profile("quickstart",
                                                      [f"publish.repo_id={REPO}", *overrides]))


@pytest.fixture(scope="module", autouse=True)
def own_home(session_dir):
    """A LORAFLOW_HOME of this module's own: its first run is cold whatever ran before."""
    with loraflow_home(session_dir / "loraflow-e2e") as home:
        yield home


@pytest.fixture(scope="module")
def first_run(hub, as_user):
    report = _run(as_user)
    assert report["status"] == "completed", report["error"]
    return report


def _api(hub, user="demo"):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=hub.token(user))


def test_reader_without_gated_access_gets_a_typed_error_and_downloads_nothing(hub, as_user,
                                                                               own_home):
    before = len(hub.requests())  # other modules' reader cases may have read other repos
    report = _run(as_user, user="reader")
    assert report["status"] == "failed"
    assert report["steps"]["preflight"]["state"] == "failed"
    assert all(report["steps"][s]["state"] == "skipped" for s in ("download", "train", "publish"))
    assert report["error"]["type"] == "GatedRepoError"
    message = report["error"]["message"]
    assert BASE in message and "request access" in message
    downloads = [r for r in hub.requests()[before:] if r["user"] == "reader"
                 and "/resolve/" in r["path"] and r["status"] < 400]
    assert downloads == []
    assert not (own_home / "downloads").exists() or not any((own_home / "downloads").iterdir())


def test_every_step_completes_and_the_loss_falls(first_run, hub):
    assert {s: v["state"] for s, v in first_run["steps"].items()} == dict.fromkeys(
        ["preflight", "download", "dataset", "train", "samples", "publish", "verify"],
        "completed")
    assert first_run["base_model"] == {"repo_id": BASE, "commit": hub.commit(BASE)}
    m = first_run["metrics"]
    assert m["last_loss"] <= 0.7 * m["first_loss"], m
    assert first_run["hub"]["tag"] == "v1" and len(first_run["hub"]["commit"]) == 40


def test_adapter_lands_in_one_commit_with_card_and_lineage(first_run, hub):
    api = _api(hub)
    commit = first_run["hub"]["commit"]
    files = set(api.list_repo_files(REPO, revision=commit))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md",
            "loraflow.json"} <= files
    commits = api.list_repo_commits(REPO)
    assert commits[0].commit_id == commit
    if len(commits) > 1:  # the repo's initial commit, if the server makes one, held none
        before = set(api.list_repo_files(REPO, revision=commits[1].commit_id))
        assert not before & {"adapter_config.json", "adapter_model.safetensors"}
    refs = api.list_repo_refs(REPO)
    assert {t.name: t.target_commit for t in refs.tags}["v1"] == commit
    assert api.model_info(REPO).private is True


def test_model_card_metadata_loads_with_modelcard(first_run, hub):
    from huggingface_hub import ModelCard

    card = ModelCard.load(REPO, token=hub.token("demo"))
    assert card.data.base_model == BASE
    assert card.data.library_name == "peft"
    assert "loraflow" in card.data.tags and f"base_model:adapter:{BASE}" in card.data.tags
    assert hub.commit(BASE) in card.text


def test_every_lora_tensor_changed(first_run):
    from safetensors.torch import load_file

    run_dir = Path(first_run["adapter"]["path"]).parent
    before = load_file(str(run_dir / "adapter_init.safetensors"))
    after = load_file(str(Path(first_run["adapter"]["path"]) / "adapter_model.safetensors"))
    assert len(after) > 0 and set(after) == set(before)
    assert any(".lora_A." in k for k in after) and any(".lora_B." in k for k in after)
    unchanged = [k for k, v in after.items() if (v == before[k]).all()]
    assert unchanged == []


def test_hub_copy_by_commit_reproduces_local_adapter(first_run, hub):
    import torch
    from huggingface_hub import snapshot_download
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    commit = first_run["hub"]["commit"]
    before = len(hub.requests())
    with tempfile.TemporaryDirectory() as empty_cache:
        hub_dir = snapshot_download(REPO, revision=commit, cache_dir=empty_cache,
                                    endpoint=hub.url, token=hub.token("demo"))
        gets = [r for r in hub.requests()[before:] if r["method"] == "GET"
                and r["path"].endswith(f"/resolve/{commit}/adapter_model.safetensors")]
        assert gets and gets[0]["status"] == 200
        base_dir = snapshot_download(BASE, revision=hub.commit(BASE), cache_dir=empty_cache,
                                     endpoint=hub.url, token=hub.token("demo"))
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25]])
        with torch.no_grad():
            bare = base(input_ids=ids).logits
            model = PeftModel.from_pretrained(base, first_run["adapter"]["path"],
                                              adapter_name="local")
            model.load_adapter(hub_dir, adapter_name="hub")
            model.set_adapter("local")
            local = model(input_ids=ids).logits
            model.set_adapter("hub")
            remote = model(input_ids=ids).logits
    assert torch.allclose(local, remote, atol=1e-6)
    assert (remote - bare).abs().max() > 1e-3
    assert first_run["steps"]["verify"]["state"] == "completed"


def test_second_run_is_cached_and_publishes_nothing_new(first_run, hub, as_user):
    import logging

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    lines = Lines()
    prefect_logger = logging.getLogger("prefect")  # the run loggers propagate to it
    prefect_logger.addHandler(lines)
    try:
        report = _run(as_user)
    finally:
        prefect_logger.removeHandler(lines)
    # The steps' own progress lines (their report hook), through Prefect's run logger;
    # no slot is asked of a `loraflow-training` limit that does not exist (#17's warning).
    assert "✔ train cached" in "\n".join(lines.lines), lines.lines
    assert not [line for line in lines.lines if "do not exist" in line]
    assert not [line for line in lines.lines if "record_step" in line]  # hook noise
    states = {s: v["state"] for s, v in report["steps"].items()}
    assert states["download"] == states["dataset"] == states["train"] == "cached", states
    assert report["hub"]["commit"] == first_run["hub"]["commit"]
    assert report["hub"]["new_commit"] is False and report["hub"]["tag"] == "v1"


def test_changing_lora_r_retrains_only_and_token_never_leaks(first_run, hub, as_user, capfd,
                                                             session_dir):
    report = _run(as_user, overrides=["lora.r=4"])
    states = {s: v["state"] for s, v in report["steps"].items()}
    assert states["download"] == states["dataset"] == "cached", states
    assert states["train"] == "completed" and report["hub"]["tag"] == "v2"
    print(json.dumps(report))

    token = hub.token("demo").encode()
    out, err = capfd.readouterr()
    assert token not in out.encode() and token not in err.encode()
    leaks = [str(p) for root in (session_dir / "prefect", session_dir / "loraflow",
                                 session_dir / "loraflow-e2e")
             for p in root.rglob("*") if p.is_file() and token in p.read_bytes()]
    assert leaks == []
    with tempfile.TemporaryDirectory() as tmp:
        from huggingface_hub import snapshot_download

        pushed = Path(snapshot_download(REPO, revision=report["hub"]["commit"], cache_dir=tmp,
                                        endpoint=hub.url, token=hub.token("demo")))
        assert not [p for p in pushed.rglob("*") if p.is_file() and token in p.read_bytes()]


def test_a_memory_cap_trains_with_the_batch_preflight_chose(as_user):
    """training.memory_cap_gib: preflight picks the batch that fits (the tiny model needs
    ≈14 MiB at 16 per step, ≈4 MiB at 4) and training runs with it, same global batch."""
    report = _run(as_user, overrides=["training.memory_cap_gib=0.005", "training.max_steps=10",
                                      "training.save_steps=5", "publish.when=on_approval"])
    assert report["status"] == "completed", report["error"]
    run_dir = Path(report["adapter"]["path"]).parent
    record = json.loads((run_dir / "record.json").read_text())
    assert record["memory_plan"] == {"per_device_batch_size": 4, "gradient_accumulation_steps": 4,
                                     "gradient_checkpointing": False, "checkpoint_layers": None}
    assert record["profile"]["training"]["per_device_batch_size"] == 16   # as given
    state = json.loads((run_dir / "checkpoints" / "checkpoint-10" / "trainer_state.json")
                       .read_text())
    assert state["train_batch_size"] == 4


def test_offloaded_checkpointing_trains_through_the_flow(as_user):
    """training.offload_activations with partial checkpointing: the checkpointed layer
    keeps its input outside the autograd graph and recomputes in the backward, the other
    runs as usual, and the adapter learns (run_train fails a run whose LoRA tensors did
    not move)."""
    report = _run(as_user, overrides=["training.gradient_checkpointing=true",
                                      "training.checkpoint_layers=1",
                                      "training.offload_activations=true",
                                      "training.max_steps=10", "training.save_steps=5",
                                      "publish.when=on_approval"])
    assert report["status"] == "completed", report["error"]
    record = json.loads((Path(report["adapter"]["path"]).parent / "record.json").read_text())
    assert record["speed"]["offloaded_layers"] == 1
    from tasks.publication.modelcard import render_model_card

    card = render_model_card(record, "loraflow-demo/card-preview")
    assert "- Speed levers (as run): the inputs of 1 checkpointed layer kept in CPU memory" in card
    assert report["metrics"]["last_loss"] < report["metrics"]["first_loss"], report["metrics"]
