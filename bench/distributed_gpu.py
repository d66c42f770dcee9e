"""Distributed training on 2 GPUs vs 1, through loraflow's own training step.

For an 8B-shaped Llama with random bf16 weights: bf16 LoRA and nf4 QLoRA with the data-
parallel engine the memory plan chooses (DDP: each rank holds its own copy, quantized or
not, when it fits one GPU), and nf4 QLoRA forced onto FSDP for comparison; each 30 steps of
a learnable synthetic task, against a single-GPU run of the same profile (same levers:
Liger where the engine allows it) at the same global batch. Each run is `tasks.training.worker` — the code a torchrun job of
train_adapter runs — under CUDA_VISIBLE_DEVICES=0 (one GPU) or torch.distributed.run
(two). Prints and writes one JSON line per case: per-step losses of both, their largest
and mean relative difference, tokens/s and the ratio, peak memory.

usage (2-GPU machine, repo root, wheel bundle installed):
    python bench/distributed_gpu.py OUTDIR [CASE ...]   (cases: 8b-bf16-ddp 8b-nf4-ddp 8b-nf4-fsdp)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from localhub.seed_data import alphabet_rows  # noqa: E402  (the learnable task)

SEQ, PER_DEVICE, GLOBAL, STEPS = 1024, 8, 16, 30
WARMUP = 5  # steady-state throughput is timed from the end of this step to the last
SHAPE_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                tie_word_embeddings=False, head_dim=128, max_position_embeddings=8192)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}


def build_model(path: Path) -> None:
    """Random bf16 8B-shaped Llama + the seeded tiny tokenizer (ids are pre-tokenized)."""
    if (path / "config.json").exists():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from localhub.seed_data import model_files

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPE_8B, dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(str(path))
    for name, data in model_files().items():
        if name.startswith(("tokenizer", "special_tokens")):
            (path / name).write_bytes(data)
    del model
    torch.cuda.empty_cache()


def build_dataset(path: Path) -> dict:
    import datasets

    rows = [{"input_ids": ids, "labels": ids, "attention_mask": [1] * SEQ}
            for ids in alphabet_rows(GLOBAL * STEPS, SEQ)]
    datasets.Dataset.from_list(rows).save_to_disk(str(path / "train"))
    return {"path": str(path), "key": "synthetic-alphabet16", "num_train": len(rows),
            "num_eval": 0, "train_tokens": len(rows) * SEQ}


# case → (quantization.mode, training.data_parallel, training.liger_kernel)
CASES = {"8b-bf16-ddp": ("none", "auto", True), "8b-nf4-ddp": ("nf4", "auto", True),
         "8b-nf4-fsdp": ("nf4", "fsdp", False)}


def launch_inputs(model_dir: Path, dataset: dict, case: str) -> dict:
    from profiles.schema import Profile

    quant, engine, liger = CASES[case]
    # FSDP flattens each block into one tensor: the 4-bit weights need a float storage dtype.
    quantization = {"mode": quant, "quant_storage": "bfloat16" if engine == "fsdp" else "uint8"}
    profile = Profile.model_validate({
        "model": {"id": "bench/llama-8b-shape", "dtype": "bfloat16"},
        "quantization": quantization if quant != "none" else {"mode": "none"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"dataset": "bench/synthetic", "max_length": SEQ, "eval_split": 0},
        # lr 3e-4: at 1e-3 the first steps overshoot and oscillate, and any rounding
        # difference (the order of a gradient all-reduce) grows into a different curve.
        # Liger on both sides where the engine allows it (FSDP runs without it).
        "training": {"learning_rate": 3e-4, "max_steps": STEPS, "per_device_batch_size":
                     PER_DEVICE, "global_batch_size": GLOBAL, "lr_scheduler": "constant",
                     "gradient_checkpointing": quant != "none", "logging_steps": 1,
                     "save_steps": 1000, "seed": 0, "liger_kernel": liger,
                     "data_parallel": engine},
        "publish": {"repo_id": "bench/unpublished"}})
    return inputs_for(model_dir, dataset, profile)


def inputs_for(model_dir: Path, dataset: dict, profile) -> dict:
    """What train_adapter hands a torchrun job (tasks.training.launch.py), for a model on disk."""
    files = {p.name: {"size": p.stat().st_size, "sha256": p.name}
             for p in model_dir.iterdir() if p.is_file()}
    return {"profile": profile.model_dump(mode="json"),
            "preflight": {"user": "bench", "target_repo": "bench/unpublished",
                          "base_model": {"repo_id": "bench/llama-8b-shape", "revision": "main",
                                         "commit": "0" * 40, "gated": False},
                          "dataset": {"source": "file", "id": "synthetic", "sha256": "0" * 64}},
            "snapshot": {"repo_id": "bench/llama-8b-shape", "commit": "0" * 40,
                         "local_dir": str(model_dir), "files": files},
            "dataset": dataset, "flow_run_id": None}


def with_memory_plan(inputs: dict, model_dir: Path, gpus: int) -> dict:
    """The launch inputs with preflight's memory plan for `gpus` GPUs (it chooses the
    data-parallel engine, as preflight does before train_adapter launches torchrun)."""
    from profiles.schema import Profile
    from tasks.memory.devices import visible_gpus
    from tasks.memory.fit import plan_memory
    from tasks.memory.tensors import read_safetensors_headers

    profile = Profile.model_validate(inputs["profile"])
    config = json.loads((model_dir / "config.json").read_text())
    plan = plan_memory(profile, read_safetensors_headers(model_dir), config,
                       gpus=visible_gpus()[:gpus])
    preflight = {**inputs["preflight"], "memory": plan.model_dump(mode="json")}
    return {**inputs, "preflight": preflight}


def as_launch(inputs: dict, home: Path) -> dict:
    """The launch file train_adapter writes (tasks.train.launch_inputs: the key inputs and
    the run directory too), for a run under LORAFLOW_HOME=`home`."""
    from profiles.schema import Profile
    from tasks.contracts import DatasetManifest, PreflightReport, SnapshotManifest
    from tasks.train import launch_inputs as step_launch_inputs

    before = os.environ.get("LORAFLOW_HOME")
    os.environ["LORAFLOW_HOME"] = str(home)
    try:
        return step_launch_inputs(Profile.model_validate(inputs["profile"]),
                                  PreflightReport.model_validate(inputs["preflight"]),
                                  SnapshotManifest.model_validate(inputs["snapshot"]),
                                  DatasetManifest.model_validate(inputs["dataset"]),
                                  inputs["flow_run_id"])
    finally:
        if before is None:
            os.environ.pop("LORAFLOW_HOME", None)
        else:
            os.environ["LORAFLOW_HOME"] = before


def run(case: str, inputs: dict, gpus: int, work: Path, model_dir: Path) -> dict:
    inputs = with_memory_plan(inputs, model_dir, gpus)
    home = work / f"home-{case}-{gpus}gpu"
    shutil.rmtree(home, ignore_errors=True)  # a run of an earlier invocation is not this one
    launch = work / f"{case}-{gpus}.json"
    launch.write_text(json.dumps(as_launch(inputs, home)))
    env = {**os.environ, **NO_MULTICAST, "LORAFLOW_HOME": str(home),
           "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))}
    cmd = ([sys.executable, "-m", "tasks.training.worker", str(launch)] if gpus == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={gpus}", "-m", "tasks.training.worker", str(launch)])
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": case, "gpus": gpus, "error": proc.stdout[-1500:] + proc.stderr[-3000:]}
    record = json.loads(next(home.glob("runs/*/record.json")).read_text())
    runtime = record["metrics"]["train_runtime_s"]
    steps = {e["step"]: e["time"] for e in map(json.loads, next(
        home.glob("runs/*/train_log.jsonl")).read_text().splitlines()) if e["event"] == "step"}
    return {"case": case, "gpus": gpus, "wall_s": round(time.time() - start, 1),
            "train_runtime_s": runtime, "tokens_per_s": round(STEPS * GLOBAL * SEQ / runtime),
            # From step WARMUP on: without the first steps' one-time costs (Triton/Liger
            # kernel compilation, cuBLAS autotuning), which weigh more the shorter a run is.
            "steady_tokens_per_s": round((STEPS - WARMUP) * GLOBAL * SEQ
                                         / (steps[STEPS] - steps[WARMUP])),
            "losses": [h["loss"] for h in record["loss_history"]],
            "adapter_sha256": record["adapter"]["sha256"],
            "distributed": record.get("distributed"), "speed": record.get("speed"),
            "peak_gpu_mem_gib": record["metrics"].get("peak_gpu_mem_gib"),
            "adapter_dir": str(next(home.glob("runs/*/adapter")))}


def compare(one: dict, two: dict) -> dict:
    rel = [abs(a - b) / abs(a) for a, b in zip(one["losses"], two["losses"])]
    return {"max_rel_loss_diff": round(max(rel), 4), "mean_rel_loss_diff": round(sum(rel) / len(rel), 4),
            "throughput_ratio": round(two["tokens_per_s"] / one["tokens_per_s"], 3),
            "steady_throughput_ratio": round(two["steady_tokens_per_s"]
                                             / one["steady_tokens_per_s"], 3),
            "loss_first_last_1gpu": [one["losses"][0], one["losses"][-1]],
            "loss_first_last_2gpu": [two["losses"][0], two["losses"][-1]]}


def reload_losses(case: str, one: dict, two: dict, model_dir: Path) -> dict:
    """Both saved adapters, reloaded with peft on a freshly loaded base (nf4 for the QLoRA
    case), scored on the same 4 rows: each must beat the untrained base, and the 2-GPU
    adapter must score as the 1-GPU one does."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = None
    if CASES[case][0] == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16,
                                                device_map={"": 0}, quantization_config=quant)
    ids = torch.tensor(alphabet_rows(4, SEQ, seed=1), device="cuda")

    def loss(model) -> float:
        with torch.no_grad():
            return round(model(input_ids=ids, labels=ids).loss.item(), 4)

    untrained = loss(base)
    model = PeftModel.from_pretrained(base, one["adapter_dir"], adapter_name="one")
    model.load_adapter(two["adapter_dir"], adapter_name="two")
    model.set_adapter("one")
    l1 = loss(model)
    model.set_adapter("two")
    l2 = loss(model)
    del model, base
    torch.cuda.empty_cache()
    return {"reload_loss_untrained": untrained, "reload_loss_1gpu": l1, "reload_loss_2gpu": l2,
            "adapter_reloads": l2 < untrained and abs(l2 - l1) / l1 < 0.02}


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/lf-dist")
    work.mkdir(exist_ok=True)
    model_dir = work / "llama-8b"
    build_model(model_dir)
    dataset = build_dataset(work / "data")
    for case in (c for c in CASES if len(sys.argv) < 3 or c in sys.argv[2:]):
        inputs = launch_inputs(model_dir, dataset, case)
        one = run(case, inputs, 1, work, model_dir)
        two = run(case, inputs, 2, work, model_dir)
        row = {"case": case, "one_gpu": one, "two_gpus": two}
        if "error" not in one and "error" not in two:
            row.update(compare(one, two), **reload_losses(case, one, two, model_dir),
                       distributed=two.get("distributed"))
        line = json.dumps(row)
        print(line, flush=True)
        with open(out / "distributed.jsonl", "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
