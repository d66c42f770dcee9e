"""On a CUDA GPU, through tasks.training.run.run_train — the code train_adapter runs, Liger
included: every adapter method learns a learnable task at real 1B widths, and with
packing the profile's defaults compile the decoder layers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from llama_shapes import record

from localhub.seed_data import alphabet_rows
from profiles.loader import load_profile

pytestmark = pytest.mark.gpu

SEQ, ROWS, STEPS = 256, 8, 30
CASES = {
    "lora": [],
    # IA3 has no rank or alpha (the preset's r 16 / alpha 32 are refused for it)
    "ia3": ["lora.method=ia3", "lora.r=8", "lora.alpha=16", "training.learning_rate=1e-2"],
    "loha": ["lora.method=loha"],
    "lokr": ["lora.method=lokr"],
    "lora-packed": ["training.packing=true"],  # torch_compile auto: on with packing
}


def train(checkpoint, tmp_path, monkeypatch, sets):
    import datasets

    from tasks.contracts import DatasetManifest, PreflightReport, SnapshotManifest
    from tasks.train import launch_inputs
    from tasks.training.worker import run_launch

    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path / "home"))
    profile = load_profile("llama-3.2-1b-lora", [
        f"data.max_length={SEQ}", "data.eval_split=0", "training.eval_steps=null",
        f"training.per_device_batch_size={ROWS}", "training.gradient_accumulation_steps=1",
        f"training.max_steps={STEPS}", "training.logging_steps=1", "training.save_steps=1000",
        "training.warmup_ratio=0", "training.lr_scheduler=constant",
        "training.learning_rate=1e-3", "lora.dropout=0", *sets])
    rows = alphabet_rows(ROWS, SEQ, first_id=100)  # ids of the 2-layer shape's vocabulary
    data = tmp_path / "data"
    datasets.Dataset.from_dict({"input_ids": rows, "labels": rows,
                                "attention_mask": [[1] * SEQ] * ROWS}).save_to_disk(
        str(data / "train"))
    files = {p.name: {"size": p.stat().st_size, "sha256": p.name}
             for p in checkpoint.iterdir() if p.is_file()}
    preflight = PreflightReport.model_validate({
        "user": "gpu-test", "target_repo": "gpu/unpublished",
        "base_model": {"repo_id": "gpu/llama-1b-2layer", "revision": "main",
                       "commit": "0" * 40, "gated": False},
        "dataset": {"source": "file", "id": "alphabet", "sha256": "0" * 64}})
    result = run_launch(launch_inputs(
        profile, preflight,
        SnapshotManifest(repo_id="gpu/llama-1b-2layer", commit="0" * 40,
                         local_dir=str(checkpoint), files=files),
        DatasetManifest(path=str(data), key="alphabet", num_train=ROWS,
                        num_eval=0, train_tokens=ROWS * SEQ)))
    return json.loads((Path(result.run_dir) / "record.json").read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_each_adapter_method_learns_through_run_train(case, checkpoints, tmp_path, monkeypatch):
    rec = train(checkpoints("1b-2layer"), tmp_path, monkeypatch, CASES[case])
    losses = [h["loss"] for h in rec["loss_history"]]
    record("adapter_method", case=case, speed=rec["speed"], first_loss=losses[0],
           last_loss=losses[-1], losses=losses,
           train_runtime_s=rec["metrics"]["train_runtime_s"])
    # run_train itself refuses an adapter with a tensor that did not change.
    from tasks.training.speed import liger_installed

    assert rec["speed"] == {"liger_kernel": liger_installed(),
                            "torch_compile": case == "lora-packed"}
    assert losses[-1] < 0.75 * losses[0], losses
