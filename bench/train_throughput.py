"""loraflow's training step against plain transformers+peft, side by side (issue #7).

One invocation = one model shape. In one process, one after the other: the plain
baseline first (bench/baseline_peft.py's loop, or its padded / learnable variants below),
then loraflow's `tasks.training.run.run_train` — the code train_adapter runs — with the speed
levers set by profile fields. The baseline goes first because Liger patches
transformers' Llama classes for the rest of the process.

Every optimizer step sees the whole (small) dataset — one epoch per step — so each step
of both sides trains on the same examples and the same number of non-padding tokens.
Prints and appends to OUTDIR/throughput.jsonl one JSON line per case: tokens/s (non-
padding), model TFLOP/s, MFU (2 × forward FLOPs per token, 989 TFLOP/s peak), peak GiB,
and for loraflow its ratio to the baseline of the same invocation.

usage (GPU machine, repo root, wheel bundle incl. liger-kernel installed):
    python bench/train_throughput.py OUTDIR llama-1b|llama-8b|llama-8b-nf4|varlen|learn [CASE ...]

Each row also carries (issue #14) the gradient norm of one step, the trainable-parameter
count, how many decoder layers were checkpointed and whether activations were offloaded,
and `trains` (non-zero gradient, finite losses): a row that does not train shows it.
bench/side_by_side.py runs this next to the plain baseline and Unsloth.
"""
from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import baseline_peft  # noqa: E402  (the shared baseline, unchanged)

from localhub.seed_data import alphabet_rows  # noqa: E402  (the learnable task)

SEQ, WARM, STEPS = 2048, 3, 8
LOG_EVERY = 3  # loraflow logs (and so synchronizes) every 3rd step, as a user's run would
WORK = Path("/tmp/lf-throughput")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}

# loraflow's cases per invocation: name → (global batch, per-device batch, profile fields).
FAST = {"liger_kernel": "auto", "torch_compile": False}
COMPILE = {"torch_compile": True}
CKPT = {"gradient_checkpointing": True}
OFFLOAD = {"gradient_checkpointing": True, "offload_activations": True}
LAYERS = {"liger_kernel": True}  # Liger in the decoder layers too, compiled or not
FP8 = {"fp8": True}
# FP8 recipes (training.fp8_target_modules / fp8_backward): all LoRA layers, the MLP
# projections, gate and up only; `-dq`: the input gradient in 16 bits against the
# dequantized weight (one fp8 copy).
MLP = ["gate_proj", "up_proj", "down_proj"]
FP8_RECIPES = {"fp8": FP8,
               "fp8mlp": {**FP8, "fp8_target_modules": MLP},
               "fp8dq": {**FP8, "fp8_backward": "dequantized"},
               "fp8mlp-dq": {**FP8, "fp8_target_modules": MLP, "fp8_backward": "dequantized"},
               # gate and up only: down_proj reads SwiGLU's heavy-tailed product in 16 bits
               "fp8gu": {**FP8, "fp8_target_modules": MLP[:2]},
               "fp8gu-dq": {**FP8, "fp8_target_modules": MLP[:2], "fp8_backward": "dequantized"}}
RECIPES = [r for r in FP8_RECIPES if r != "fp8"]  # "fp8" cases are listed by hand below


def budget(b: float) -> dict:
    return {"activation_memory_budget": b}


