"""Training-speed levers, each a profile option (issue #7): Liger's fused kernels, a
k-bit preparation that keeps the non-quantized weights in 16 bits, activation
checkpointing of only some layers, and torch.compile of the decoder layers. Packing lives
in tasks.training.packing.py.

Imports torch lazily, like tasks.training.modeling.py.
"""
from __future__ import annotations

import ast
import importlib.util
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional

from profiles.schema import Profile
from tasks import errors


def liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def liger_available() -> bool:
    """Liger's kernels are Triton kernels: they need the package and a CUDA GPU."""
    import torch

    return torch.cuda.is_available() and liger_installed()


def adapts_output_head(lora) -> bool:
    """Whether the adapter adapts or saves the output head (lm_head / embed_out), e.g.
    a tied model's lora.target_modules=[…, lm_head] or modules_to_save=[lm_head]."""
    heads = ("lm_head", "embed_out")
    targets = lora.target_modules
    if isinstance(targets, str):
        adapted = targets != "all-linear" and any(re.fullmatch(targets, h) for h in heads)
    else:
        adapted = any(t.rsplit(".", 1)[-1] in heads for t in targets)
    return adapted or any(m.rsplit(".", 1)[-1] in heads for m in lora.modules_to_save or ())


@lru_cache(maxsize=1)
def liger_model_types() -> Optional[frozenset[str]]:
    """The model types Liger has kernels for (the keys of its
    MODEL_TYPE_TO_APPLY_LIGER_FN), read from its source without importing it (that
    imports torch and Triton); None when unknown (not installed, another layout)."""
    spec = importlib.util.find_spec("liger_kernel")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "transformers" / "monkey_patch.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and any(
                isinstance(t, ast.Name) and t.id == "MODEL_TYPE_TO_APPLY_LIGER_FN"
                for t in node.targets):
            return frozenset(k.value for k in node.value.keys
                             if isinstance(k, ast.Constant) and isinstance(k.value, str))
    return None


def liger_expected(profile: Profile, cuda: bool, processes: int,
                   model_type: Optional[str] = None, sharded: Optional[bool] = None) -> bool:
    """Whether training will run with Liger (FSDP runs without it: `sharded`, or when not
    given, a 4-bit base over several processes with no engine chosen yet): auto → on where it can run, for a causal LM (its loss and
    MLP patches are for decoder-only language models) of a model type Liger has kernels
    for (`model_type`, from config.json; None: not checked), and not when the adapter
    adapts or saves lm_head: Liger's fused linear cross-entropy multiplies by
    lm_head.weight itself, past the adapter, which would then learn nothing there.
    Without importing torch, so the memory estimate can ask too."""
    choice = profile.training.liger_kernel
    if sharded is None:
        engine = profile.training.data_parallel
        sharded = processes > 1 and (engine == "fsdp" or (
            engine == "auto" and profile.quantization.mode in ("nf4", "fp4")))
    if sharded or not cuda or choice is False:
        return False
    if choice is True:
        return True
    supported = liger_model_types()
    if model_type is not None and supported is not None and model_type not in supported:
        return False
    return (profile.model.task == "causal-lm" and liger_installed()
            and not adapts_output_head(profile.lora))


def use_torch_compile(profile: Profile, cuda: bool, processes: int) -> bool:
    """training.torch_compile: auto → on where it measured faster (docs/benchmarks.md): a
    causal LM trained by one process on a CUDA GPU with training.packing, whose rows are
    always data.max_length long — 16-bit or 4-bit (8B nf4, offloaded checkpointing:
    11,006 tok/s compiled with Liger only for the loss, 9,401 eager with Liger's layer
    kernels; issue #14). Padded batches are as long as their longest example, and every
    new length recompiles the layer (10–20 s each at 1B). true → always."""
    choice = profile.training.torch_compile
    if choice == "auto":
        return (cuda and processes == 1 and profile.model.task == "causal-lm"
                and profile.quantization.mode in ("none", "nf4", "fp4")
                and profile.training.packing)
    return choice


@lru_cache(maxsize=1)
def checkpoints_inside_forward() -> bool:
    """Whether the installed transformers checkpoints a decoder layer inside its forward
    (5.23 and later; earlier around the layer's call): with compiled layers that call
    then comes from compiled code. Read from the package's version, without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        return Version(version("transformers")) >= Version("5.23")
    except PackageNotFoundError:
        return False


def offloads_activations(profile: Profile, cuda: bool, processes: int) -> bool:
    """Whether training.offload_activations will offload: it needs checkpointing, and
    compiled layers on a transformers that checkpoints inside the compiled forward fall
    back to torch's checkpoint (tasks.training.offload)."""
    t = profile.training
    if not (t.offload_activations and t.gradient_checkpointing):
        return False
    return not (use_torch_compile(profile, cuda, processes) and checkpoints_inside_forward())


def use_liger(profile: Profile, model_type: Optional[str] = None) -> bool:
    """training.liger_kernel for this process (see liger_expected); true → required.

    Args:
        model_type: the base's config.model_type, so auto stays off for a model type
            Liger has no kernels for.
    """
    import torch

    if profile.training.liger_kernel is True and not liger_available():
        raise errors.ProfileError(
            "training.liger_kernel: true needs the liger-kernel package and a CUDA GPU. "
            "Fix: pip install 'loraflow[fast]' on a GPU machine, or set it to auto/false.")
    return liger_expected(profile, torch.cuda.is_available(), processes=1,
                          model_type=model_type)


# (module, its globals before Liger patched it), undone by undo_module_patches().
_PATCHED: list[tuple[object, dict]] = []


