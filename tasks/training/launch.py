"""Running training as a torchrun job over N processes (DDP, or FSDP for QLoRA).

train_adapter stays one Prefect task: with more than one process it launches
`torch.distributed.run` as a subprocess over the same manifests (written to the run
directory), streams its output into the run's log, and reads the adapter and metrics
back from the run directory, where only rank 0 writes them. A non-zero exit becomes a
typed error: a collective that timed out or a peer that vanished (NCCL/Gloo) is
transient and retried — the retry resumes from the last checkpoint — anything else
is a TrainingError. The subprocess keeps the parent's environment (NCCL settings too).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional

from profiles.schema import TrainingSection
from tasks import errors
from tasks.memory import devices

LAUNCH_FILE = "launch.json"
WORKER_ERROR = "worker_error.json"
# Exception types a rank reports that mean "the group broke", not "the inputs are bad".
TRANSIENT_WORKER_ERRORS = {"DistBackendError", "DistNetworkError", "DistStoreError",
                           "RendezvousError", "ChildFailedError"}


def spreads(device_map) -> bool:
    """Whether a model.device_map places one model over several devices (auto, or a
    module map naming more than one): the one process already uses every GPU."""
    if device_map == "auto":
        return True
    return isinstance(device_map, dict) and len({str(v) for v in device_map.values()}) > 1


def resolve_launcher(training: TrainingSection, gpus: Optional[int] = None,
                     device_map=None) -> tuple[str, int]:
    """("single", 1) or ("torchrun", nproc) for this machine and profile. `auto` runs one
    process on one GPU, or when model.device_map spreads one model over the GPUs (data
    parallelism would load that spread model once per process); else one per GPU.

    Args:
        training: the profile's training section (launcher, nproc_per_node).
        gpus: how many GPUs to plan for, when the caller has counted them already;
            else those of the one device inventory (tasks.memory.devices.visible_gpus).
        device_map: the profile's model.device_map.
    """
    gpus = len(devices.visible_gpus()) if gpus is None else gpus
    nproc = training.nproc_per_node or max(gpus, 1)
    if training.launcher == "single" or (training.launcher == "auto" and (
            spreads(device_map) or (gpus <= 1 and not training.nproc_per_node))):
        return "single", 1
    return ("torchrun", nproc) if nproc > 1 or training.launcher == "torchrun" else ("single", 1)


class World(NamedTuple):
    """Where this process stands in a torchrun job."""
    rank: int
    local_rank: int
    size: int


def world() -> World:
    """This process's rank, local rank and world size (0, 0, 1 outside torchrun)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("WORLD_SIZE", 1)))


def accumulation_steps(training: TrainingSection, world_size: int) -> int:
    """gradient_accumulation_steps so that per_device × processes × steps = global batch."""
    if training.global_batch_size is None:
        return training.gradient_accumulation_steps
    per_step = training.per_device_batch_size * world_size
    if training.global_batch_size % per_step:
        raise errors.ProfileError(
            f"training.global_batch_size: {training.global_batch_size} is not a multiple of "
            f"per_device_batch_size × processes = {training.per_device_batch_size} × "
            f"{world_size}. Fix: choose a multiple of {per_step}.")
    return training.global_batch_size // per_step


def report_worker_error(run_dir: Path, exc: BaseException) -> None:
    """Called in a rank that failed: its exception type, for the parent to classify."""
    rank = world().rank
    path = Path(run_dir) / WORKER_ERROR
    payload = {"rank": rank, "type": type(exc).__name__, "message": str(exc)[:2000],
               "transient": type(exc).__name__ in TRANSIENT_WORKER_ERRORS,
               "loraflow_error": isinstance(exc, errors.LoraflowError)}
    if not path.exists() or rank == 0:
        path.write_text(json.dumps(payload))


def run_torchrun(run_dir: Path, inputs: dict, nproc: int, log=print) -> None:
    """torch.distributed.run over `nproc` local processes of tasks.training.worker.

    Args:
        run_dir: the run directory; the launch file is written there.
        inputs: what the workers read from the launch file (train_adapter's launch inputs).
        nproc: processes to start.
        log: where the ranks' output lines go.

    Raises:
        DistributedTrainingError: a rank died or a collective broke (transient: a retry
            resumes from the last checkpoint).
        TrainingError: a rank failed for a reason a retry does not heal.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LAUNCH_FILE).write_text(json.dumps(inputs))
    (run_dir / WORKER_ERROR).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "tasks.training.worker", str(run_dir / LAUNCH_FILE)]
    log(f"launching {nproc} training processes: {' '.join(cmd[1:])}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ.copy(), cwd=Path(__file__).resolve().parents[2])
    for line in proc.stdout:  # stream the ranks' output into the task's log
        log(line.rstrip())
    code = proc.wait()
    if code == 0:
        return
    failure = {}
    if (run_dir / WORKER_ERROR).is_file():
        failure = json.loads((run_dir / WORKER_ERROR).read_text())
    what = (f"rank {failure.get('rank')} raised {failure.get('type')}: {failure.get('message')}"
            if failure else f"a training process died (torchrun exit code {code})")
    if failure.get("loraflow_error") and not failure.get("transient"):
        raise errors.TrainingError(f"distributed training failed: {what}")
    # A rank killed or a collective broken: retrying resumes from the last checkpoint.
    raise errors.DistributedTrainingError(
        f"distributed training failed: {what}. The run's checkpoints are kept; a retry "
        "resumes from the last one.")