CASES = {
    "llama-1b": (8, [("bs8", 8, {**FAST}),
                     ("bs8-compile", 8, {**FAST, **COMPILE}),
                     ("bs8-compile-liger-layers", 8, {**FAST, **COMPILE, **LAYERS}),
                     ("bs8-compile-fp8", 8, {**FAST, **COMPILE, **FP8}),
                     ("bs8-compile-b0.6", 8, {**FAST, **COMPILE, "activation_memory_budget": 0.6}),
                     ("bs8-compile-b0.3", 8, {**FAST, **COMPILE, "activation_memory_budget": 0.3}),
                     ("bs8-compile-b0.5", 8, {**FAST, **COMPILE, "activation_memory_budget": 0.5}),
                     ("bs8-compile-b0.7", 8, {**FAST, **COMPILE, "activation_memory_budget": 0.7}),
                     ("bs8-compile-b0.8", 8, {**FAST, **COMPILE, "activation_memory_budget": 0.8}),
                     ("bs8-compile-fp8-b0.5", 8, {**FAST, **COMPILE, **FP8,
                                                  "activation_memory_budget": 0.5}),
                     *[(f"bs8-compile-{r}{f'-b{b}' if b < 1 else ''}", 8,
                        {**FAST, **COMPILE, **FP8_RECIPES[r], **budget(b)})
                       for r in RECIPES for b in (1.0, 0.9, 0.8, 0.7)],
                     ("bs8-no-liger", 8, {"liger_kernel": False, "torch_compile": False}),
                     ("bs8-no-liger-compile", 8, {"liger_kernel": False, **COMPILE})]),
    "llama-8b": (4, [("bs2x2", 2, {**FAST})] + [
        (f"bs4-ckpt{n}", 4, {**FAST, **CKPT, "checkpoint_layers": n})
        for n in (18, 24, 28)] + [
        ("bs4-ckpt-all", 4, {**FAST, **CKPT}),
        ("bs2x2-compile", 2, {**FAST, **COMPILE}),
        ("bs4-ckpt24-compile", 4, {**FAST, **CKPT, "checkpoint_layers": 24, **COMPILE}),
        ("bs2x2-adamw_8bit", 2, {**FAST, "optimizer": "adamw_8bit"}),
        ("bs2x2-paged_adamw_8bit", 2, {**FAST, "optimizer": "paged_adamw_8bit"}),
        # preflight picks the batch and checkpointing (tasks/memory/ fit_to_cap)
        ("cap48", 4, {**FAST, "memory_cap_gib": 48}),
        ("cap31.3", 4, {**FAST, "memory_cap_gib": 31.3}),
        ("cap31.3-compile", 4, {**FAST, **COMPILE, "memory_cap_gib": 31.3}),
        ("bs2x2-compile-liger-layers", 2, {**FAST, **COMPILE, **LAYERS}),
        ("bs2x2-compile-fp8", 2, {**FAST, **COMPILE, **FP8}),
        ("bs2x2-compile-b0.6", 2, {**FAST, **COMPILE, "activation_memory_budget": 0.6}),
        ("bs2x2-compile-fp8-b0.6", 2, {**FAST, **COMPILE, **FP8, "activation_memory_budget": 0.6}),
        ("bs4-offload", 4, {**FAST, **OFFLOAD}),
        ("bs4-offload-compile", 4, {**FAST, **OFFLOAD, **COMPILE}),
        ("bs4-offload28-compile", 4, {**FAST, **OFFLOAD, **COMPILE, "checkpoint_layers": 28}),
        ("bs4-offload-compile-fp8", 4, {**FAST, **OFFLOAD, **COMPILE, **FP8}),
        ("bs4-offload-compile-b0.6", 4, {**FAST, **OFFLOAD, **COMPILE,
                                         "activation_memory_budget": 0.6}),
        ("bs4-offload-compile-fp8-b0.6", 4, {**FAST, **OFFLOAD, **COMPILE, **FP8,
                                             "activation_memory_budget": 0.6}),
        *[(f"bs2x2-compile-{r}-b0.6", 2, {**FAST, **COMPILE, **FP8_RECIPES[r], **budget(0.6)})
          for r in RECIPES],
        *[(f"bs2x2-compile-{r}", 2, {**FAST, **COMPILE, **FP8_RECIPES[r]})
          for r in RECIPES],
        *[(f"bs4-offload-compile-{r}", 4, {**FAST, **OFFLOAD, **COMPILE, **FP8_RECIPES[r]})
          for r in RECIPES]]),
    "llama-8b-nf4": (4, [("bs4-ckpt-all", 4, {**FAST, **CKPT})] + [
        (f"bs4-ckpt{n}", 4, {**FAST, **CKPT, "checkpoint_layers": n})
        for n in (26, 28)] + [
        ("bs4-ckpt-all-compile", 4, {**FAST, **CKPT, **COMPILE}),
        ("bs4-ckpt-all-adamw_8bit", 4, {**FAST, **CKPT, "optimizer": "adamw_8bit"}),
        ("cap20", 4, {**FAST, "memory_cap_gib": 20}),
        ("bs4-offload", 4, {**FAST, **OFFLOAD}),
        ("bs4-offload-compile", 4, {**FAST, **OFFLOAD, **COMPILE}),
        ("bs4-offload-compile-b0.6", 4, {**FAST, **OFFLOAD, **COMPILE,
                                         "activation_memory_budget": 0.6})]),
}


