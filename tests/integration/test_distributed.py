"""Training as a torchrun job (CPU, gloo) through the real flow: two processes train
like one at the same global batch, only rank 0 writes, and a killed rank fails the
attempt with a typed, transient error whose retry resumes from the last checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import run_profile
from profiles.loader import load_profile
from tasks.contracts import CUDA_CONTEXT_BYTES, Gpu
from tasks.memory import devices
from tasks.memory.estimate import HEADROOM
from tasks.preflight import run_preflight

ROOT = Path(__file__).resolve().parents[2]
DDP = ["training.launcher=torchrun", "training.nproc_per_node=2",
       "training.global_batch_size=16", "training.per_device_batch_size=8"]


def _events(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / name
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def test_two_processes_train_like_one_at_the_same_global_batch(hub, as_user):
    overrides = ["publish.repo_id=loraflow-demo/ddp", "training.seed=7"]
    with as_user("demo"):
        single = run_profile("quickstart", load_profile("quickstart", overrides))
        ddp = run_profile("quickstart", load_profile("quickstart", overrides + DDP))
    assert single["status"] == ddp["status"] == "completed", ddp["error"]
    run_dir = Path(ddp["adapter"]["path"]).parent
    assert run_dir != Path(single["adapter"]["path"]).parent
    assert _events(run_dir, "train_log.rank1.jsonl"), "rank 1 did not train"
    assert not (run_dir / "adapter" / "training_args.bin").exists()
    record = json.loads((run_dir / "record.json").read_text())
    assert record["distributed"] == {
        "world_size": 2, "strategy": "ddp", "replicas_identical": True,
        "why": "auto: no GPU memory to compare, so DDP (each process holds a full copy)"}
    s, d = single["metrics"], ddp["metrics"]
    assert d["steps"] == s["steps"] == 60
    assert d["last_loss"] <= 0.7 * d["first_loss"]
    assert abs(d["first_loss"] - s["first_loss"]) / s["first_loss"] < 0.02
    assert abs(d["eval_loss"] - s["eval_loss"]) / s["eval_loss"] < 0.10


def test_a_killed_rank_fails_the_attempt_and_the_retry_resumes(hub, session_dir):
    env = {**os.environ, "HF_TOKEN": hub.token("demo"),
           "PREFECT_HOME": str(session_dir / "prefect-ddp-kill")}
    cmd = [sys.executable, "-m", "flows.cli", "run", "quickstart", "--json",
           "--set", "publish.repo_id=loraflow-demo/ddp-kill", "--set", "training.max_steps=150",
           "--set", "training.save_steps=10", "--set", "training.seed=11"]
    for o in DDP:
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    runs = Path(os.environ["LORAFLOW_HOME"]) / "runs"
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and killed is None and proc.poll() is None:
        for run_dir in runs.glob("train-*"):
            rank1 = _events(run_dir, "train_log.rank1.jsonl")
            if (run_dir / "checkpoints" / "checkpoint-20").is_dir() and rank1:
                os.kill(rank1[-1]["pid"], signal.SIGKILL)
                killed = (run_dir, rank1[-1]["pid"])
                break
        time.sleep(0.2)
    out, err = proc.communicate(timeout=600)
    assert killed, f"never saw a checkpoint to kill after:\n{err[-3000:]}"
    report = json.loads(out.strip().splitlines()[-1])
    assert report["status"] == "completed", report["error"]
    assert "DistributedTrainingError" in err
    starts = [e for e in _events(killed[0], "train_log.jsonl") if e["event"] == "start"]
    assert len(starts) == 2 and starts[0]["resume_from"] == 0
    assert starts[1]["resume_from"] >= 20
    assert report["metrics"]["steps"] == 150


def _two_gpus(usable: int) -> list[Gpu]:
    size = CUDA_CONTEXT_BYTES + usable
    return [Gpu(index=i, name="planned", total_bytes=size, free_bytes=size) for i in range(2)]


@pytest.mark.parametrize("room", ["a full copy", "a shard only"])
def test_the_memory_plan_picks_the_engine_both_processes_run(room, hub, as_user, monkeypatch):
    """Preflight's plan chooses the data-parallel engine from one GPU's room (GPUs as
    nvidia-smi would list them; training itself runs on CPU, gloo): DDP when a full copy
    fits one GPU — both torchrun processes train under it, the run record says which and
    why, the loss falls — and FSDP when only a shard of the weights does, which both
    processes then take (FSDP itself needs GPUs: here it is refused by name)."""
    seed = 21 if room == "a full copy" else 22  # the engine is not in the train key
    profile = load_profile("quickstart", [f"publish.repo_id=loraflow-demo/engine-{seed}",
                                          f"training.seed={seed}", "training.max_steps=12",
                                          *DDP])
    monkeypatch.setattr(devices, "visible_gpus", lambda: _two_gpus(1 << 40))
    with as_user("demo"):
        estimate = run_preflight(profile).memory.estimate
    # Room for the estimate less half the weights (FSDP's shard), not for all of it.
    usable = (1 << 40) if room == "a full copy" else int(estimate.peak_bytes * (1 + HEADROOM)) - 1
    monkeypatch.setattr(devices, "visible_gpus", lambda: _two_gpus(usable))
    with as_user("demo"):
        plan = run_preflight(profile).memory
        report = run_profile("quickstart", profile)
    if room == "a shard only":
        assert plan.data_parallel == "fsdp" and plan.fits
        assert "FSDP shards the weights over 2 processes" in plan.data_parallel_reason
        # Both processes took the FSDP path, which wraps onto GPUs only: on this CPU
        # machine every rank refuses it by name, and nothing is retried or published.
        assert report["status"] == "failed" and report["hub"] is None
        assert report["error"]["type"] == "TrainingError"
        assert "training.data_parallel: fsdp" in report["error"]["message"]
        return
    assert report["status"] == "completed", report["error"]
    record = json.loads((Path(report["adapter"]["path"]).parent / "record.json").read_text())
    engine = record["distributed"]
    assert plan.data_parallel == "ddp" and engine["strategy"] == "ddp"
    assert engine["world_size"] == 2 and engine["why"] == plan.data_parallel_reason
    assert "fits one GPU" in engine["why"] and engine["replicas_identical"] is True
    assert report["metrics"]["last_loss"] < report["metrics"]["first_loss"]
