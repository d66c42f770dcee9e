"""The samples step: a few held-out prompts, base and adapter side by side, in the run
report, the Prefect artifact and the published card — and the same texts that plain
transformers + peft generate from the published adapter.
"""
from __future__ import annotations

import pytest
from homes import loraflow_home  # tests/

from flows.cli import run_profile
from profiles.loader import load_profile

REPO = "loraflow-demo/samples-card"
OVERRIDES = ["training.max_steps=10", "training.save_steps=10", "training.logging_steps=5"]


def _run(as_user, overrides=()):
    with as_user("demo"):
        return run_profile("quickstart", load_profile(
            "quickstart", [f"publish.repo_id={REPO}", *OVERRIDES, *overrides]))


@pytest.fixture(scope="module", autouse=True)
def own_home(session_dir):
    with loraflow_home(session_dir / "loraflow-samples") as home:
        yield home


@pytest.fixture(scope="module")
def first_run(hub, as_user):
    report = _run(as_user)
    assert report["status"] == "completed", report["error"]
    return report


def test_samples_are_what_peft_generates_from_the_published_adapter(first_run, hub, own_home):
    import torch
    from datasets import load_from_disk
    from huggingface_hub import snapshot_download
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    samples = first_run["samples"]
    assert first_run["steps"]["samples"]["state"] == "completed"
    assert samples["skipped"] is None and len(samples["samples"]) == 3
    assert "evaluation rows" in samples["source"]

    # The prompts are held-out rows: the eval split this module's dataset step saved, each
    # cut where its labels stop being -100 (the prompt training did not learn).
    (info,) = [p for p in own_home.rglob("eval/dataset_info.json") if ".partial" not in str(p)]
    rows = load_from_disk(str(info.parent)).select(range(3))
    prompts = [r["input_ids"][:r["labels"].index(next(x for x in r["labels"] if x != -100))]
               for r in rows]

    hub_kwargs = dict(endpoint=hub.url, token=hub.token("demo"))
    repo_dir = snapshot_download(REPO, revision=first_run["hub"]["commit"], **hub_kwargs)
    base_dir = snapshot_download(first_run["base_model"]["repo_id"],
                                 revision=first_run["base_model"]["commit"], **hub_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(repo_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), repo_dir)
    model.eval()
    n = samples["max_new_tokens"]
    for ids, sample in zip(prompts, samples["samples"]):
        assert sample["prompt"] == tokenizer.decode(ids, skip_special_tokens=True)
        ids = torch.tensor([ids])
        with torch.no_grad():
            tuned = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
            with model.disable_adapter():
                bare = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)
        assert sample["adapter"] == tokenizer.decode(tuned[0, ids.shape[1]:],
                                                     skip_special_tokens=True)
        assert sample["base"] == tokenizer.decode(bare[0, ids.shape[1]:],
                                                  skip_special_tokens=True)
    assert any(s["adapter"] != s["base"] for s in samples["samples"])


def test_the_card_has_a_samples_section_with_each_row(first_run, hub):
    from huggingface_hub import ModelCard

    card = ModelCard.load(REPO, token=hub.token("demo"))
    assert "## Samples" in card.text
    section = card.text.split("## Samples", 1)[1].split("\n## ", 1)[0]
    for i, sample in enumerate(first_run["samples"]["samples"], 1):
        assert f"**Prompt {i}:**" in section
        adapter = " ".join(sample["adapter"].split())[:40]
        assert "- adapter: " + adapter.replace("<", "&lt;").replace(">", "&gt;") in section


def test_a_second_run_reuses_the_samples(first_run, as_user):
    report = _run(as_user)
    assert report["steps"]["train"]["state"] == "cached"
    assert report["steps"]["samples"]["state"] == "cached"
    assert report["samples"] == first_run["samples"]


def test_other_tasks_and_runs_without_held_out_rows_have_no_samples(first_run):
    from tasks.contracts import DatasetManifest, SnapshotManifest, TrainResult
    from tasks.samples import run_samples

    profile = load_profile("quickstart", [f"publish.repo_id={REPO}"])
    train = TrainResult(run_dir="/nonexistent", adapter_dir="/nonexistent/adapter",
                        adapter_sha256="0" * 64, trainable_params=1, total_params=2,
                        metrics={})
    snapshot = SnapshotManifest(repo_id="x/y", commit="0" * 40, local_dir="/nonexistent",
                                files={})
    no_eval = DatasetManifest(path="/nonexistent", key="k", num_train=4, num_eval=0,
                              train_tokens=10)
    cls = profile.model_copy(update={"model": profile.model.model_copy(
        update={"task": "seq-classification"})})
    assert "causal-lm" in run_samples(train, snapshot, no_eval, cls).skipped
    assert "eval_split" in run_samples(train, snapshot, no_eval, profile).skipped
