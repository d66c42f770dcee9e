"""Loading the base model and building the adapter config: the one place where profile
fields become transformers / bitsandbytes / peft arguments.

Imports torch lazily: a fully cached run never gets here.
"""
from __future__ import annotations

from profiles.schema import LoraSection, ModelSection, QuantizationSection
from tasks import errors


def torch_dtype(name: str):
    """'auto' → bfloat16 on a GPU that supports it, float32 otherwise."""
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def quantization_config(quant: QuantizationSection):
    """BitsAndBytesConfig for the profile's mode, or None."""
    if quant.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quant.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.mode,
                              bnb_4bit_use_double_quant=quant.double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype))


def load_base_model(model: ModelSection, quant: QuantizationSection, local_dir: str):
    """from_pretrained over the downloaded snapshot, safetensors only."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=torch_dtype(model.dtype), attn_implementation=model.attn_implementation,
                  trust_remote_code=model.trust_remote_code, use_safetensors=True)
    if model.device_map is not None:
        kwargs["device_map"] = model.device_map
    qconfig = quantization_config(quant)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    try:
        return AutoModelForCausalLM.from_pretrained(local_dir, **kwargs)
    except ImportError as exc:
        raise errors.ProfileError(
            f"model.attn_implementation / quantization.mode: a library it needs is missing "
            f"({exc}). Fix: install it, or choose sdpa / mode none.") from None


def lora_config(lora: LoraSection):
    from peft import LoraConfig, TaskType

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type=TaskType.CAUSAL_LM)


def linear_module_names(model) -> list[str]:
    """Distinct leaf names of the model's linear layers (what target_modules can match)."""
    import torch

    names = {n.split(".")[-1] for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__}
    return sorted(names)


def check_target_modules(base, lora: LoraSection) -> None:
    """Refuse target module names that match no linear layer, listing the ones that exist."""
    if lora.target_modules == "all-linear":
        return
    available = linear_module_names(base)
    unknown = [t for t in lora.target_modules if t not in available]
    if unknown:
        raise errors.ProfileError(
            f"lora.target_modules: {unknown} match no linear module of {type(base).__name__}. "
            f"Fix: use 'all-linear' or names from: {', '.join(available)}.")


def inject_adapter(base, lora: LoraSection, quant: QuantizationSection,
                   gradient_checkpointing: bool):
    """get_peft_model, with k-bit preparation for quantized bases."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_target_modules(base, lora)
    if quant.mode != "none":
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(base, lora_config(lora))
