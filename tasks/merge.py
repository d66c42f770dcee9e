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
from tasks.download import SnapshotManifest
from tasks.hub import hub_api
from tasks.modelcard import LINEAGE, card_metadata, lineage_manifest
from tasks.publish import PublishResult, ensure_repo, push_bundle
from tasks.task_types import head_kwargs, record_labels, task_type
from tasks.train import RECORD, TrainResult

TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "chat_template", "generation_config")


def merged_repo_id(repo_id: str) -> str:
    return f"{repo_id}-merged"


def merged_dtype(profile: Profile):
    """16-bit: the profile's dtype when it is 16-bit, else bfloat16."""
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(profile.model.dtype,
                                                                      torch.bfloat16)


def merge_adapter(train: TrainResult, snapshot: SnapshotManifest, profile: Profile) -> Path:
    """merge_and_unload over an unquantized 16-bit base → run_dir/merged/ (safetensors)."""
    import transformers
    from peft import PeftModel

    out = Path(train.run_dir) / "merged"
    if (out / "config.json").is_file():
        return out
    auto = getattr(transformers, task_type(profile.model.task).auto_class)
    base = auto.from_pretrained(snapshot.local_dir, dtype=merged_dtype(profile),
                                use_safetensors=True,
                                trust_remote_code=profile.model.trust_remote_code,
                                **head_kwargs(profile.model.task, record_labels(Path(train.run_dir) / RECORD)))
    merged = PeftModel.from_pretrained(base, train.adapter_dir).merge_and_unload()
    tmp = out.with_name("merged.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    for name in sorted(Path(snapshot.local_dir).iterdir()):
        if name.name.startswith(TOKENIZER_PREFIXES):
            shutil.copy2(name, tmp / name.name)
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


@task(name="publish-merged")
def publish_merged(train: TrainResult, snapshot: SnapshotManifest, profile: Profile,
                   adapter: PublishResult) -> PublishResult:
    """Prefect task: run_publish_merged. Idempotent like the adapter's publish."""
    return run_publish_merged(train, snapshot, profile, adapter)