def free_cuda() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def save_random_model(shape: str) -> Path:
    """The baseline's random model (same seed, same construction), saved with the seeded
    tiny tokenizer files (the data is pre-tokenized), under WORK/<shape>: the path the
    baseline's own quantized loader reads from."""
    path = WORK / shape
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from localhub.seed_data import model_files

    torch.manual_seed(0)
    cfg = LlamaConfig(**baseline_peft.SHAPES[shape], max_position_embeddings=8192)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(str(path))
    for name, data in model_files().items():
        if name.startswith(("tokenizer", "special_tokens")):
            (path / name).write_bytes(data)
    del model
    free_cuda()
    return path


def random_rows(count: int, length: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rs = np.random.RandomState(seed)
    return rs.randint(0, 128256, size=(count, length)).tolist()


def varlen_lengths(count: int, seed: int = 0) -> list[int]:
    """Log-normal with median 256 and 95th percentile 1024, capped at 2048."""
    import numpy as np

    sigma = math.log(1024 / 256) / 1.6449
    rs = np.random.RandomState(seed)
    return [int(min(SEQ, max(2, round(x)))) for x in rs.lognormal(math.log(256), sigma, count)]


def write_dataset(rows: list[list[int]], name: str) -> dict:
    import datasets

    path = WORK / "data" / name
    if not (path / "train").exists():
        datasets.Dataset.from_dict({"input_ids": rows, "labels": rows, "attention_mask":
                                    [[1] * len(r) for r in rows]}).save_to_disk(str(path / "train"))
    return {"path": str(path), "key": name, "num_train": len(rows), "num_eval": 0,
            "train_tokens": sum(len(r) for r in rows)}


class StepProbe:
    """What each loraflow row reports beside its speed (issue #14), read from the Trainer
    that run_train builds: the gradient norm Trainer logs (before clipping) and, after the
    first optimizer step — when every callback, partial checkpointing included, has acted —
    how many decoder layers checkpoint. Registered through transformers.trainer's
    DEFAULT_CALLBACKS, the list every Trainer starts its callbacks from, because run_train
    takes no callbacks of ours (and tasks/ is not the bench's to change)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.grad_norms: list[tuple[int, float]] = []
        self.layers: dict | None = None
        self.trainable: int | None = None

    def callback(self):
        from transformers import TrainerCallback

        probe = self

        class Probe(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if probe.layers is None and model is not None:
                    from transformers.modeling_layers import GradientCheckpointingLayer

                    layers = [m for m in model.modules()
                              if isinstance(m, GradientCheckpointingLayer)]
                    probe.layers = {
                        "layers": len(layers),
                        "checkpointed": sum(1 for m in layers if m.gradient_checkpointing
                                            and getattr(m, "_gradient_checkpointing_func",
                                                        None) is not None),
                        "compiled": sum(1 for m in layers
                                        if getattr(m, "_compiled_call_impl", None) is not None)}
                    probe.trainable = sum(p.numel() for p in model.parameters()
                                          if p.requires_grad)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and logs.get("grad_norm") is not None:
                    probe.grad_norms.append((state.global_step, float(logs["grad_norm"])))

        return Probe()


class StepProfiler:
    """With BENCH_PROFILE=CASE (and BENCH_PROFILE_DIR=DIR), torch.profiler records optimizer
    step 6 of that loraflow case and writes the kernels by GPU time to
    DIR/profile-CASE.txt: where a step's time goes."""

    def __init__(self):
        self.case = None

    def callback(self):
        from transformers import TrainerCallback

        profiler = self

        class Profile(TrainerCallback):
            prof = None

            syncs: list = []

            def on_step_begin(self, args, state, control, **kwargs):
                if profiler.case and state.global_step == 5 and self.prof is None:
                    import traceback
                    import warnings

                    import torch

                    def show(message, category, filename, lineno, file=None, line=None):
                        if "synchroniz" in str(message):
                            self.syncs.append("".join(traceback.format_stack(limit=14)[:-2]))

                    warnings.simplefilter("always")
                    warnings.showwarning = show
                    torch.cuda.set_sync_debug_mode("warn")  # a warning per synchronizing call
                    self.prof = torch.profiler.profile(activities=[
                        torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                    self.prof.__enter__()

            def on_step_end(self, args, state, control, **kwargs):
                if self.prof is not None and state.global_step == 6:
                    import gzip

                    import torch

                    torch.cuda.set_sync_debug_mode(0)
                    torch.cuda.synchronize()
                    self.prof.__exit__(None, None, None)
                    table = self.prof.key_averages().table(sort_by="cuda_time_total",
                                                           row_limit=45, max_name_column_width=90)
                    where = Path(os.environ.get("BENCH_PROFILE_DIR", "/tmp"))
                    (where / f"profile-{profiler.case}.txt").write_text(table)
                    (where / f"syncs-{profiler.case}.txt").write_text(
                        f"{len(self.syncs)} synchronizing calls\n\n" + "\n----\n".join(self.syncs))
                    trace = where / f"trace-{profiler.case}.json"
                    self.prof.export_chrome_trace(str(trace))
                    with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
                        dst.write(src.read())
                    trace.unlink()
                    self.prof = None
                    profiler.case = None

        return Profile()


# The fast path of the learnable check: every lever the 16-bit rows use, FP8 apart
# (opt-in: checked as its own variant).
LEARN_FAST = {**FAST, **COMPILE, "activation_memory_budget": 0.5}
LEARN_VARIANTS = {"fast": LEARN_FAST,
                  **{f"fast-{r}": {**LEARN_FAST, **fields} for r, fields in FP8_RECIPES.items()}}
# LEARN=fast (default: every variant) picks the variants to run, comma-separated;
# LEARN_SEEDS=0,1,2 (default 0) repeats the check per LoRA seed: one 50-step trajectory
# moves by a couple of percent from harmless changes alone (bench/fp8_numerics.py).
LEARN_ONLY = [v for v in os.environ.get("LEARN", "").split(",") if v]
LEARN_SEEDS = [int(s) for s in os.environ.get("LEARN_SEEDS", "0").split(",") if s]

PROBE = StepProbe()
PROFILER = StepProfiler()
_PROBE_INSTALLED = False


def install_probe() -> bool:
    """Add PROBE's callback to every Trainer built from now on, once per process."""
    global _PROBE_INSTALLED
    import transformers.trainer as trainer_module

    defaults = getattr(trainer_module, "DEFAULT_CALLBACKS", None)
    if not isinstance(defaults, list):
        return False
    if not _PROBE_INSTALLED:
        defaults.append(PROBE.callback())
        defaults.append(PROFILER.callback())
        _PROBE_INSTALLED = True
    return True


def run_loraflow(model_dir: Path, dataset: dict, quant: str, per_device: int,
                 global_batch: int, fields: dict, steps: int, lr: float = 1e-4,
                 log_every: int = LOG_EVERY) -> dict:
    """tasks.training.run.run_train on the saved model. The step time is the time between the
    logged losses (a log synchronizes with the GPU) from step WARM on, per step; the
    losses are those logged every `log_every` steps."""
    from distributed_gpu import inputs_for

    from profiles.schema import Profile
    from tasks.contracts import DatasetManifest, PreflightReport, SnapshotManifest
    from tasks.train import launch_inputs
    from tasks.training.checkpoints import read_step_log
    from tasks.training.worker import run_launch

    home = WORK / f"home-{time.time_ns()}"
    os.environ["LORAFLOW_HOME"] = str(home)
    profile = Profile.model_validate({
        "model": {"id": "bench/random", "dtype": "bfloat16", "attn_implementation": "sdpa"},
        "quantization": {"mode": quant} if quant != "none" else {"mode": "none"},
        "lora": LORA,
        "data": {"dataset": "bench/synthetic", "max_length": SEQ, "eval_split": 0},
        "training": {"learning_rate": lr, "max_steps": steps, "per_device_batch_size":
                     per_device, "global_batch_size": global_batch, "lr_scheduler": "constant",
                     "logging_steps": log_every, "save_steps": 100000, "seed": 0, **fields},
        "publish": {"repo_id": "bench/unpublished"}})
    probed = install_probe()
    PROBE.reset()
    inputs = inputs_for(model_dir, dataset, profile)
    if profile.training.memory_cap_gib is not None:  # what preflight would plan
        from tasks.memory.fit import plan_memory
        from tasks.memory.tensors import read_safetensors_headers

        config = json.loads((model_dir / "config.json").read_text())
        inputs["preflight"]["memory"] = plan_memory(
            profile, read_safetensors_headers(model_dir), config).model_dump(mode="json")
    result = run_launch(launch_inputs(Profile.model_validate(inputs["profile"]),
                                      PreflightReport.model_validate(inputs["preflight"]),
                                      SnapshotManifest.model_validate(inputs["snapshot"]),
                                      DatasetManifest.model_validate(inputs["dataset"])))
    events = [e for e in read_step_log(Path(result.run_dir)) if e["event"] == "loss"]
    timed = [e for e in events if e["step"] >= WARM]
    step_s = ((timed[-1]["time"] - timed[0]["time"]) / (timed[-1]["step"] - timed[0]["step"])
              if len(timed) > 1 else None)
    record = json.loads((Path(result.run_dir) / "record.json").read_text())
    free_cuda()
    norms = [g for s, g in PROBE.grad_norms if s >= WARM] or [g for _, g in PROBE.grad_norms]
    losses = [e["loss"] for e in events]
    layers = PROBE.layers or {}
    # run_train itself fails a run whose LoRA tensors did not change; a row still says
    # whether its gradient was non-zero and its losses finite.
    trains = (bool(norms) and norms[0] > 0 and all(math.isfinite(x) for x in losses + norms))
    return {"step_s": step_s,
            "losses": losses,
            "peak_mem_gib": record["metrics"]["peak_gpu_mem_gib"],
            "memory_plan": record.get("memory_plan"),
            "grad_norm": round(norms[0], 4) if norms else None,
            "trainable": record["adapter"]["trainable_params"],
            "trainable_probe": PROBE.trainable,
            "ckpt_layers": layers.get("checkpointed") if probed else None,
            "layers": layers.get("layers"),
            "compiled_layers": layers.get("compiled"),
            "offload": bool((record.get("speed") or {}).get("offloaded_layers")),
            "speed": record.get("speed"),
            "trains": trains,
            "init": str(Path(result.run_dir) / "adapter_init.safetensors")}


def rates(step_s: float, tokens_per_step: float, cfg, seq_for_flops: int) -> dict:
    tps = tokens_per_step / step_s
    tflops = baseline_peft.flops_per_token(cfg, seq_for_flops) * tps / 1e12
    return {"step_s": round(step_s, 4), "tokens_per_s": round(tps),
            "model_tflops": round(tflops, 1), "mfu": round(tflops / baseline_peft.PEAK, 3)}


def peft_model(model_dir: Path, ckpt: bool, seed: int = 0):
    """The plain path on the saved weights: bf16, SDPA, LoRA r=16 all-linear."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": 0})
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    return model


def baseline_padded(model_dir: Path, lengths: list[int], micro: int, seed: int = 0) -> dict:
    """The plain loop over variable-length examples, each micro-batch padded to its longest
    (as transformers' default collator pads), gradients accumulated over the dataset."""
    import torch

    model = peft_model(model_dir, ckpt=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            weight_decay=0.0, fused=True)
    rows = random_rows(len(lengths), SEQ, seed)
    batches = []
    for i in range(0, len(lengths), micro):
        group = list(range(i, min(i + micro, len(lengths))))
        longest = max(lengths[j] for j in group)
        ids = torch.zeros((len(group), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, j in enumerate(group):
            ids[r, :lengths[j]] = torch.tensor(rows[j][:lengths[j]])
            mask[r, :lengths[j]] = 1
        labels = ids.masked_fill(mask == 0, -100)
        batches.append((ids.cuda(), mask.cuda(), labels.cuda()))
    real = sum(lengths)
    times = []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(WARM + STEPS):
        start = time.time()
        for ids, mask, labels in batches:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            (loss / len(batches)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.time() - start)
    for ids, mask, labels in batches:  # one more step, untimed: its gradient norm
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        (loss / len(batches)).backward()
    gnorm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters()
                           if p.grad is not None)).item()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step = statistics.median(times[WARM:])
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, batches
    free_cuda()
    return {"step_s": step, "real_tokens_per_step": real, "peak_mem_gib": round(peak, 2),
            "grad_norm": round(gnorm, 4), "trainable": trainable, "ckpt_layers": 0,
            "offload": False, "trains": bool(gnorm > 0 and math.isfinite(gnorm))}


def baseline_learn(model_dir: Path, rows: list[list[int]], steps: int, lr: float,
                   seed: int = 0) -> dict:
    """The plain loop on the learnable task: the whole batch every step, AdamW as the
    Trainer configures it (no weight decay, gradient norm clipped at 1.0)."""
    import torch

    model = peft_model(model_dir, ckpt=False, seed=seed)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0, fused=True)
    ids = torch.tensor(rows, device="cuda")
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as the Trainer's bf16 runs
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    del model, opt
    free_cuda()
    return {"losses": losses, "init": init}


def probe_fields(r: dict) -> dict:
    """The fields every side-by-side row carries besides speed and memory (issue #14)."""
    keys = ("grad_norm", "trainable", "ckpt_layers", "layers", "compiled_layers", "offload",
            "trains")
    return {k: r.get(k) for k in keys} | {"loss_first_last": [r["losses"][0], r["losses"][-1]]
                                          if r.get("losses") else None}


def emit(out: Path, row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    with open(out / "throughput.jsonl", "a") as f:
        f.write(line + "\n")


def fixed_length(out: Path, shape_arg: str, only: list[str]) -> None:
    from transformers import LlamaConfig

    quant = shape_arg.endswith("-nf4")
    shape = shape_arg.removesuffix("-nf4")
    global_batch, cases = CASES[shape_arg]
    model_dir = save_random_model(shape)
    cfg = LlamaConfig(**baseline_peft.SHAPES[shape])
    if os.environ.get("BENCH_NO_BASELINE"):  # exploring levers: loraflow's cases only
        base = {"tokens_per_s": None}
    else:
        base = baseline_peft.run(shape, quant, SEQ, global_batch, ckpt=shape != "llama-1b",
                                 liger=False, steps=STEPS, warm=WARM, tmp=str(WORK))
        emit(out, {"shape": shape_arg, "path": "baseline", **base})
        free_cuda()
    dataset = write_dataset(random_rows(global_batch, SEQ), f"fixed-{global_batch}")
    for name, per_device, fields in cases:
        if only and name not in only:
            continue
        if f"{shape_arg}:{name}" in os.environ.get("BENCH_PROFILE", "").split(","):
            PROFILER.case = f"{shape_arg}-{name}"
        try:
            r = run_loraflow(model_dir, dataset, "nf4" if quant else "none", per_device,
                             global_batch, fields, WARM + 4 * LOG_EVERY)
        except Exception as exc:  # one failing case must not hide the others
            emit(out, {"shape": shape_arg, "path": "loraflow", "case": name,
                       "error": repr(exc)[:800]})
            free_cuda()
            continue
        row = {"shape": shape_arg, "path": "loraflow", "case": name, "fields": fields,
               "bs": per_device, "accum": global_batch // per_device,
               **rates(r["step_s"], global_batch * SEQ, cfg, SEQ),
               "peak_mem_gib": r["peak_mem_gib"], "memory_plan": r["memory_plan"],
               **probe_fields(r)}
        if base["tokens_per_s"]:
            row["speedup"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
        emit(out, row)


def variable_length(out: Path, only: list[str] = ()) -> None:
    """1B shape: 64 examples of log-normal lengths per step; the baseline pads each
    micro-batch of 8, loraflow packs micro-batches of 32 into rows of 2048."""
    from transformers import LlamaConfig

    shape = "llama-1b"
    model_dir = save_random_model(shape)
    cfg = LlamaConfig(**baseline_peft.SHAPES[shape])
    lengths = varlen_lengths(64)
    mean_len = round(sum(lengths) / len(lengths))
    base_row = {"tokens_per_s": None}
    if not os.environ.get("BENCH_NO_BASELINE"):
        base = baseline_padded(model_dir, lengths, micro=8)
        base_row = {"shape": "llama-1b-varlen", "path": "baseline-padded", "examples": 64,
                    "mean_length": mean_len, "micro_batch": 8,
                    **rates(base["step_s"], base["real_tokens_per_step"], cfg, mean_len),
                    "peak_mem_gib": base["peak_mem_gib"],
                    **{k: base[k] for k in ("grad_norm", "trainable", "ckpt_layers",
                                            "offload", "trains")}}
        emit(out, base_row)
    rows = [r[:n] for r, n in zip(random_rows(64, SEQ), lengths)]
    dataset = write_dataset(rows, "varlen-64")
    for name, per_device, fields in [("packed-32", 32, {**FAST, "packing": True}),
                                     ("packed-32-compile", 32, {**FAST, **COMPILE,
                                                                "packing": True}),
                                     ("packed-32-defaults", 32, {"packing": True})]:
        if only and name not in only:
            continue
        r = run_loraflow(model_dir, dataset, "none", per_device, 64, fields,
                         WARM + 4 * LOG_EVERY)
        row = {"shape": "llama-1b-varlen", "path": "loraflow", "case": name, "fields": fields,
               **rates(r["step_s"], sum(lengths), cfg, mean_len),
               "peak_mem_gib": r["peak_mem_gib"], **probe_fields(r)}
        if base_row["tokens_per_s"]:
            row["speedup"] = round(row["tokens_per_s"] / base_row["tokens_per_s"], 3)
        emit(out, row)


def learnable(out: Path, steps: int = 50, lr: float = 5e-4) -> None:
    """1B shape, 8 × 2048 tokens of the alphabet task, 50 steps: per-step losses of the
    fast path (and of it with FP8) against the plain loop (same weights, same batch every
    step). Issue #14's measure: the mean relative difference over the steps where the
    baseline's loss is above 0.1, and the final losses' ratio."""
    import torch
    from safetensors.torch import load_file

    model_dir = save_random_model("llama-1b")
    rows = alphabet_rows(8, SEQ)
    dataset = write_dataset(rows, "alphabet-8")
    for seed in LEARN_SEEDS:
        base = baseline_learn(model_dir, rows, steps, lr, seed=seed)
        for variant in LEARN_ONLY or LEARN_VARIANTS:  # LEARN's order: the first matter most
            fields = LEARN_VARIANTS[variant]
            try:
                fast = run_loraflow(model_dir, dataset, "none", 8, 8, {**fields, "seed": seed},
                                    steps, lr=lr, log_every=1)
            except Exception as exc:  # one failing variant must not hide the other
                emit(out, {"shape": "llama-1b-learnable", "path": "learn", "variant": variant,
                           "seed": seed, "error": repr(exc)[:800]})
                continue
            fast_init = load_file(fast["init"])
            same_init = all(
                torch.equal(v.cpu(), fast_init[k.replace(".default", "")].to(v.dtype))
                for k, v in base["init"].items())
            a, b = base["losses"], fast["losses"]
            rel = [abs(x - y) / abs(x) for x, y in zip(a, b) if x > 0.1]
            emit(out, {"shape": "llama-1b-learnable", "path": "learn", "variant": variant,
                       "seed": seed, "fields": fields, "steps": steps, "lr": lr,
                       "same_lora_init": same_init, "baseline_losses": a, "loraflow_losses": b,
                       "steps_above_0.1": len(rel),
                       "mean_rel_loss_diff": round(sum(rel) / len(rel), 4) if rel else None,
                       "max_rel_loss_diff": round(max(rel), 4) if rel else None,
                       "final_loss_ratio": round(b[-1] / a[-1], 3) if a[-1] else None,
                       "loss_first_last": [a[0], a[-1], b[0], b[-1]]})


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    what = sys.argv[2]
    if what == "varlen":
        variable_length(out, sys.argv[3:])
    elif what == "learn":
        learnable(out)
    else:
        fixed_length(out, what, sys.argv[3:])


if __name__ == "__main__":
    main()
