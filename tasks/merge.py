"""publish_merged: the base with the adapter merged in, as 16-bit safetensors, pushed to
its own repo (`<repo_id>-merged`) with its own card — for serving stacks without peft.

Off by default (`publish.merged`). Uses the same atomic, idempotent push as the adapter.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import task

from profiles.schema import Profile
from tasks import errors, settings
from tasks.cache.policy import REPORT_HOOKS
from tasks.contracts import RECORD, PublishResult, SnapshotManifest, TrainResult
from tasks.hub import hub_api
from tasks.model_tasks import head_kwargs, record_labels, task_type, tied_weight_keys
from tasks.publication.commit import ensure_repo, push_bundle
from tasks.publication.modelcard import LINEAGE, card_metadata, lineage_manifest

TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "chat_template", "generation_config")


def merged_repo_id(repo_id: str) -> str:
    return f"{repo_id}-merged"


def merged_dtype(profile: Profile):
    """16-bit: the profile's dtype when it is 16-bit, else bfloat16."""
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(profile.model.dtype,
                                                                      torch.bfloat16)


def _untie_adapted_head(model) -> bool:
    """Give a tied head its own weight before merging when a LoRA layer wraps it.

    With tied embeddings the head's weight *is* the input embeddings' (Llama-3.2, Qwen2,
    Gemma, GPT-2 …). Merging a LoRA on the head would write its delta into that shared
    tensor (the embeddings change too, and with peft's ensure_weight_tying the
    embeddings' own tied LoRA adds it a second time); saving with tie_word_embeddings
    true would then drop the head on reload. So the head gets a copy of the weight
    first, and the config says untied. peft does the same itself for a head saved in
    full (modules_to_save). Returns whether it untied anything.
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tasks.training.adapters import tied_embeddings

    base = model.get_base_model()
    head = base.get_output_embeddings()
    if not tied_embeddings(base) or not isinstance(head, BaseTunerLayer):
        return False
    layer = head.get_base_layer()
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    _set_untied(base.config)
    return True


def _set_untied(config) -> None:
    config.tie_word_embeddings = False
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        text.tie_word_embeddings = False


def _probe_logits(model, local_dir: str, task: str):
    import torch
    from transformers import AutoTokenizer

    from tasks.model_tasks import probe_inputs

    tokenizer = AutoTokenizer.from_pretrained(local_dir)
    inputs = probe_inputs(task, tokenizer, model, PROBE)
    with torch.no_grad():
        return model(**inputs).logits.float()


PROBE = "Below is an instruction that describes a task. Write a response."
# Relative to the logits' scale: float32 merge rounding is orders of magnitude below it; a
# dropped or doubled head change is not.
MERGE_TOLERANCE = 1e-4


def _refuse_if_differs(got, want, adapter_dir: str, stage: str) -> None:
    diff = (got - want).abs().max().item()
    if diff > MERGE_TOLERANCE * max(1.0, want.abs().max().item()):
        raise errors.PublishError(
            f"publish.merged: {stage} {adapter_dir} into its base changes the adapter's "
            f"logits by up to {diff:.3g} (a base with tied embeddings: the head's change "
            "would be lost or applied twice). Fix: publish the adapter alone "
            "(publish.merged false) and load it with peft.")


def merge_adapter(train: TrainResult, snapshot: SnapshotManifest, profile: Profile) -> Path:
    """merge_and_unload over an unquantized 16-bit base → run_dir/merged/ (safetensors).

    A base with tied embeddings whose head the adapter changes is untied first (see
    _untie_adapted_head). For a tied base, two checks: the float32 merge gives the
    adapter's logits on a fixed prompt, and the saved export, loaded back as a user
    would, holds every merged weight; an export that fails either is refused.

    Raises:
        PublishError: the merged export does not reproduce the adapter.
    """
    import torch
    import transformers
    from peft import PeftModel

    from tasks.training.adapters import tied_embeddings

    out = Path(train.run_dir) / "merged"
    if (out / "config.json").is_file():
        return out
    task = profile.model.task
    auto = getattr(transformers, task_type(task).auto_class)
    labels = head_kwargs(task, record_labels(Path(train.run_dir) / RECORD))
    config = json.loads((Path(snapshot.local_dir) / "config.json").read_text())
    # A tied base is merged and checked in float32 (the check compares exact numbers),
    # then cast; the others merge in the 16-bit dtype they are saved in.
    tied_config = bool(tied_weight_keys(task, config))
    with torch.no_grad():
        base = auto.from_pretrained(
            snapshot.local_dir, dtype=torch.float32 if tied_config else merged_dtype(profile),
            use_safetensors=True, trust_remote_code=profile.model.trust_remote_code, **labels)
        tied = tied_config and tied_embeddings(base)
        model = PeftModel.from_pretrained(base, train.adapter_dir).eval()
        expected = None
        if tied:
            expected = _probe_logits(model, snapshot.local_dir, task)
        _untie_adapted_head(model)
        merged = model.merge_and_unload()
        if tied and not tied_embeddings(merged):
            _set_untied(merged.config)  # what peft leaves tied stays tied in the config
        if expected is not None:
            # The merge itself, in float32: a head delta written into a shared weight
            # shows here.
            _refuse_if_differs(_probe_logits(merged, snapshot.local_dir, task), expected,
                               train.adapter_dir, "merging")
        merged = merged.to(merged_dtype(profile))
    tmp = out.with_name("merged.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    for name in sorted(Path(snapshot.local_dir).iterdir()):
        if name.name.startswith(TOKENIZER_PREFIXES):
            shutil.copy2(name, tmp / name.name)
    if tied:
        # The export as a user loads it must hold the merged weights, every one: a config
        # that re-ties the head on load (dropping its change) shows here.
        again = auto.from_pretrained(str(tmp), dtype=merged_dtype(profile),
                                     use_safetensors=True, **labels)
        loaded = dict(again.named_parameters(remove_duplicate=False))
        lost = [n for n, p in merged.named_parameters()
                if n not in loaded or not torch.equal(loaded[n], p)]
        # Other loaders (serving stacks, converters) re-tie a head the config calls tied.
        if not tied_embeddings(merged) and getattr(
                again.config.get_text_config(), "tie_word_embeddings", False):
            lost.append("tie_word_embeddings")
        if lost:
            shutil.rmtree(tmp, ignore_errors=True)
            raise errors.PublishError(
                f"publish.merged: the merged export of {train.adapter_dir} does not load "
                f"back as merged ({', '.join(lost[:3])} differ; tie_word_embeddings="
                f"{again.config.tie_word_embeddings}: a re-tied head loses its change). "
                "Fix: publish the adapter alone (publish.merged false) and load it with peft.")
    tmp.rename(out)  # a crash mid-save leaves no half "merged" directory behind
    return out


def _merged_card(record: dict, repo_id: str, adapter_repo: str) -> str:
    from huggingface_hub import ModelCard

    base = record["base_model"]
    auto = task_type(record["profile"]["model"].get("task", "causal-lm")).auto_class
    body = f"""