def liger_layer_kernels(profile: Profile, compiled: bool) -> dict[str, bool]:
    """Which of Liger's decoder-layer kernels replace the model's own
    (training.liger_kernel), as apply_liger's keywords: "loss" → none (only the fused
    linear cross-entropy); true → RoPE, RMSNorm and SwiGLU; auto → all three where the
    layers run eager, none where they are compiled: each Liger kernel breaks the layer's
    graph, and the pieces' launch overhead left the GPU idle between them (8B, 2 × 2:
    14,003 tok/s with inductor's own kernels against 12,631 with Liger's;
    docs/benchmarks.md, issue #14)."""
    choice = profile.training.liger_kernel
    layers = choice is True or (choice == "auto" and not compiled)
    return {"rope": layers, "rms_norm": layers, "swiglu": layers}


def apply_liger(base, kernels: Optional[dict[str, bool]] = None) -> None:
    """Make the causal-LM loss a fused linear cross-entropy (the vocabulary-sized logits
    are never materialized) and swap the layer kernels `kernels` names (rope, rms_norm,
    swiglu; None: all three) for Liger's — before the adapter is injected: the patched
    MLP still calls the (LoRA-wrapped) projections, and lm_head is not an adapter target.

    Liger also replaces globals of the model's modeling module (the RoPE function, the
    norm and MLP classes), which would reach every later model of that type in this
    process — a CPU model in the verify step then fails inside a Triton kernel. They
    are remembered here and put back by undo_module_patches() once training is done.
    """
    import sys

    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    module = sys.modules[type(base).__module__]
    _PATCHED.append((module, dict(vars(module))))
    kernels = kernels or {"rope": True, "rms_norm": True, "swiglu": True}
    _apply_liger_kernel_to_instance(model=base, fused_linear_cross_entropy=True, **kernels)


def undo_module_patches() -> int:
    """Put back every module global apply_liger changed; returns how many."""
    restored = 0
    while _PATCHED:
        module, saved = _PATCHED.pop()
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
                restored += 1
    return restored


def prepare_kbit_without_upcast(base, gradient_checkpointing: bool):
    """What peft's prepare_model_for_kbit_training does, minus its upcast of every
    non-quantized weight (norms, embeddings, lm_head) to float32: freeze the base and, for
    checkpointing, make the inputs require grad. Kept in 16 bits those weights run at
    bf16 speed and take half the memory; LoRA's own weights are trained in float32 by
    the optimizer either way (peft's autocast_adapter_dtype)."""
    for param in base.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        base.enable_input_require_grads()
    return base


def checkpoint_only_first_layers(model, count: int) -> int:
    """Turn activation checkpointing off for every decoder layer after the first `count`
    (Trainer turned it on for all). Memory grows with the layers left out; each one
    left out saves its forward recomputation. Returns how many layers checkpoint."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = layer.gradient_checkpointing and index < count
    return sum(1 for layer in layers if layer.gradient_checkpointing)


def partial_checkpointing_callback(count: int):
    """A TrainerCallback applying checkpoint_only_first_layers once Trainer has enabled
    checkpointing (at the start of train)."""
    from transformers import TrainerCallback

    class PartialCheckpointing(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            checkpoint_only_first_layers(model, count)

    return PartialCheckpointing()


def set_activation_memory_budget(budget: float) -> None:
    """torch._functorch.config.activation_memory_budget for the graphs compiled from now
    on (training.activation_memory_budget): AOTAutograd's partitioner keeps at most this
    fraction of the activations its default would keep and recomputes the rest in the
    backward, the cheapest first (elementwise work such as SwiGLU's product, norms and
    casts). 1.0 is torch's default.

    The setting is read when a graph compiles, and dynamo reuses a layer graph compiled
    earlier in the process when its guards pass (another model of the same type and
    shapes): a changed budget resets dynamo's caches so that the layers compile anew."""
    import torch._dynamo
    import torch._functorch.config as functorch_config

    if functorch_config.activation_memory_budget != budget:
        torch._dynamo.reset()
        functorch_config.activation_memory_budget = budget


def compile_decoder_layers(model) -> int:
    """torch.compile each decoder layer in place (regional compilation): the layers are
    alike, so inductor compiles one and reuses it for the rest — a fraction of the time
    a whole-model compile (TrainingArguments.torch_compile) takes — and the embedding,
    final norm and loss stay eager. In place, so the layer stays what Trainer's
    checkpointing, peft and the saved adapter see. Returns how many layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)


def keep_adapter_inputs_16bit(model) -> int:
    """Turn off peft's cast of each LoRA layer's input to the adapter weights' dtype.

    peft keeps LoRA weights in float32 on a 16-bit base (autocast_adapter_dtype) and casts
    every LoRA layer's input to float32 before lora_A; under the Trainer's bf16/fp16
    autocast the matmul then casts it back to 16 bits, so each targeted module makes two
    copies of its input and keeps one for the backward. With the cast off (peft's own
    switch, `cast_input_dtype_enabled`, which peft.helpers.disable_input_dtype_casting
    sets), autocast casts the small adapter weight instead: the same 16-bit values reach
    the matmul, nothing is copied, and modules reading one tensor (q/k/v, gate/up) keep it
    once. Only for a 16-bit base, which the Trainer runs under autocast (bf16/fp16).

    Returns:
        How many LoRA layers had the cast turned off.
    """
    import torch

    count = 0
    for module in model.modules():
        if not hasattr(module, "cast_input_dtype_enabled") or not hasattr(module, "lora_A"):
            continue
        base = getattr(module, "base_layer", None)
        weight = getattr(base, "weight", None)
        if weight is not None and weight.dtype in (torch.bfloat16, torch.float16):
            module.cast_input_dtype_enabled = False
            count += 1
    return count
