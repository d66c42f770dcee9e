"""A training's record (RUN_DIR/record.json) and manifest: what it trained, from what,
with what result — and reading a finished run directory back.

The record holds nothing of `publish.*`: where the adapter goes is said at publish time,
and publishing renders the card and lineage from this record. Only the fields listed in
tasks.train.PER_RUN_FIELDS differ between two runs with one key.
"""
from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

from profiles.schema import Profile
from tasks.cache.manifest import changed_files, read_manifest, write_manifest
from tasks.contracts import (
    RECORD,
    DatasetManifest,
    PreflightReport,
    SnapshotManifest,
    TrainResult,
)
from tasks.training.checkpoints import checkpoint_step

VERSIONED = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "prefect",
             "huggingface_hub", "loraflow")


def finished_run(run_dir: Path) -> Optional[TrainResult]:
    """The result of a finished, unchanged run directory (its cache record was lost,
    e.g. another result storage), without importing torch; None when it is not one."""
    manifest = read_manifest(run_dir)
    if manifest is None or changed_files(run_dir, manifest) != []:
        return None
    try:
        record = json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None
    adapter = record["adapter"]
    return TrainResult(run_dir=str(run_dir), adapter_dir=str(run_dir / "adapter"),
                       adapter_sha256=adapter["sha256"],
                       trainable_params=adapter["trainable_params"],
                       total_params=adapter["total_params"], metrics=record["metrics"])


def mean_train_loss(output, resumed_at: int, log_history: list[dict]) -> float:
    """The mean loss over every step of the run, resumed or not.

    transformers' TrainOutput.training_loss averages only the steps this attempt ran.
    The steps before the resume are taken from the checkpoint's log history: each logged
    loss is the mean over the steps since the previous log, and a log is forced at every
    checkpoint (checkpoints.save_and_stop_callback), so those logs cover steps
    1..resumed_at exactly.
    """
    if not resumed_at:
        return output.training_loss
    total, last = 0.0, 0
    for h in log_history:
        if "loss" in h and last < h["step"] <= resumed_at:
            total, last = total + h["loss"] * (h["step"] - last), h["step"]
    after = output.global_step - resumed_at
    steps = last + after
    return (total + output.training_loss * after) / steps if steps else output.training_loss


def train_metrics(trainer, output, resume: Optional[str], eval_metrics: dict,
                  restored: bool) -> tuple[dict, list[dict]]:
    """The record's metrics and loss history.

    Args:
        trainer: the Trainer after fit (its state holds the log history).
        output: fit's TrainOutput.
        resume: the checkpoint this attempt resumed from, or None.
        eval_metrics: Trainer.evaluate()'s result ({} without an eval split).
        restored: fit took a finished checkpoint's weights instead of training.

    Returns:
        (metrics: losses, steps, runtime in s, peak GPU memory in GiB;
         loss history: [{"step", "loss"}] as logged).
    """
    import torch

    history = trainer.state.log_history
    losses = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    train_loss = (output.training_loss if restored
                  else mean_train_loss(output, checkpoint_step(resume), history))
    metrics = {"train_loss": train_loss, "first_loss": losses[0]["loss"],
               "last_loss": losses[-1]["loss"],
               "eval_loss": eval_metrics.get("eval_loss", evals[-1] if evals else None),
               "steps": trainer.state.global_step, "resumed_from": resume and Path(resume).name,
               "train_runtime_s": output.metrics.get("train_runtime"),
               "peak_gpu_mem_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                    if torch.cuda.is_available() else None)}
    return metrics, losses


def library_versions() -> dict:
    """Installed versions of the libraries a training depends on (None: not installed)."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def flow_run_url(flow_run_id: Optional[str]) -> Optional[str]:
    """The run's page in the Prefect UI, when a server with a UI is configured."""
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui and flow_run_id else None


def hardware() -> dict:
    """The GPUs torch sees, the CPU and the platform."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"gpus": gpus, "cpu": platform.processor() or platform.machine(),
            "platform": platform.platform()}


def build_record(profile: Profile, preflight: PreflightReport, snapshot: SnapshotManifest,
                 dataset: DatasetManifest, *, train_key: str, flow_run_id: Optional[str],
                 adapter: dict, tokenizer: dict, metrics: dict, loss_history: list[dict],
                 distributed: Optional[dict], speed: dict) -> dict:
    """record.json's content.

    Args:
        profile: the profile as given (not as the memory plan changed it); its publish
            section is left out.
        preflight, snapshot, dataset: the step's input manifests.
        train_key: the training's cache key.
        flow_run_id: the flow run that trained (a per-run field).
        adapter: sha256, trainable/total parameter counts, card notes.
        tokenizer: the saved tokenizer's entry (files, pad token, chat template sha256).
        metrics, loss_history: train_metrics' result.
        distributed: distributed.distributed_summary's result (None on one process).
        speed: the speed levers as this run resolved them.
    """
    continued = snapshot.adapter
    return {
        "train_key": train_key, "flow_run_id": flow_run_id,
        "flow_run_url": flow_run_url(flow_run_id),
        # Without the publish section: where the adapter goes is said at publish time.
        "profile": profile.model_dump(mode="json", exclude={"publish"}),
        "memory_plan": preflight.memory.training if preflight.memory else None,
        "base_model": {"repo_id": snapshot.repo_id, "commit": snapshot.commit,
                       "license": preflight.base_model.license,
                       "files": snapshot.file_hashes()},
        # What the dataset step read, dropped (reason → rows) and truncated, for the run
        # summary and the card.
        "dataset": {**preflight.dataset.model_dump(mode="json"), "prepared_key": dataset.key,
                    "num_train": dataset.num_train, "num_eval": dataset.num_eval,
                    "labels": dataset.labels, "rows_read": dataset.rows_read,
                    "dropped": dict(dataset.dropped), "truncated": dataset.truncated},
        "adapter": adapter,
        "tokenizer": tokenizer,
        "continued_from": continued and {
            "repo_id": continued.repo_id, "commit": continued.commit,
            "files": continued.file_hashes(),
            "base_revision_from": preflight.adapter and preflight.adapter.base_revision_from},
        "metrics": metrics, "loss_history": loss_history,
        "versions": library_versions(), "hardware": hardware(),
        "distributed": distributed,
        "speed": speed,
    }


def in_result(rel: str) -> bool:
    """Whether a run-directory file is part of what a cache hit hands on: the adapter and
    the record, not the (changing) checkpoints. The card, lineage and loss curve are not
    training outputs: publishing renders them."""
    return rel.startswith("adapter/") or rel == RECORD


def write_record(run_dir: Path, record: dict, key_inputs: dict) -> None:
    """RUN_DIR/record.json, then the manifest that makes the run a finished one
    (finished_run; the step's cache check)."""
    (run_dir / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
    write_manifest(run_dir, {"step": "train", "inputs": key_inputs}, include=in_result)
