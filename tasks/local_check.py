"""check_local_adapter: the trained adapter on disk is whole and changes the model.

The check a run with `publish.when: on_approval` ends with, in place of the Hub
verification: the adapter file still has the sha256 training recorded, it loads on the
base model with peft, its logits on a fixed prompt are finite, and they differ from the
bare base model's. Cached by (base commit, adapter sha256, this module's code).
"""
from __future__ import annotations

from pathlib import Path

from prefect import task

from profiles.schema import Profile
from tasks import errors
from tasks.cache.keys import code_version, stable_hash
from tasks.cache.manifest import sha256_file
from tasks.cache.policy import cache_options
from tasks.contracts import RECORD, LocalCheckResult, SnapshotManifest, TrainResult

PROBE = "Below is an instruction that describes a task. Write a response."
MIN_EFFECT = 1e-5


def local_check_key(train: TrainResult, snapshot: SnapshotManifest, **_) -> str:
    return stable_hash("local_check", snapshot.repo_id, snapshot.commit, train.adapter_sha256,
                       code_version("tasks.local_check"))


def run_local_check(train: TrainResult, snapshot: SnapshotManifest,
                    profile: Profile) -> LocalCheckResult:
    """Load the local adapter on the base and compare its logits with the bare base.

    Raises:
        VerificationError: the adapter file changed since training, its logits are not
            finite, or it leaves the base model's logits unchanged.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tasks.model_tasks import probe_inputs, record_labels
    from tasks.training.modeling import load_base_model

    weights = Path(train.adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file() or sha256_file(weights) != train.adapter_sha256:
        raise errors.VerificationError(
            f"{weights} is gone or no longer has the sha256 training recorded. Fix: re-run "
            "the training (its cache entry is treated as a miss once the file changed).")
    base = load_base_model(profile.model, profile.quantization, snapshot.local_dir,
                           labels=record_labels(Path(train.run_dir) / RECORD))
    model = PeftModel.from_pretrained(base, train.adapter_dir)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(snapshot.local_dir)
    inputs = probe_inputs(profile.model.task, tokenizer, model, PROBE)
    with torch.no_grad():
        tuned = model(**inputs).logits.float()
        with model.disable_adapter():
            bare = model(**inputs).logits.float()
    if not torch.isfinite(tuned).all():
        raise errors.VerificationError(
            f"the adapter in {train.adapter_dir} gives non-finite logits. Fix: lower "
            "training.learning_rate or check the data, then re-run.")
    effect = (tuned - bare).abs().max().item()
    if effect <= MIN_EFFECT:
        raise errors.VerificationError(
            f"the adapter in {train.adapter_dir} changes nothing: its logits equal the base "
            "model's. Fix: check that training changed the adapter weights.")
    return LocalCheckResult(adapter_dir=train.adapter_dir, adapter_sha256=train.adapter_sha256,
                            max_abs_diff_vs_base=effect)


@task(name="local_check", **cache_options(local_check_key))
def check_local_adapter(train: TrainResult, snapshot: SnapshotManifest,
                        profile: Profile) -> LocalCheckResult:
    """Prefect task: run_local_check, cached by (base commit, adapter sha256)."""
    return run_local_check(train, snapshot, profile)
