"""Training over several processes (torchrun): which engine, its TrainingArguments, how
each rank loads the base, and how the adapter is saved and checked afterwards.

The engine is preflight's choice (tasks.memory.fit.choose_data_parallel: DDP when a full
copy fits one GPU — each rank holds its own, 4-bit or not — FSDP1 when it does not; see
distributed_arguments), applied to the profile as training.data_parallel by run_train.
Only rank 0 writes the run's outputs; under DDP every rank must end with the adapter it
saved (replicas_agree).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from profiles.schema import ModelSection, Profile, QuantizationSection
from tasks import errors
from tasks.training.launch import world
from tasks.training.modeling import adapter_weights

WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def uses_fsdp(profile: Profile) -> bool:
    """Whether this run shards with FSDP: over several processes, training.data_parallel
    as the memory plan resolved it (run.with_memory_plan). `auto` is left only where no
    plan chose for this many processes (a launch file written elsewhere): then a 4-bit
    base shards, as the safe side for memory, and 16/32-bit LoRA uses DDP."""
    if world().size == 1:
        return False
    engine = profile.training.data_parallel
    if engine == "auto":
        return profile.quantization.mode in ("nf4", "fp4")
    return engine == "fsdp"


def rank_loading(profile: Profile) -> tuple[ModelSection, QuantizationSection]:
    """The model and quantization sections this process loads the base with.

    Under torchrun with CUDA, each rank uses its own GPU, and bitsandbytes (which
    quantizes at load) loads onto it. FSDP shards 4-bit weights only when they are stored
    in a float dtype; the storage dtype does not change the numbers, so a uint8 storage
    becomes the compute dtype.
    """
    import torch

    model, quant = profile.model, profile.quantization
    if world().size > 1 and torch.cuda.is_available():
        torch.cuda.set_device(world().local_rank)
        if quant.mode != "none":
            model = model.model_copy(update={"device_map": {"": world().local_rank}})
    if uses_fsdp(profile) and quant.quant_storage == "uint8":
        quant = quant.model_copy(update={"quant_storage": quant.compute_dtype})
    return model, quant


def distributed_arguments(profile: Profile, model) -> dict:
    """TrainingArguments for the engine: none on one process, DDP without the
    unused-parameter search, or FSDP1 wrapping the base's decoder layers."""
    if world().size == 1:
        return {}
    if not uses_fsdp(profile):
        # LoRA leaves most parameters frozen: no unused-parameter search each step.
        return {"ddp_find_unused_parameters": False}
    import torch

    if not torch.cuda.is_available():  # accelerate's FSDP wraps onto an accelerator only
        raise errors.TrainingError(
            "training.data_parallel: fsdp shards the weights over GPUs, and this process "
            "sees none (FSDP needs an accelerator). Fix: set training.data_parallel to ddp "
            "or auto, or run on GPUs.")
    layer_cls = type(model.get_base_model().model.layers[0]).__name__
    # FSDP1, not transformers' default FSDP2: bitsandbytes documents FSDP2 losing the
    # 4-bit quant state, while FSDP1 with a float quant storage dtype is its tested QLoRA
    # path (the run record says "fsdp1").
    return {"fsdp": "full_shard auto_wrap",
            "fsdp_config": {"version": 1, "transformer_layer_cls_to_wrap": [layer_cls],
                            "backward_prefetch": "backward_pre", "forward_prefetch": False,
                            "use_orig_params": False, "sync_module_states": True,
                            "cpu_ram_efficient_loading": True,
                            "activation_checkpointing": profile.training.gradient_checkpointing,
                            "state_dict_type": "FULL_STATE_DICT"}}


def replicas_agree(model) -> bool:
    """Whether every process's adapter weights hash the same (all ranks must call it)."""
    import torch.distributed as dist

    digest = hashlib.sha256()
    for name, tensor in sorted(adapter_weights(model).items()):
        digest.update(name.encode())
        digest.update(tensor.float().numpy().tobytes())
    hashes = [None] * dist.get_world_size()
    dist.all_gather_object(hashes, digest.hexdigest())
    return len(set(hashes)) == 1


def distributed_summary(profile: Profile, model, reason: str | None = None) -> dict | None:
    """The record's "distributed" entry: which engine ran, and under DDP whether every
    rank holds the adapter rank 0 saved (all ranks must call it). None on one process.

    Raises:
        TrainingError: the DDP ranks finished with different adapter weights.
    """
    if world().size == 1:
        return None
    sharded = uses_fsdp(profile)
    summary = {"world_size": world().size, "strategy": "fsdp1" if sharded else "ddp",
               "why": reason or f"training.data_parallel: {profile.training.data_parallel}",
               "replicas_identical": None if sharded else replicas_agree(model)}
    if summary["replicas_identical"] is False:
        raise errors.TrainingError(
            "the DDP ranks finished with different adapter weights. Fix: report this "
            "with the log; train on one GPU (training.launcher single) meanwhile.")
    return summary


def save_gathered_adapter(model, full_state: dict, initial: dict, adapter_dir: Path) -> None:
    """Write the adapter from FSDP's gathered full state dict, as save_pretrained would.

    The gathered names carry FSDP / activation-checkpoint wrapper segments and the
    adapter name; each adapter tensor (named as in `initial`, i.e. as peft saves it) is
    found by its name with those removed. A name that cannot be found is an error that
    shows both sides, instead of an adapter with tensors missing.

    Raises:
        TrainingError: an adapter tensor is missing from the gathered state.
    """
    from safetensors.torch import save_file

    name = model.active_adapter
    cleaned = {}
    for key, value in full_state.items():
        for segment in WRAPPER_SEGMENTS:
            key = key.replace(segment, "")
        cleaned[key.replace(f".{name}.", ".")] = value
    missing = [k for k in initial if k not in cleaned]
    if missing:
        sample = [k for k in cleaned if "lora" in k][:3] or list(cleaned)[:3]
        raise errors.TrainingError(
            f"the gathered FSDP state dict lacks {len(missing)} adapter tensors (e.g. "
            f"{missing[0]}); it has names like {sample}. Fix: report this with the log; "
            "train on one GPU (training.launcher single) meanwhile.")
    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: cleaned[k].detach().cpu().contiguous() for k in initial},
              str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = model.peft_config[name]
    config.inference_mode = True
    config.save_pretrained(str(adapter_dir))
