"""verify_publication: the adapter on the Hub reproduces the local adapter.

Downloads the adapter by commit sha into an empty cache, loads it next to the local
adapter on one copy of the base, and compares logits on a fixed prompt: the Hub copy
must match the local adapter and differ from the bare base model.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task

from profiles.schema import Profile
from tasks import errors, settings
from tasks.cache.keys import stable_hash
from tasks.cache.policy import cache_options
from tasks.contracts import (
    ADAPTER_FILES,
    RECORD,
    PublishResult,
    SnapshotManifest,
    TrainResult,
    VerifyResult,
)
from tasks.retry import TRANSIENT_RETRIES

PROBE = "Below is an instruction that describes a task. Write a response."
MATCH_TOLERANCE = 1e-5


def verify_key(publication: PublishResult, train: TrainResult, **_) -> str:
    return stable_hash("verify", publication.repo_id, publication.commit, train.adapter_sha256)


def run_verify(publication: PublishResult, train: TrainResult, snapshot: SnapshotManifest,
               profile: Profile) -> VerifyResult:
    import torch
    from huggingface_hub import snapshot_download
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tasks.model_tasks import probe_inputs, record_labels
    from tasks.training.modeling import load_base_model

    with tempfile.TemporaryDirectory() as empty_cache:
        hub_dir = snapshot_download(publication.repo_id, revision=publication.commit,
                                    allow_patterns=list(ADAPTER_FILES), cache_dir=empty_cache,
                                    endpoint=settings.hub_endpoint(), token=settings.hub_token())
        base = load_base_model(profile.model, profile.quantization, snapshot.local_dir,
                               labels=record_labels(Path(train.run_dir) / RECORD))
        model = PeftModel.from_pretrained(base, train.adapter_dir, adapter_name="local")
        model.load_adapter(hub_dir, adapter_name="hub")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(snapshot.local_dir)
    inputs = probe_inputs(profile.model.task, tokenizer, model, PROBE)
    with torch.no_grad():
        model.set_adapter("local")
        local = model(**inputs).logits.float()
        model.set_adapter("hub")
        hub = model(**inputs).logits.float()
        with model.disable_adapter():
            bare = model(**inputs).logits.float()
    result = VerifyResult(repo_id=publication.repo_id, commit=publication.commit,
                          max_abs_diff_vs_local=(hub - local).abs().max().item(),
                          max_abs_diff_vs_base=(hub - bare).abs().max().item())
    if result.max_abs_diff_vs_local > MATCH_TOLERANCE:
        raise errors.VerificationError(
            f"{publication.repo_id}@{publication.commit} gives logits up to "
            f"{result.max_abs_diff_vs_local:.2e} away from the local adapter. Fix: re-publish "
            "the run (loraflow publish) and check the Hub copy is not stale.")
    if result.max_abs_diff_vs_base <= MATCH_TOLERANCE:
        raise errors.VerificationError(
            f"{publication.repo_id}@{publication.commit} changes nothing: its logits equal the "
            "base model's. Fix: check that training changed the adapter weights.")
    return result


@task(name="verify", **cache_options(verify_key), **TRANSIENT_RETRIES)
def verify_publication(publication: PublishResult, train: TrainResult,
                       snapshot: SnapshotManifest, profile: Profile) -> VerifyResult:
    """Prefect task: run_verify, cached by (Hub commit, adapter sha256)."""
    return run_verify(publication, train, snapshot, profile)
