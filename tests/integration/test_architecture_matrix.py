"""The architecture matrix: every common architecture trains through the whole flow,
publishes, and its Hub copy reloads through plain clients with identical logits.

Tiny random-init models with the real module layouts (localhub/seed_arch.py: Conv1D
GPT-2, tied embeddings, fused qkv_proj / gate_up_proj, encoder-only and encoder-decoder
models) are built by transformers and pushed into the session's localhub once for this
module, through the real HfApi as a member of `tinylabs`. Each case runs
flows.cli.run_profile in-process and asserts that the loss fell, that every adapter
tensor changed (from the saved files), and that the published adapter, loaded with
AutoPeftModelFor… / PeftModel and with `pipeline(...)` where transformers has one for the
task, gives the local adapter's logits.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from profiles.loader import load_profile

pytestmark = pytest.mark.slow

PROBE = "the red cat and the small dog"
PEFT_AUTO = {"causal-lm": "AutoPeftModelForCausalLM",
             "seq-classification": "AutoPeftModelForSequenceClassification",
             "token-classification": "AutoPeftModelForTokenClassification",
             "seq2seq-lm": "AutoPeftModelForSeq2SeqLM"}
PIPELINES = {"causal-lm": "text-generation", "seq-classification": "text-classification",
             "token-classification": "token-classification"}
# The chat rows through each tokenizer's own template, and for the template-less
# GPT-2-style tokenizers the classification texts as plain text. Rows are cut at 32
# tokens, except chat: the Llama-3 and ChatML templates open with a default system turn
# of ~60 tokens at a 512-entry vocabulary.
MAX_LENGTH = {"causal-lm": 128}
DATA = {"causal-lm": ["data.dataset=tinylabs/tiny-instruct", "data.format=chat",
                      "data.data_files=data/chat.jsonl"],
        "text": ["data.dataset=tinylabs/tiny-tasks", "data.format=text",
                 "data.data_files=data/classification.jsonl"],
        "seq-classification": ["data.dataset=tinylabs/tiny-tasks", "data.format=text-label",
                               "data.data_files=data/classification.jsonl"],
        "token-classification": ["data.dataset=tinylabs/tiny-tasks", "data.format=tokens-tags",
                                 "data.data_files=data/tagging.jsonl"],
        "seq2seq-lm": ["data.dataset=tinylabs/tiny-tasks", "data.format=input-target",
                       "data.data_files=data/seq2seq.jsonl"]}


@dataclass(frozen=True)
class Case:
    arch: str                       # localhub.seed_arch.ARCHS key
    task: str = "causal-lm"
    lora: tuple = ()                # extra --set overrides of the lora section
    data: str = ""                  # DATA key (default: the task's)
    merged: bool = False            # publish.merged: the merged export too

    @property
    def overrides(self) -> list[str]:
        return [f"model.id=tinylabs/{self.arch}", f"model.task={self.task}",
                *DATA[self.data or self.task], *self.lora]


CASES = {
    "llama": Case("arch-llama"),
    # Llama-3.2 layout (tied): lm_head adapted by name.
    "llama-tied-lm_head": Case("arch-llama-tied",
                               lora=("lora.target_modules=[q_proj,v_proj,lm_head]",),
                               merged=True),
    "qwen2-tied-save-lm_head": Case("arch-qwen2", lora=("lora.modules_to_save=[lm_head]",),
                                    merged=True),
    "qwen3": Case("arch-qwen3"),
    "gemma": Case("arch-gemma"),
    "mistral": Case("arch-mistral"),
    "phi3-fused": Case("arch-phi3", lora=("lora.target_modules=[qkv_proj,gate_up_proj]",)),
    "gpt2": Case("arch-gpt2", data="text"),
    "gpt2-c_attn": Case("arch-gpt2", lora=("lora.target_modules=[c_attn]",), data="text"),
    "gpt-neox": Case("arch-gpt-neox", data="text"),
    "falcon": Case("arch-falcon", data="text"),
    "bert-seq-cls": Case("arch-bert", "seq-classification"),
    "bert-token-cls": Case("arch-bert", "token-classification"),
    "roberta-seq-cls": Case("arch-roberta", "seq-classification"),
    # pre_classifier is not in the checkpoint: random on every load unless saved.
    "distilbert-seq-cls": Case("arch-distilbert", "seq-classification"),
    "roberta-token-cls": Case("arch-roberta", "token-classification"),
    "t5": Case("arch-t5", "seq2seq-lm"),
    "bart": Case("arch-bart", "seq2seq-lm"),
}


@pytest.fixture(scope="module")
def arch_hub(hub, session_dir):
    """The tiny models pushed to localhub once, and this module's own LORAFLOW_HOME."""
    from huggingface_hub import HfApi

    from localhub.seed_arch import ARCHS, seed_into_hub

    api = HfApi(endpoint=hub.url, token=hub.token("owner"))
    names = sorted({c.arch for c in CASES.values()})
    assert set(names) <= set(ARCHS)
    commits = seed_into_hub(api, names)
    old = os.environ["LORAFLOW_HOME"]
    os.environ["LORAFLOW_HOME"] = str(session_dir / "loraflow-arch")
    yield commits
    os.environ["LORAFLOW_HOME"] = old


