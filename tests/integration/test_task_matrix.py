"""Every task type through the pipeline's own code, on CPU: the seeded tiny models (Llama
for causal-lm, BERT for sequence / token classification, T5 for seq2seq) and the seeded
task datasets, tokenized by tasks.dataset, loaded by tasks.training.modeling with the task's Auto
class, LoRA injected with the task's peft TaskType, trained by tasks.training.run.build_trainer.
Each case asserts that every adapter tensor changed, the loss fell, and the saved adapter
reloads on a freshly loaded base with identical outputs.

Then one seq-classification run of the whole flow against localhub, and the refusals
that happen before any weight is read.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from profiles.loader import load_profile

# task → (seeded base, rows, data.format, optimizer steps)
CASES = {
    "causal-lm": ("llama", "instruct", "alpaca", 12),
    "seq-classification": ("bert", "classification", "text-label", 30),
    "token-classification": ("bert", "tagging", "tokens-tags", 16),
    "seq2seq-lm": ("t5", "seq2seq", "input-target", 16),
}


def _write(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return directory


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """The seeded bases' files and the datasets' rows, written straight from the seed
    modules (no server needed)."""
    from localhub import seed_data, seed_models

    root = tmp_path_factory.mktemp("seeds")
    bases = {"llama": _write(root / "llama", seed_data.model_files()),
             "bert": _write(root / "bert", seed_models.bert_files()),
             "t5": _write(root / "t5", seed_models.t5_files())}
    rows = {"instruct": seed_data.instruct_rows(),
            "classification": seed_models.classification_rows(),
            "tagging": seed_models.tagging_rows(), "seq2seq": seed_models.seq2seq_rows()}
    data = {}
    for name, r in rows.items():
        data[name] = root / f"{name}.jsonl"
        data[name].write_text("".join(json.dumps(x) + "\n" for x in r[:128]))
    return bases, data


def _profile(task: str, fmt: str, dataset: Path, steps: int = 12, extra=()):
    return load_profile("quickstart", [
        f"model.task={task}", f"data.format={fmt}", f"data.dataset={dataset}",
        "data.max_length=32", "data.eval_split=0", f"training.max_steps={steps}",
        "training.per_device_batch_size=16", "training.learning_rate=0.003",
        "training.logging_steps=1", "training.save_steps=100", *extra])


def _prepare(profile, base_dir: Path):
    from tasks.cache.manifest import sha256_file
    from tasks.contracts import DatasetRef, SnapshotManifest
    from tasks.dataset import run_prepare_dataset

    path = Path(profile.data.dataset)
    snapshot = SnapshotManifest(
        repo_id=f"local/{base_dir.name}", commit="0" * 40, local_dir=str(base_dir),
        files={p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
               for p in base_dir.iterdir()})
    source = DatasetRef(source="file", id=str(path), sha256=sha256_file(path))
    return run_prepare_dataset(profile.data, source, snapshot, profile.training.seed)


@pytest.mark.parametrize("task", list(CASES))
def test_each_task_type_trains_and_reloads(task, seeds, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, set_seed

    from tasks.model_tasks import prepare_tokenizer, probe_inputs, task_type
    from tasks.training.modeling import inject_adapter, load_base_model
    from tasks.training.run import build_trainer

    bases, data = seeds
    base_name, rows, fmt, steps = CASES[task]
    base_dir = bases[base_name]
    profile = _profile(task, fmt, data[rows], steps)
    dataset = _prepare(profile, base_dir)
    if task_type(task).classifies:
        assert dataset.labels == {"seq-classification": ["colorful", "plain"],
                                  "token-classification": ["COLOR", "NUM", "O"]}[task]
    else:
        assert dataset.labels is None

    set_seed(0)
    base = load_base_model(profile.model, profile.quantization, str(base_dir),
                           labels=dataset.labels)
    assert type(base).__name__ == {"causal-lm": "LlamaForCausalLM",
                                   "seq-classification": "BertForSequenceClassification",
                                   "token-classification": "BertForTokenClassification",
                                   "seq2seq-lm": "T5ForConditionalGeneration"}[task]
    if dataset.labels:
        assert base.config.id2label == dict(enumerate(dataset.labels))
    model = inject_adapter(base, profile.lora, profile.quantization, False, task=task)
    assert model.peft_config["default"].task_type == task_type(task).peft_task_type
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(base_dir)),
                                  profile.data.padding_side)
    trainer, _ = build_trainer(profile, model, tokenizer, dataset, tmp_path / "run")
    trainer.train()

    unchanged = [n for n, p in model.named_parameters()
                 if p.requires_grad and torch.equal(p.detach(), before[n])]
    assert before and unchanged == []
    assert any("lora_A" in n for n in before) and any("lora_B" in n for n in before)
    if task_type(task).classifies:  # the new head is trained whole and saved with the adapter
        assert any("classifier" in n and "modules_to_save" in n for n in before)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # Batches differ in difficulty: compare the first three steps with the last three.
    assert len(losses) == steps and sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses

    model.save_pretrained(str(tmp_path / "adapter"), safe_serialization=True)
    model.eval()
    probe = "the red cat and the small dog"
    with torch.no_grad():
        trained = model(**probe_inputs(task, tokenizer, model, probe)).logits
    fresh = load_base_model(profile.model, profile.quantization, str(base_dir),
                            labels=dataset.labels)
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    reloaded.eval()
    with torch.no_grad():
        inputs = probe_inputs(task, tokenizer, reloaded, probe)
        again = reloaded(**inputs).logits
        with reloaded.disable_adapter():
            bare = reloaded(**inputs).logits
    assert torch.equal(trained, again), (trained - again).abs().max()
    assert (again - bare).abs().max() > 1e-3                  # the adapter does something


# ------------------------------------------------------------------ refusals before loading

def test_load_base_model_refuses_a_task_the_config_cannot_do_before_reading_weights(seeds,
                                                                                     tmp_path):
    from tasks.errors import ProfileError
    from tasks.training.modeling import load_base_model

    bases, data = seeds
    # Only the config: loading weights would fail differently, so the refusal came first.
    only_config = tmp_path / "llama-config"
    only_config.mkdir()
    (only_config / "config.json").write_bytes((bases["llama"] / "config.json").read_bytes())
    profile = _profile("seq2seq-lm", "input-target", data["seq2seq"])
    with pytest.raises(ProfileError) as exc:
        load_base_model(profile.model, profile.quantization, str(only_config))
    message = str(exc.value)
    assert message.startswith("model.task:") and "LlamaForCausalLM" in message
    assert "Fix:" in message and "causal-lm" in message


def test_preflight_refuses_seq2seq_on_llama_before_any_weight(hub, as_user):
    from tasks.errors import ProfileError
    from tasks.preflight import run_preflight

    profile = load_profile("quickstart", [
        "model.task=seq2seq-lm", "data.format=input-target", "data.dataset=tinylabs/tiny-tasks",
        "data.data_files=data/seq2seq.jsonl", "publish.repo_id=loraflow-demo/refused"])
    before = len(hub.requests())
    with as_user("demo"), pytest.raises(ProfileError) as exc:
        run_preflight(profile)
    assert str(exc.value).startswith("model.task: seq2seq-lm needs AutoModelForSeq2SeqLM")
    weights = [r for r in hub.requests()[before:] if r["path"].endswith(".safetensors")
               and r["method"] == "GET" and "/resolve/" in r["path"]]
    assert weights == []


# ------------------------------------------------------------------ seeded models on the Hub

def test_seeded_task_models_load_from_localhub_with_their_auto_classes(hub, tmp_path):
    from huggingface_hub import snapshot_download
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    for repo, auto in (("tinylabs/tiny-bert", AutoModelForSequenceClassification),
                       ("tinylabs/tiny-bert", AutoModelForTokenClassification),
                       ("tinylabs/tiny-t5", AutoModelForSeq2SeqLM)):
        local = snapshot_download(repo, revision=hub.commit(repo), cache_dir=tmp_path,
                                  endpoint=hub.url, token=hub.token("reader"))
        model, info = auto.from_pretrained(local, output_loading_info=True,
                                           use_safetensors=True)
        # Only a new classification head is missing; nothing of the seed goes unused but
        # BERT's pooler, which token classification has no use for.
        assert info["missing_keys"] <= {"classifier.weight", "classifier.bias"}
        assert info["unexpected_keys"] <= {"pooler.dense.weight", "pooler.dense.bias"}
        tok = AutoTokenizer.from_pretrained(local)
        assert tok.is_fast and tok.pad_token is not None
    assert hub.commit("tinylabs/tiny-tasks")


# ------------------------------------------------------------------ end to end

E2E_REPO = "loraflow-demo/e2e-tiny-bert-classifier"


@pytest.fixture(scope="module")
def classification_run(hub, as_user, session_dir):
    import os

    from flows.cli import run_profile

    old = os.environ["LORAFLOW_HOME"]
    os.environ["LORAFLOW_HOME"] = str(session_dir / "loraflow-tasks")
    try:
        profile = load_profile("quickstart", [
            "model.id=tinylabs/tiny-bert", "model.task=seq-classification",
            "data.dataset=tinylabs/tiny-tasks", "data.data_files=data/classification.jsonl",
            "data.format=text-label", "data.max_length=32", "training.max_steps=30",
            "training.save_steps=100", f"publish.repo_id={E2E_REPO}"])
        with as_user("demo"):
            report = run_profile("tiny-bert-classifier", profile)
    finally:
        os.environ["LORAFLOW_HOME"] = old
    assert report["status"] == "completed", report["error"]
    return report


def test_seq_classification_runs_through_the_whole_flow(classification_run, hub):
    from huggingface_hub import HfApi, ModelCard

    report = classification_run
    assert {s: v["state"] for s, v in report["steps"].items()} == dict.fromkeys(
        ["preflight", "download", "dataset", "train", "publish", "verify"], "completed")
    m = report["metrics"]
    assert m["last_loss"] < 0.8 * m["first_loss"], m
    api = HfApi(endpoint=hub.url, token=hub.token("demo"))
    commit = report["hub"]["commit"]
    config = json.loads(Path(api.hf_hub_download(E2E_REPO, "adapter_config.json",
                                                 revision=commit)).read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    card = ModelCard.load(E2E_REPO, token=hub.token("demo"))
    assert card.data.pipeline_tag == "text-classification"
    assert "AutoModelForSequenceClassification" in card.text
    assert "id2label={0: 'colorful', 1: 'plain'}" in card.text
    lineage = json.loads(Path(api.hf_hub_download(E2E_REPO, "loraflow.json",
                                                  revision=commit)).read_text())
    assert lineage["dataset"]["labels"] == ["colorful", "plain"]
    # `loraflow run`'s closing summary shows the same loading code as the card.
    from flows.cli import _summary

    summary = _summary(report)
    assert "Trained a LoRA adapter for tinylabs/tiny-bert@" in summary
    assert ("base = AutoModelForSequenceClassification.from_pretrained('tinylabs/tiny-bert'"
            in summary and "id2label={0: 'colorful', 1: 'plain'}" in summary), summary
