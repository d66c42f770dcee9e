"""Measure the peak memory of loraflow's own training path and compare it with the
preflight estimate (tasks/memory/) for the same profile.

The path is the pipeline's: tasks.training.modeling.load_base_model + inject_adapter, then
tasks.training.run.build_trainer's Trainer over a prepared dataset on disk, for a few steps.
Rows are exactly data.max_length tokens (random ids over the whole vocabulary), so the
estimate's worst case (full-length batches) is what runs.
"""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from profiles.loader import load_profile


def bench_profile(sets: list[str]):
    """The llama-3.2-1b-lora preset with overrides (the model id is not used here)."""
    return load_profile("llama-3.2-1b-lora", ["data.eval_split=0", "training.eval_steps=null",
                                              "training.save_steps=1000",
                                              "training.logging_steps=1",
                                              "training.warmup_ratio=0",
                                              "training.gradient_accumulation_steps=1",
                                              # the eager path the estimate models
                                              "training.torch_compile=false", *sets])


def write_dataset(directory: Path, rows: int, length: int, vocab: int, seed: int = 0):
    import datasets
    import numpy as np

    from tasks.contracts import DatasetManifest

    rs = np.random.RandomState(seed)
    ids = rs.randint(4, vocab, size=(rows, length)).tolist()
    datasets.Dataset.from_dict({"input_ids": ids, "labels": ids,
                                "attention_mask": [[1] * length] * rows}).save_to_disk(
        str(directory / "train"))
    return DatasetManifest(path=str(directory), key="bench", num_train=rows, num_eval=0,
                           train_tokens=rows * length)


def measure(profile, checkpoint: Path, work: Path, steps: int = 3) -> dict:
    """Estimate, then train `steps` steps and read torch's peak allocation."""
    import torch
    from transformers import AutoTokenizer

    from tasks.memory.estimate import estimate_training_memory
    from tasks.memory.tensors import read_safetensors_headers
    from tasks.training.modeling import inject_adapter, load_base_model
    from tasks.training.run import build_trainer

    config = json.loads((checkpoint / "config.json").read_text())
    est = estimate_training_memory(profile, read_safetensors_headers(checkpoint), config,
                                   on_gpu=torch.cuda.is_available())
    t = profile.training
    profile = profile.model_copy(update={"training": t.model_copy(update={"max_steps": steps})})
    manifest = write_dataset(work, rows=steps * t.per_device_batch_size *
                             t.gradient_accumulation_steps, length=profile.data.max_length,
                             vocab=config["vocab_size"])
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    cuda = torch.cuda.is_available()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.monotonic()
    base = load_base_model(profile.model, profile.quantization, str(checkpoint))
    loaded = torch.cuda.memory_allocated() - before if cuda else None
    model = inject_adapter(base, profile.lora, profile.quantization, t.gradient_checkpointing)
    trainer, _ = build_trainer(profile, model, tokenizer, manifest, work / "run")
    result = trainer.train()
    seconds = time.monotonic() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {"estimate": est.model_dump(), "estimated_peak_gib": est.peak_bytes / 2**30,
           "loaded_bytes": loaded, "losses": losses, "seconds": round(seconds, 1),
           "train_runtime": result.metrics.get("train_runtime")}
    if cuda:
        peak = torch.cuda.max_memory_allocated() - before
        out.update(measured_peak_gib=peak / 2**30,
                   measured_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                   ratio=est.peak_bytes / peak)
    del trainer, model, base
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out