def _run(case: Case, name: str, as_user) -> dict:
    from flows.cli import run_profile

    profile = load_profile("quickstart", [
        *case.overrides, f"data.max_length={MAX_LENGTH.get(case.data or case.task, 32)}",
        "data.eval_split=0",
        "training.max_steps=12", "training.per_device_batch_size=8",
        "training.learning_rate=0.01", "training.logging_steps=1", "training.save_steps=100",
        f"publish.repo_id=loraflow-demo/arch-{name}", f"publish.merged={case.merged}"])
    with as_user("demo"):
        return run_profile(f"arch-{name}", profile)


def _loads(task: str, repo_dir: str, head: dict):
    import peft

    return getattr(peft, PEFT_AUTO[task]).from_pretrained(repo_dir, **head)


def _logits(model, tokenizer, task: str):
    import torch

    from tasks.model_tasks import probe_inputs

    with torch.no_grad():
        return model(**probe_inputs(task, tokenizer, model, PROBE)).logits


@pytest.mark.parametrize("name", list(CASES))
def test_architecture_trains_publishes_and_reloads(name, arch_hub, hub, as_user, tmp_path):
    import torch
    from huggingface_hub import snapshot_download
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, pipeline

    from tasks.model_tasks import head_kwargs, record_labels
    from tasks.training.modeling import load_base_model

    case = CASES[name]
    report = _run(case, name, as_user)
    assert report["status"] == "completed", report["error"]
    assert report["steps"]["verify"]["state"] in ("completed", "cached")

    run_dir = Path(report["adapter"]["path"]).parent
    record = json.loads((run_dir / "record.json").read_text())
    losses = [h["loss"] for h in record["loss_history"]]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), losses

    initial = load_file(str(run_dir / "adapter_init.safetensors"))
    trained = load_file(str(Path(report["adapter"]["path"]) / "adapter_model.safetensors"))
    assert trained and set(trained) == set(initial)
    assert [k for k, v in trained.items() if torch.equal(v, initial[k])] == []

    repo = f"loraflow-demo/arch-{name}"
    commit = report["hub"]["commit"]
    with as_user("demo"):
        hub_dir = snapshot_download(repo, revision=commit, cache_dir=tmp_path / "cache")
        base_dir = snapshot_download(f"tinylabs/{case.arch}",
                                     cache_dir=tmp_path / "cache")
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        # The local adapter on the base as the flow loaded it.
        profile = load_profile("quickstart", case.overrides)
        labels = record_labels(run_dir / "record.json")
        base = load_base_model(profile.model, profile.quantization, base_dir, labels=labels)
        local = PeftModel.from_pretrained(base, report["adapter"]["path"]).eval()
        expected = _logits(local, tokenizer, case.task)
        # The Hub copy through peft's Auto class: base by its Hub id from adapter_config.
        # A classifier's head is sized by its labels, as the card's snippet passes them.
        head = head_kwargs(case.task, labels)
        remote = _loads(case.task, hub_dir, head).eval()
        got = _logits(remote, tokenizer, case.task)
        assert torch.allclose(expected, got, atol=1e-5), (expected - got).abs().max()
        with remote.disable_adapter():
            bare = _logits(remote, tokenizer, case.task)
        assert (got - bare).abs().max() > 1e-4

        inputs = tokenizer(PROBE, return_tensors="pt")
        if case.task == "seq2seq-lm":
            kw = dict(max_new_tokens=6, do_sample=False)
            assert torch.equal(local.generate(**inputs, **kw), remote.generate(**inputs, **kw))
        elif case.task == "causal-lm":
            kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            want = local.generate(**inputs, **kw)
            assert torch.equal(want, remote.generate(**inputs, **kw))
            pipe = pipeline("text-generation", model=hub_dir, tokenizer=tokenizer)
            out = pipe(PROBE, max_new_tokens=6, do_sample=False, return_full_text=False)
            new = tokenizer.decode(want[0, inputs["input_ids"].shape[1]:],
                                   skip_special_tokens=True)
            assert out[0]["generated_text"] == new
        else:
            pipe = pipeline(PIPELINES[case.task], model=hub_dir, tokenizer=tokenizer,
                            model_kwargs=head)
            out = pipe(PROBE)
            if case.task == "seq-classification":
                assert out[0]["label"] == labels[int(expected[0].argmax())]
            else:
                tags = [labels[int(i)] for i in expected[0].argmax(-1)]
                entities = {o["index"]: o["entity"] for o in out}
                ids = inputs["input_ids"][0].tolist()
                # The pipeline leaves out "O" (and special tokens); the rest must agree.
                assert entities == {i: t for i, t in enumerate(tags)
                                    if t != "O" and ids[i] not in tokenizer.all_special_ids}

        if case.merged:
            _check_merged(report, f"{repo}-merged", expected, bare, tokenizer, tmp_path)


def _check_merged(report: dict, repo: str, expected, bare, tokenizer, tmp_path) -> None:
    """The merged export of an adapter on a tied-embedding base loads with the plain
    Auto class and gives the adapter's logits: the head's change was not dropped by a
    config that re-ties it on load."""
    import torch
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM

    assert report["hub"]["merged"]["repo_id"] == repo
    local = snapshot_download(repo, revision=report["hub"]["merged"]["commit"],
                              cache_dir=tmp_path / "merged")
    config = json.loads((Path(local) / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).eval()
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    got = _logits(model, tokenizer, "causal-lm")
    # The export is 16-bit: rounding stays far below what the adapter changes.
    err = (got - expected).abs().max().item()
    assert err < 0.1 * (expected - bare).abs().max().item(), err
