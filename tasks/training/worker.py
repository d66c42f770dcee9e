"""One torchrun process of a distributed training: `python -m tasks.training.worker LAUNCH_JSON`.

Reads the launch file the train step wrote (tasks.train.launch_inputs: the manifests, the
key inputs and the run directory), runs the same `run_train` as a single-process
training — transformers' Trainer sees torchrun's environment and wraps the model in DDP
(or FSDP for QLoRA) — and reports its exception type for the parent.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from profiles.schema import Profile
from tasks.contracts import (
    DatasetManifest,
    PreflightReport,
    SnapshotManifest,
    TrainResult,
)
from tasks.training.launch import report_worker_error
from tasks.training.run import run_train


def run_launch(inputs: dict) -> Optional[TrainResult]:
    """run_train over a launch file's content (tasks.train.launch_inputs).

    Returns:
        run_train's result: the TrainResult on rank 0, None on the other ranks.
    """
    return run_train(Profile.model_validate(inputs["profile"]),
                     PreflightReport.model_validate(inputs["preflight"]),
                     SnapshotManifest.model_validate(inputs["snapshot"]),
                     DatasetManifest.model_validate(inputs["dataset"]),
                     Path(inputs["run_dir"]), inputs["train_inputs"],
                     inputs.get("flow_run_id"))


def main(launch_file: str) -> int:
    inputs = json.loads(Path(launch_file).read_text())
    try:
        run_launch(inputs)
    except BaseException as exc:
        report_worker_error(Path(launch_file).parent, exc)
        raise
    # Destroyed while the interpreter is whole, as torch asks of every process: left to
    # interpreter exit, gloo's threads can still hold finished work whose tensors then
    # abort a rank that trained correctly (SIGABRT, "terminate called without an active
    # exception"; pytorch PR #179291). Local: no other rank waits on it.
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
