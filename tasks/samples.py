"""generate_samples: what the adapter says, beside what the base says, on a few held-out
prompts — for the person who approves a run and for the model card.

The prompts are the first rows of the prepared dataset's evaluation split (rows training
never saw): each row's prompt is its masked prefix (labels -100, as the dataset step
wrote it, so the exact tokens training saw, special tokens and template included), and
the rest of the row is shown as the reference. A row with nothing masked (text format,
or `data.mask_prompt: false`) is cut in half. Generation is greedy and short: the
point is a side-by-side a person reads in seconds, not a benchmark.

Causal LMs only; other tasks (and runs without an evaluation split) return a result that
says why it has no samples. Cached by (base commit, adapter sha256, prepared dataset key,
how many samples and tokens, this module's code): the prompts are a function of the
prepared dataset, so a re-run after an approval, or a re-publish, is a hit and needs no
GPU.
"""
from __future__ import annotations

from pathlib import Path

from prefect import task

from profiles.schema import Profile
from tasks.cache.keys import code_version, stable_hash
from tasks.cache.policy import cache_options
from tasks.contracts import (
    RECORD,
    DatasetManifest,
    Sample,
    SamplesResult,
    SnapshotManifest,
    TrainResult,
)
from tasks.model_tasks import IGNORE_INDEX

NUM_SAMPLES = 3
MAX_NEW_TOKENS = 24


def samples_key(train: TrainResult, snapshot: SnapshotManifest, dataset: DatasetManifest,
                profile: Profile, **_) -> str:
    return stable_hash("samples", snapshot.repo_id, snapshot.commit, train.adapter_sha256,
                       dataset.key, profile.model.task, NUM_SAMPLES, MAX_NEW_TOKENS,
                       code_version("tasks.samples"))


def held_out_prompts(dataset: DatasetManifest, n: int = NUM_SAMPLES
                     ) -> tuple[list[tuple[list[int], list[int]]], str]:
    """(prompt ids, reference ids) of the first `n` evaluation rows, and where they came from.

    Args:
        dataset: the prepared dataset's manifest.
        n: how many rows.
    Returns:
        The pairs (empty when there is no evaluation split) and a phrase naming the source.
    """
    from datasets import load_from_disk

    eval_dir = Path(dataset.path) / "eval"
    if dataset.num_eval == 0 or not eval_dir.is_dir():
        return [], "no evaluation rows (data.eval_split: 0)"
    rows = load_from_disk(str(eval_dir))
    pairs = []
    for row in rows.select(range(min(n, len(rows)))):
        ids, labels = row["input_ids"], row["labels"]
        cut = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
        if cut == 0 or cut >= len(ids):  # nothing masked (or nothing left): halve the row
            cut = max(1, len(ids) // 2)
        pairs.append((ids[:cut], ids[cut:]))
    return pairs, f"the first {len(pairs)} evaluation rows of the prepared dataset"


def run_samples(train: TrainResult, snapshot: SnapshotManifest, dataset: DatasetManifest,
                profile: Profile) -> SamplesResult:
    """Generate greedily from the held-out prompts with the adapter on and off.

    Args:
        train: the training's result (the adapter to load).
        snapshot: the downloaded base model.
        dataset: the prepared dataset (its evaluation split holds the prompts).
        profile: the run's profile (model loading and quantization settings).
    Returns:
        The samples, or a result whose `skipped` says why there are none.
    """
    if profile.model.task != "causal-lm":
        return SamplesResult(adapter_sha256=train.adapter_sha256,
                             skipped=f"model.task {profile.model.task}: samples are "
                                     "generated for causal-lm adapters only")
    pairs, source = held_out_prompts(dataset)
    if not pairs:
        return SamplesResult(adapter_sha256=train.adapter_sha256, skipped=source)

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tasks.model_tasks import record_labels
    from tasks.training.modeling import load_base_model

    adapter_dir = Path(train.adapter_dir)
    # The tokenizer training used (saved with the adapter), else the base's.
    tok_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() \
        else Path(snapshot.local_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    base = load_base_model(profile.model, profile.quantization, snapshot.local_dir,
                           labels=record_labels(Path(train.run_dir) / RECORD))
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id

    def generate(ids: list[int]) -> str:
        inputs = torch.tensor([ids], device=model.device)
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                             max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=pad_id)
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    samples = []
    with torch.no_grad():
        for prompt, reference in pairs:
            tuned = generate(prompt)
            with model.disable_adapter():
                bare = generate(prompt)
            samples.append(Sample(prompt=tokenizer.decode(prompt, skip_special_tokens=True),
                                  reference=tokenizer.decode(reference,
                                                             skip_special_tokens=True),
                                  base=bare, adapter=tuned))
    return SamplesResult(adapter_sha256=train.adapter_sha256, max_new_tokens=MAX_NEW_TOKENS,
                         source=source, samples=samples)


@task(name="samples", **cache_options(samples_key))
def generate_samples(train: TrainResult, snapshot: SnapshotManifest, dataset: DatasetManifest,
                     profile: Profile) -> SamplesResult:
    """Prefect task: run_samples, cached by (base commit, adapter sha256, dataset key)."""
    return run_samples(train, snapshot, dataset, profile)

