"""Loading the base model and building the adapter config: the one place where profile
fields become transformers / bitsandbytes / peft arguments.

Imports torch lazily: a fully cached run never gets here.
"""
from __future__ import annotations

from profiles.schema import LoraSection, ModelSection, QuantizationSection
from tasks import errors


def torch_dtype(name: str):
    """'auto' → bfloat16 on a GPU that supports it, float32 otherwise; 'uint8' etc. too."""
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def quantization_config(quant: QuantizationSection, model: ModelSection | None = None):
    """BitsAndBytesConfig for the profile's mode, or None.

    With a device_map that can place modules on the CPU or disk (auto, or a module map
    naming cpu/disk), bitsandbytes must be told to keep those modules unquantized in
    float32 (llm_int8_enable_fp32_cpu_offload); transformers refuses the load otherwise.
    """
    if quant.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    offload = model is not None and (model.device_map == "auto" or (
        isinstance(model.device_map, dict)
        and any(v in ("cpu", "disk") for v in model.device_map.values())))
    if quant.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=offload)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.mode,
                              bnb_4bit_use_double_quant=quant.double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
                              bnb_4bit_quant_storage=torch_dtype(quant.quant_storage),
                              llm_int8_enable_fp32_cpu_offload=offload)


def _max_memory(model: ModelSection) -> dict | None:
    # YAML gives GPU keys as ints or digit strings; accelerate wants ints (and "cpu").
    if not model.max_memory:
        return None
    return {int(k) if str(k).isdigit() else k: v for k, v in model.max_memory.items()}


def load_kwargs(model: ModelSection, quant: QuantizationSection) -> dict:
    """The from_pretrained keyword arguments for the profile: the one mapping.

    Every loading field lands here, so what preflight validated is what transformers
    receives. low_cpu_mem_usage is not passed: transformers >= 5 always loads that way
    (preflight refuses false there).
    """
    kwargs = dict(dtype=torch_dtype(model.dtype), attn_implementation=model.attn_implementation,
                  trust_remote_code=model.trust_remote_code, use_safetensors=True)
    if model.device_map is not None:
        kwargs["device_map"] = model.device_map
    if model.max_memory:
        kwargs["max_memory"] = _max_memory(model)
    if model.offload_folder:
        kwargs["offload_folder"] = model.offload_folder
    qconfig = quantization_config(quant, model)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    return kwargs


def keep_cpu_4bit_trainable(base) -> int:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, Linear4bit converts its weight to a packed layout the first
    time it runs in eval mode without grad (an evaluation step); that layout has no
    backward, and LoRA stops learning from then on. The conversion is gated on the
    module's `support_avx512bf16_for_cpu` flag: turning it off keeps the trainable layout
    (a slower CPU eval, the same numbers). Returns how many modules were changed.
    """
    changed = 0
    for module in base.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def load_base_model(model: ModelSection, quant: QuantizationSection, local_dir: str,
                    labels: list[str] | None = None):
    """from_pretrained over the downloaded snapshot, safetensors only, with the Auto class
    of model.task (tasks.model_tasks.py).

    `labels`: the label / tag names a classification task collected from its data
    (DatasetManifest.labels); they size the head (num_labels, id2label, label2id).

    Raises:
        ProfileError: the base's config.json cannot do model.task (checked before any
            weight is read), or a library the loading options need is missing.
    """
    import transformers

    from tasks.model_tasks import (
        FRESH_MODULES_ATTR,
        check_local_config,
        fresh_modules,
        head_kwargs,
        task_type,
    )

    check_local_config(model.task, local_dir)
    auto = getattr(transformers, task_type(model.task).auto_class)
    try:
        base, info = auto.from_pretrained(local_dir, **load_kwargs(model, quant),
                                          **head_kwargs(model.task, labels),
                                          output_loading_info=True)
        # What the checkpoint lacked is random on every load: the adapter must carry it
        # (tasks.model_tasks.adapter_for_task).
        setattr(base, FRESH_MODULES_ATTR, fresh_modules(info.get("missing_keys") or ()))
    except ImportError as exc:
        raise errors.ProfileError(
            f"model.attn_implementation / quantization.mode: a library it needs is missing "
            f"({exc}). Fix: install it, or choose sdpa / mode none.") from None
    if quant.mode in ("nf4", "fp4"):
        keep_cpu_4bit_trainable(base)
    return base


def lora_config(lora: LoraSection, task: str = "causal-lm"):
    """The peft config of the profile's adapter method (see tasks.training.adapters.peft_config)."""
    from tasks.training.adapters import peft_config

    return peft_config(lora, task)


def linear_module_names(model) -> list[str]:
    """Distinct leaf names of the model's linear layers (what target_modules can match)."""
    from tasks.training.adapters import linear_module_names as names

    return names(model)


def check_target_modules(base, lora: LoraSection) -> list[str]:
    """Refuse target/exclude selectors that match nothing, listing the linear modules
    that exist (tasks.training.adapters.check_target_modules); returns the adapted module paths."""
    from tasks.training.adapters import check_target_modules as check

    return check(base, lora)


def adapter_weights(model) -> dict:
    """The adapter's tensors, named as in adapter_model.safetensors, copied to CPU."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: a targeted lm_head's frozen base weight is not part of
    # the saved adapter (peft's "auto" would add it, and ask the Hub for the base config).
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def inject_adapter(base, lora: LoraSection, quant: QuantizationSection,
                   gradient_checkpointing: bool, sharded: bool = False, *,
                   task: str = "causal-lm", continue_from: str | None = None):
    """get_peft_model, with k-bit preparation for quantized bases.

    `continue_from`: a saved adapter's directory; that adapter is loaded, trainable,
    instead of a fresh one (tasks.training.adapters.attach_adapter).

    `sharded` (FSDP over a 4-bit base): FSDP flattens each wrapped block into one tensor
    of a single dtype, so nothing is upcast to fp32 (no k-bit preparation) and the
    adapter takes the quant storage dtype; FSDP does the activation checkpointing.
    """
    from peft import prepare_model_for_kbit_training

    from tasks.model_tasks import adapter_for_task
    from tasks.training.adapters import attach_adapter

    lora = adapter_for_task(base, lora, task)  # a classification head: trained whole
    check_target_modules(base, lora)
    if quant.mode != "none" and not sharded and quant.upcast_non_quantized:
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif quant.mode != "none" and not sharded:
        from tasks.training.speed import prepare_kbit_without_upcast

        base = prepare_kbit_without_upcast(base, gradient_checkpointing)
    model = attach_adapter(base, lora, task, continue_from)
    if sharded:
        storage = torch_dtype(quant.quant_storage)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(storage)
    return model
