"""train_adapter: the training step — its key, its run directory, and where it runs.

What a training is keyed by (train_inputs) and where it lands (LORAFLOW_HOME/runs/<key>/:
checkpoints, the adapter, the initial adapter weights, record.json, manifest.json) are
decided here; the training itself is tasks.training.run.run_train (setup → resume → fit →
save → record), run in this process or by every rank of a torchrun job
(tasks.training.launch, tasks.training.worker). A re-run after a crash finds the
checkpoints in the run directory and resumes; a finished run directory is adopted as is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import task

from profiles.schema import Profile
from tasks import errors, settings
from tasks.cache.keys import cache_key, code_inputs
from tasks.cache.manifest import changed_files
from tasks.cache.policy import cache_options
from tasks.contracts import (
    DatasetManifest,
    PreflightReport,
    SnapshotManifest,
    TrainResult,
)
from tasks.retry import TRANSIENT_RETRIES
from tasks.training.checkpoints import STEP_LOG
from tasks.training.launch import resolve_launcher, run_torchrun
from tasks.training.record import finished_run
from tasks.training.run import run_train

# Record fields that belong to one execution, not to what the key says: the only parts of
# a run directory's training outputs that differ between two runs with one key (with
# train_log.jsonl, the per-attempt log). Everything else is a function of the key.
PER_RUN_FIELDS = ("flow_run_id", "flow_run_url", "metrics.train_runtime_s",
                  "metrics.peak_gpu_mem_gib", "metrics.resumed_from")
PER_RUN_FILES = (STEP_LOG,)
# Checkpointing knobs: they change when state is saved, not what is learned (a resumed
# run matches an uninterrupted one), so changing them must not retrain.
# How many processes run it, and the data-parallel engine that spreads it (DDP or FSDP),
# are left out too: global_batch_size keeps the training the same on 1 or N GPUs.
NOT_IN_KEY = {"save_steps", "save_total_limit", "launcher", "nproc_per_node", "data_parallel"}


def train_inputs(profile: Profile, snapshot: SnapshotManifest, dataset: DatasetManifest) -> dict:
    """What keys a training: base repo@commit and every file's sha256, the prepared
    dataset's key, the model/quantization/lora/training settings and this step's code.
    Left out on purpose: the publish section (where an adapter goes must not retrain
    it, and nothing of it is in the outputs either), model.revision (the commit says it
    without moving), checkpoint cadence.
    A continued adapter (model.id is an adapter repo) keys by its repo@commit and files."""
    inputs = {"base": {"repo_id": snapshot.repo_id, "commit": snapshot.commit,
                       "files": snapshot.file_hashes()},
              "dataset": dataset.key,
              "model": profile.model.model_dump(mode="json",
                                                exclude={"revision", "base_revision"}),
              "quantization": profile.quantization.model_dump(mode="json"),
              "lora": profile.lora.model_dump(mode="json"),
              "training": profile.training.model_dump(mode="json", exclude=NOT_IN_KEY),
              "code": code_inputs("tasks.train")}
    if snapshot.adapter is not None:
        inputs["adapter"] = {"repo_id": snapshot.adapter.repo_id,
                             "commit": snapshot.adapter.commit,
                             "files": snapshot.adapter.file_hashes()}
    return inputs


def train_key(profile: Profile, snapshot: SnapshotManifest, dataset: DatasetManifest,
              **_) -> str:
    """The training's cache key: `train-<sha256 of train_inputs>`."""
    return cache_key("train", train_inputs(profile, snapshot, dataset))


def run_dir_for(key: str) -> Path:
    """The run directory of a training key: LORAFLOW_HOME/runs/<key>."""
    return settings.loraflow_home() / "runs" / key


def launch_inputs(profile: Profile, preflight: PreflightReport, snapshot: SnapshotManifest,
                  dataset: DatasetManifest, flow_run_id: Optional[str] = None) -> dict:
    """Everything run_train takes, as JSON: what a torchrun worker reads from
    RUN_DIR/launch.json (tasks.training.worker). train_adapter's own torchrun and the
    multi-node recipe (deployments/k8s/prepare_launch.py) both write this, so the key and
    the run directory are decided here, once.

    Returns:
        profile, preflight, snapshot, dataset (their JSON dumps), flow_run_id, the
        train_inputs that key the run and its run_dir.
    """
    inputs = train_inputs(profile, snapshot, dataset)
    return {"profile": profile.model_dump(mode="json"),
            "preflight": preflight.model_dump(mode="json"),
            "snapshot": snapshot.model_dump(mode="json"),
            "dataset": dataset.model_dump(mode="json"), "flow_run_id": flow_run_id,
            "train_inputs": inputs, "run_dir": str(run_dir_for(cache_key("train", inputs)))}


def train_is_cached_and_intact(profile, snapshot, dataset, **_) -> bool:
    """Whether the run directory of this key holds its finished outputs, unchanged."""
    return changed_files(run_dir_for(train_key(profile, snapshot, dataset))) == []


@task(name="train", **cache_options(train_key, train_is_cached_and_intact), **TRANSIENT_RETRIES)
def train_adapter(profile: Profile, preflight: PreflightReport, snapshot: SnapshotManifest,
                  dataset: DatasetManifest, flow_run_id: Optional[str] = None) -> TrainResult:
    """Prefect task: train the adapter in the run directory of its key — in this process,
    or as a torchrun job over this machine's GPUs (training.launcher); cached by
    train_key; a retry resumes from the last checkpoint.

    Args:
        profile: the profile as given.
        preflight, snapshot, dataset: the earlier steps' manifests.
        flow_run_id: the flow run, for the record.

    Returns:
        The adapter directory, its sha256, parameter counts and metrics.

    Raises:
        TrainingInterrupted: SIGTERM/SIGINT arrived; a checkpoint was saved first.
        OutOfMemoryError, TrainingError: as named.
        DistributedTrainingError: a rank of the torchrun job died (transient: retried).
    """
    launch = launch_inputs(profile, preflight, snapshot, dataset, flow_run_id)
    out = Path(launch["run_dir"])
    launcher, nproc = resolve_launcher(profile.training, device_map=profile.model.device_map)
    if launcher == "single":
        from tasks.training.speed import undo_module_patches

        try:
            return run_train(profile, preflight, snapshot, dataset, out,
                             launch["train_inputs"], flow_run_id)
        finally:
            undo_module_patches()  # later steps of this process load models unpatched
    from prefect.logging import get_run_logger

    run_torchrun(out, launch, nproc, log=get_run_logger().info)
    result = finished_run(out)
    if result is None:
        raise errors.TrainingError(f"the torchrun job exited cleanly but left no finished "
                                   f"run in {out}. Fix: check the job's log above.")
    return result
