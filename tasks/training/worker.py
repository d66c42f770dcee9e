"""One torchrun process of a distributed training: `python -m tasks.training.worker LAUNCH_JSON`.

Reads the manifests the task wrote (tasks.training.launch.py), runs the same `run_train` as a
single-process training — transformers' Trainer sees torchrun's environment and wraps
the model in DDP (or FSDP for QLoRA) — and reports its exception type for the parent.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(launch_file: str) -> int:
    from profiles.schema import Profile
    from tasks.contracts import DatasetManifest, PreflightReport, SnapshotManifest
    from tasks.train import run_train
    from tasks.training.launch import report_worker_error

    inputs = json.loads(Path(launch_file).read_text())
    try:
        run_train(Profile.model_validate(inputs["profile"]),
                  PreflightReport.model_validate(inputs["preflight"]),
                  SnapshotManifest.model_validate(inputs["snapshot"]),
                  DatasetManifest.model_validate(inputs["dataset"]),
                  inputs.get("flow_run_id"))
    except BaseException as exc:
        report_worker_error(Path(launch_file).parent, exc)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