# {repo_id}

`{base['repo_id']}` (commit `{base['commit']}`) with the LoRA adapter
[`{adapter_repo}`]({adapter_repo}) merged into its weights (16-bit safetensors), so it
loads without peft:

```python
from transformers import {auto}
model = {auto}.from_pretrained("{repo_id}")
```

The adapter's card describes the training run in full; `{LINEAGE}` here is the same
lineage manifest (adapter sha256 `{record['adapter']['sha256']}`).
"""
    data = card_metadata(record, repo_id, relation="merge")
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def run_publish_merged(train: TrainResult, snapshot: SnapshotManifest, profile: Profile,
                       adapter: PublishResult) -> PublishResult:
    if profile.quantization.mode != "none":
        raise errors.ProfileError("publish.merged: merging into a quantized base loses "
                                  "precision. Fix: set quantization.mode none for the merged "
                                  "export, or publish.merged false.")
    repo_id = merged_repo_id(profile.publish.repo_id)
    record = json.loads((Path(train.run_dir) / RECORD).read_text())
    merged_dir = merge_adapter(train, snapshot, profile)
    files: dict[str, object] = {p.name: p for p in sorted(merged_dir.iterdir()) if p.is_file()}
    files["README.md"] = _merged_card(record, repo_id, adapter.repo_id).encode()
    files[LINEAGE] = (json.dumps(lineage_manifest(record), indent=1, sort_keys=True)
                      + "\n").encode()
    api = hub_api()
    from huggingface_hub import errors as hf

    try:
        ensure_repo(api, repo_id, profile.publish.private)
        return push_bundle(api, repo_id, files, train.adapter_sha256, adapter.tag,
                           summary="loraflow: publish merged weights")
    except hf.HfHubHTTPError as exc:
        raise errors.translate_hub_error(exc, repo_id=repo_id,
                                         endpoint=settings.hub_endpoint()) from None


@task(name="publish-merged", **REPORT_HOOKS)
def publish_merged(train: TrainResult, snapshot: SnapshotManifest, profile: Profile,
                   adapter: PublishResult) -> PublishResult:
    """Prefect task: run_publish_merged. Idempotent like the adapter's publish."""
    return run_publish_merged(train, snapshot, profile, adapter)
