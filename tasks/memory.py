"""How much GPU memory a training run needs, estimated before any weight is read.

Nothing here imports torch: preflight runs it in seconds on any machine.

- Parameters come from the safetensors headers (ranged reads of the first bytes of each
  shard: huggingface_hub's get_safetensors_metadata, or `read_safetensors_headers` for a
  local directory): every tensor's name, dtype and shape, so quantizable linear weights,
  embeddings and LoRA targets are counted exactly, not guessed from config.json.
- The estimate is the peak of torch's allocator during a training step (what
  torch.cuda.max_memory_allocated reports):
      weights (dtype, or bitsandbytes 4-bit / 8-bit packing)
    + adapter (fp32 weights + grads + AdamW's two states)
    + activations saved for backward (per token per decoder layer, × batch × max_length)
    + the loss (fp32 log-softmax over the vocabulary and its gradients)
- The GPUs are read with nvidia-smi (NVML); without one, nothing is compared.

The constants below were fixed before the estimate was measured on a GPU (see
docs/benchmarks.md for where each comes from and the comparison).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from pydantic import BaseModel

from profiles.schema import Profile
from tasks import errors
from tasks.adapters import adapter_param_count

GiB = 1024 ** 3
# ---------------------------------------------------------------------------- constants
# Fixed before any GPU measurement of this estimate (docs/benchmarks.md).
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
               "float32": 4, "float16": 2, "bfloat16": 2}
BNB_BLOCK = 64            # bitsandbytes 4-bit blocksize: one absmax per 64 weights
BNB_NESTED_BLOCK = 256    # double quant: absmax stored as uint8, one fp32 per 256 of them
# fp32 adapter weight + fp32 grad + AdamW exp_avg + exp_avg_sq (peft keeps LoRA weights
# in fp32 even on a 16-bit base: autocast_adapter_dtype).
ADAPTER_BYTES_PER_PARAM = 16
# ForCausalLMLoss upcasts logits to fp32; cross-entropy saves the fp32 log-softmax, and
# the backward of it holds two more fp32 vocab-sized buffers at once: 3 × 4 bytes.
LOSS_BYTES_PER_LOGIT = 12
# Liger's fused linear cross-entropy never holds the logits: it runs lm_head and the loss
# over chunks of about tokens × hidden / vocab rows (rounded up to a power of two), i.e.
# chunk logits of up to 2 × tokens × hidden fp32 values, and keeps the input's gradient.
FUSED_LOSS_BYTES_PER_HIDDEN = 12
# Relative cost of a training step under a memory cap (fit_to_cap), measured on the H100
# with the 8B shape, Liger, 2048-token examples (docs/benchmarks.md): recomputing a
# checkpointed layer costs 0.6 of its forward and backward, and every micro-batch costs
# about 1,800 tokens' worth on top of its tokens (fixed per-call work of the kernels and
# LoRA's small matmuls).
RECOMPUTE_COST = 0.6
MICRO_BATCH_COST_TOKENS = 1800


@dataclass(frozen=True)
class ActivationCoefficients:
    """Bytes saved for backward per token per decoder layer, as multiples of widths.

    Measured on CPU with torch.autograd.graph.saved_tensors_hooks over random Llama
    layers (hidden d, intermediate f, GQA kv = d/4, sdpa), one and three layers
    differenced, for each LoRA target and dropout setting.
    """
    base_d: float        # × hidden size: norms (fp32 upcast), attention inputs/outputs
    base_f: float        # × intermediate size: SwiGLU's saved gate / up / product
    per_target: float    # × in_features of each targeted module (its own saved input)
    shared_inputs: bool  # targets reading the same tensor (q/k/v; gate/up) save it once
    dropout: float       # × in_features per targeted module when lora.dropout > 0
    eager: float         # × heads × sequence length: eager attention's probabilities


ACTIVATIONS = {
    # 16-bit base under the Trainer's autocast: each LoRA module casts its input to a
    # 16-bit copy of its own for lora_A (no sharing).
    "mixed16": ActivationCoefficients(base_d=14.5, base_f=6.0, per_target=2.0,
                                      shared_inputs=False, dropout=4.0, eager=6.0),
    # fp32 activations: a float32 base, or a k-bit base after peft's
    # prepare_model_for_kbit_training (it upcasts the unquantized weights, so the
    # residual stream is fp32 and the Trainer runs without autocast).
    "fp32": ActivationCoefficients(base_d=18.7, base_f=12.0, per_target=4.0,
                                   shared_inputs=True, dropout=6.0, eager=5.0),
}
# Outside torch's allocator statistics: the CUDA context and library workspaces.
CUDA_CONTEXT_BYTES = 1 * GiB
# Fragmentation between torch's peak allocation and what it reserves from the GPU.
HEADROOM = 0.08

# Names of projections that read the output of another projection of the same block:
# attention output (reads attention's saved output) and MLP down projections.
ATTN_OUT = {"o_proj", "out_proj", "dense", "c_proj", "wo"}
MLP_OUT = {"down_proj", "fc2", "w2"}
_BLOCK_RE = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<rest>.+)$")


# ---------------------------------------------------------------------------- tensors
TensorSpecs = dict[str, tuple[str, list[int]]]  # name → (safetensors dtype, shape)


def read_safetensors_headers(directory: str | Path) -> TensorSpecs:
    """Every tensor's dtype and shape from the headers of a local directory's shards."""
    specs: TensorSpecs = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                specs[name] = (info["dtype"], list(info["shape"]))
    return specs


def tensor_specs_from_hub(api, repo_id: str, commit: str) -> TensorSpecs:
    """The same from the Hub, reading only each shard's header (HTTP Range requests)."""
    meta = api.get_safetensors_metadata(repo_id, revision=commit)
    return {name: (t.dtype, list(t.shape))
            for f in meta.files_metadata.values() for name, t in f.tensors.items()}


@dataclass(frozen=True)
class Linear:
    name: str            # module path, e.g. model.layers.3.self_attn.q_proj
    in_features: int
    out_features: int
    in_block: bool       # inside the repeated decoder blocks
    tied_to: Optional[str] = None  # a head whose weight is this embedding's (not in the files)

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def _block_prefix(tensors: TensorSpecs) -> Optional[str]:
    """The prefix of the repeated decoder blocks (e.g. model.layers): the one with most
    distinct indices."""
    indices: dict[str, set] = {}
    for name in tensors:
        m = _BLOCK_RE.match(name)
        if m:
            indices.setdefault(m["prefix"], set()).add(m["index"])
    return max(indices, key=lambda p: len(indices[p])) if indices else None


def _block_stacks(tensors: TensorSpecs) -> dict[str, int]:
    """Every stack of repeated blocks and its length: one for a decoder (model.layers) or
    an encoder (encoder.layer), two for an encoder-decoder (encoder.block, decoder.block).
    A stack is a prefix with at least two indices, or the longest one."""
    indices: dict[str, set] = {}
    for name in tensors:
        m = _BLOCK_RE.match(name)
        if m:
            indices.setdefault(m["prefix"], set()).add(m["index"])
    primary = _block_prefix(tensors)
    return {p: len(i) for p, i in indices.items() if len(i) >= 2 or p == primary}


def _is_embedding(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return "embed" in leaf or leaf.endswith("_bias") or leaf in ("wte", "wpe", "shared")


def linear_modules(tensors: TensorSpecs, config: Optional[dict] = None,
                   task: str = "causal-lm") -> list[Linear]:
    """2-D `.weight` tensors as linear modules; embeddings (and T5's relative-position
    bias tables, also embeddings) are excluded.

    With the model's config.json (`config`) and `model.task`: transformers' Conv1D
    weights (GPT-2 family) are read as stored, [in, out], the others as nn.Linear's
    [out, in]; and an output head tied to an embedding, which the files do not hold, is
    listed with the embedding's shape (tasks.task_types.tied_weight_keys).
    """
    from tasks.task_types import conv1d_modules, tied_weight_keys

    conv1d = conv1d_modules(config.get("model_type") or "") if config else frozenset()
    stacks = _block_stacks(tensors)
    out = []
    for name, (_, shape) in tensors.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        if _is_embedding(module):
            continue
        in_block = any(module.startswith(p + ".") for p in stacks)
        inp, outp = (shape[0], shape[1]) if module.rsplit(".", 1)[-1] in conv1d \
            else (shape[1], shape[0])
        out.append(Linear(module, in_features=inp, out_features=outp, in_block=in_block))
    for head, source in (tied_weight_keys(task, config) if config else {}).items():
        module = head[: -len(".weight")] if head.endswith(".weight") else None
        if source not in tensors and "." in source:
            # A checkpoint of the bare base model (openai-community/gpt2: `wte.weight`)
            # has no base-model prefix; transformers adds it when loading.
            source = source.split(".", 1)[1]
        if module is None or head in tensors or source not in tensors \
                or _is_embedding(module) or len(tensors[source][1]) != 2:
            continue
        vocab, hidden = tensors[source][1]
        out.append(Linear(module, in_features=hidden, out_features=vocab, in_block=False,
                          tied_to=source[: -len(".weight")]))
    return out


def module_paths(tensors: TensorSpecs, linears: list[Linear]) -> list[str]:
    """Every module path the weights imply (each tensor's parents), with the tied heads."""
    modules = {n.rsplit(".", 1)[0] for n in tensors if "." in n}
    modules |= {lin.name for lin in linears}
    modules |= {m.rsplit(".", i)[0] for m in list(modules) for i in range(1, m.count(".") + 1)}
    return sorted(modules)


def targeted(lora_targets, linears: list[Linear]) -> list[Linear]:
    """The modules peft's LoraConfig(target_modules=...) would wrap.

    all-linear: every linear layer except the output head (peft leaves lm_head out);
    a list: modules whose name is an entry or ends with '.' + entry. Given the whole
    lora section: also a regex, exclude_modules, layers_to_transform
    (tasks.adapters.targeted_names).
    """
    if hasattr(lora_targets, "target_modules"):
        from tasks.adapters import targeted_names

        chosen = set(targeted_names(lora_targets, [m.name for m in linears],
                                    [m.name for m in linears if not m.in_block]))
        return [m for m in linears if m.name in chosen]
    if lora_targets == "all-linear":
        return [m for m in linears if m.in_block]
    return [m for m in linears
            if any(m.name == t or m.name.endswith("." + t) for t in lora_targets)]


def check_target_modules(lora_targets, tensors: TensorSpecs, config: Optional[dict] = None,
                         task: str = "causal-lm") -> None:
    """Refuse target module names that match nothing, listing the names that exist.

    Given the whole lora section: regexes, exclude_modules, layers_to_transform,
    rank/alpha patterns and modules_to_save too (tasks.adapters.check_modules). With
    `config` (config.json) and `task`, Conv1D layers and tied heads count as well."""
    linears = linear_modules(tensors, config, task)
    if hasattr(lora_targets, "target_modules"):
        from tasks.adapters import check_modules

        check_modules(lora_targets, [m.name for m in linears],
                      [m.name for m in linears if not m.in_block],
                      module_paths(tensors, linears))
        return
    if lora_targets == "all-linear":
        return
    unknown = [t for t in lora_targets
               if not any(m.name == t or m.name.endswith("." + t) for m in linears)]
    if unknown:
        names = sorted({m.leaf for m in linears})
        raise errors.ProfileError(
            f"lora.target_modules: {unknown} match no linear module of this model. "
            f"Fix: use 'all-linear' or names from: {', '.join(names)}.")


# ---------------------------------------------------------------------------- estimate
class MemoryEstimate(BaseModel):
    """Peak memory of one training step, by part, in bytes."""
    parameters: int
    quantized_parameters: int
    adapter_parameters: int
    layers: int
    tokens_per_step: int
    activation_mode: str
    loaded_weights_bytes: int      # right after from_pretrained (get_memory_footprint)
    weights_bytes: int             # while training (after k-bit preparation)
    adapter_bytes: int             # adapter weights, grads and AdamW states
    activation_bytes: int
    loss_bytes: int
    peak_bytes: int

    def describe(self) -> str:
        g = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
        return (f"{g(self.peak_bytes)} (weights {g(self.weights_bytes)}, adapter+optimizer "
                f"{g(self.adapter_bytes)}, activations {g(self.activation_bytes)}, loss "
                f"{g(self.loss_bytes)}; {self.parameters / 1e9:.2f}B params, "
                f"{self.tokens_per_step} tokens/step)")


def checkpointed_layers(training, layers: int) -> int:
    """How many decoder layers keep only their input (training.checkpoint_layers)."""
    if not training.gradient_checkpointing:
        return 0
    if training.checkpoint_layers is None:
        return layers
    return min(training.checkpoint_layers, layers)


def resolved_dtype(profile: Profile, on_gpu: bool, bf16_ok: bool = True) -> str:
    """model.dtype as tasks.modeling.torch_dtype resolves it."""
    if profile.model.dtype != "auto":
        return profile.model.dtype
    return "bfloat16" if on_gpu and bf16_ok else "float32"


def _quantized_bytes(mode: str, double_quant: bool, lin: Linear) -> float:
    n = lin.in_features * lin.out_features
    if mode == "int8":
        return n + 4 * lin.out_features          # int8 weights + fp32 row scales (SCB)
    absmax = (n / BNB_BLOCK + 4 * n / (BNB_BLOCK * BNB_NESTED_BLOCK)) if double_quant \
        else 4 * n / BNB_BLOCK
    return n / 2 + absmax                        # two 4-bit weights per byte + absmax


def _activation_per_token_layer(coef: ActivationCoefficients, d: int, f: int,
                                layer_targets: list[Linear], dropout: float,
                                eager_heads_x_seq: int) -> float:
    total = coef.base_d * d + coef.base_f * f + coef.eager * eager_heads_x_seq
    seen_inputs: set = set()
    for lin in layer_targets:
        parent = lin.name.rsplit(".", 1)[0] if "." in lin.name else ""
        if coef.shared_inputs:
            if lin.leaf in ATTN_OUT:
                pass  # reads attention's output, which attention already saved
            elif lin.leaf in MLP_OUT:
                total += coef.per_target * lin.in_features
            elif (parent, lin.in_features) not in seen_inputs:
                seen_inputs.add((parent, lin.in_features))
                total += coef.per_target * lin.in_features
        else:
            total += coef.per_target * lin.in_features
        if dropout > 0:
            total += coef.dropout * lin.in_features
    return total


def estimate_training_memory(profile: Profile, tensors: TensorSpecs, config: dict,
                             on_gpu: bool = True, bf16_ok: bool = True,
                             fused_loss: bool = False) -> MemoryEstimate:
    """Peak allocator bytes of a training step with the profile's settings.

    Args:
        profile: the run's profile (model, quantization, lora, data.max_length, training).
        tensors: the base weights' names, dtypes and shapes (safetensors headers).
        config: the base model's config.json.
        on_gpu: whether training runs on a GPU (decides what dtype 'auto' means).
        bf16_ok: whether that GPU supports bfloat16.
        fused_loss: whether Liger's fused linear cross-entropy computes a causal LM's
            loss (tasks/speed.py liger_expected).
    Returns:
        A MemoryEstimate; peak_bytes is the number to compare with torch's
        max_memory_allocated (add the CUDA context for what nvidia-smi shows).
    """
    q, lora, t = profile.quantization, profile.lora, profile.training
    cfg = config.get("text_config", config)
    dtype = resolved_dtype(profile, on_gpu, bf16_ok)
    elem = DTYPE_BYTES[dtype]
    linears = linear_modules(tensors, config, profile.model.task)
    quantizable = {m.name + ".weight": m for m in linears if m.in_block} \
        if q.mode != "none" else {}

    upcast = q.mode != "none" and q.upcast_non_quantized
    params = quantized_params = 0
    loaded = training = 0.0
    for name, (_, shape) in tensors.items():
        n = 1
        for s in shape:
            n *= s
        params += n
        if name in quantizable:
            quantized_params += n
            b = _quantized_bytes(q.mode, q.double_quant, quantizable[name])
            loaded += b
            training += b
        else:
            loaded += n * elem
            # prepare_model_for_kbit_training upcasts every 16-bit parameter to fp32
            # (only with quantization.upcast_non_quantized).
            training += n * (4 if upcast else elem)

    targets = targeted(lora, linears)
    adapter_params = sum(adapter_param_count(lora, m.name, m.in_features, m.out_features)
                         for m in targets)

    from tasks.task_types import config_attribute_map

    # A config names sizes its own way (DistilBERT: dim, n_layers); its class's
    # attribute_map says which key holds the standard one.
    aliases = config_attribute_map(config.get("model_type") or "")

    def field(*names):
        for name in names:
            for key in (name, aliases.get(name)):
                if key and cfg.get(key):
                    return cfg[key]
        return None

    embedding = next((s for n, (_, s) in tensors.items() if len(s) == 2 and n.endswith(
        ("embed_tokens.weight", "word_embeddings.weight", "wte.weight", "shared.weight",
         "embed_in.weight"))), None)
    d = int(field("hidden_size", "d_model", "n_embd") or (embedding or [0, 0])[1])
    f = int(field("intermediate_size", "ffn_dim", "n_inner", "d_ff", "encoder_ffn_dim",
                  "hidden_dim") or 4 * d)
    heads = int(field("num_attention_heads", "n_head", "num_heads",
                      "encoder_attention_heads") or 1)
    vocab = int(field("vocab_size") or (embedding or [0])[0])
    prefix = _block_prefix(tensors)
    # An encoder-decoder (T5: num_layers + num_decoder_layers) runs both stacks.
    stacked = sum(_block_stacks(tensors).values())
    layers = int(stacked if cfg.get("is_encoder_decoder") and stacked
                 else field("num_hidden_layers", "n_layer") or stacked)
    mode = "fp32" if (upcast or dtype == "float32") else "mixed16"
    coef = ACTIVATIONS[mode]
    seq = profile.data.max_length
    tokens = t.per_device_batch_size * seq
    first_layer = f"{prefix}.0." if prefix else ""
    layer_targets = [m for m in targets if m.name.startswith(first_layer)] if prefix else []
    eager = heads * seq if profile.model.attn_implementation == "eager" else 0
    # The coefficients were measured with LoRA's input dropout; LoHa/LoKr's rank dropout
    # and IA3 keep no dropout mask of the input.
    dropout = lora.dropout if lora.method == "lora" else 0.0
    per_layer = _activation_per_token_layer(coef, d, f, layer_targets, dropout, eager)
    act_elem = 4 if mode == "fp32" else 2
    checkpointed = checkpointed_layers(t, layers)
    # A checkpointed layer keeps its input and backward recomputes one at a time; the
    # others keep everything.
    activations = tokens * (checkpointed * act_elem * d + (layers - checkpointed) * per_layer
                            + (per_layer if checkpointed else 0))
    # The loss is over the vocabulary per token for the language-model tasks; a
    # classification head has a handful of labels (per token, or per sequence).
    task = profile.model.task
    labels = len(cfg.get("id2label") or {}) or 2
    per_token = {"seq-classification": labels / seq, "token-classification": labels}
    loss = tokens * per_token.get(task, vocab) * LOSS_BYTES_PER_LOGIT
    if fused_loss and task == "causal-lm":
        loss = tokens * d * FUSED_LOSS_BYTES_PER_HIDDEN
    adapter = adapter_params * ADAPTER_BYTES_PER_PARAM
    peak = training + adapter + activations + loss
    return MemoryEstimate(
        parameters=params, quantized_parameters=quantized_params,
        adapter_parameters=adapter_params, layers=layers, tokens_per_step=tokens,
        activation_mode=mode, loaded_weights_bytes=int(loaded), weights_bytes=int(training),
        adapter_bytes=int(adapter), activation_bytes=int(activations), loss_bytes=int(loss),
        peak_bytes=int(peak))


# ---------------------------------------------------------------------------- devices
class Gpu(BaseModel):
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    bf16: bool = True

    @property
    def usable_bytes(self) -> int:
        return max(0, self.free_bytes - CUDA_CONTEXT_BYTES)


_NVIDIA_SMI_QUERY = ["--query-gpu=index,uuid,name,memory.total,memory.free,compute_cap",
                     "--format=csv,noheader,nounits"]


def visible_gpus(run: Callable = subprocess.run, env: Optional[dict] = None) -> list[Gpu]:
    """The GPUs this process can use, as NVML reports them through nvidia-smi.

    Respects CUDA_VISIBLE_DEVICES (indices or GPU-UUIDs; empty or -1: none), renumbering
    the visible ones from 0 as CUDA does. No nvidia-smi, or an error: no GPUs.
    """
    env = os.environ if env is None else env
    if shutil.which("nvidia-smi") is None and run is subprocess.run:
        return []
    try:
        proc = run(["nvidia-smi", *_NVIDIA_SMI_QUERY], capture_output=True, text=True,
                   timeout=15)
    except (OSError, subprocess.SubprocessError):
        return []
    if proc.returncode != 0:
        return []
    rows = []
    for line in proc.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 6:
            continue
        index, uuid, name, total, free, cap = parts[:6]
        try:
            major = float(cap)
        except ValueError:
            major = 8.0
        rows.append((int(index), uuid, name, int(float(total)) * 2**20,
                     int(float(free)) * 2**20, major >= 8.0))
    wanted = env.get("CUDA_VISIBLE_DEVICES")
    if wanted is not None:
        order = [w.strip() for w in wanted.split(",") if w.strip()]
        picked = []
        for w in order:
            if w == "-1":
                break
            match = [r for r in rows if str(r[0]) == w or r[1] == w or r[1].startswith(w)]
            if not match:
                break  # CUDA stops at the first invalid entry
            picked.append(match[0])
        rows = picked
    return [Gpu(index=i, name=r[2], total_bytes=r[3], free_bytes=r[4], bf16=r[5])
            for i, r in enumerate(rows)]


def available_ram_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def parse_size(size) -> int:
    """accelerate-style size (20GiB, 500MB, 1024) → bytes."""
    if isinstance(size, int):
        return size
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(size)
    power = " KMGT".index(m[2].upper() or " ")
    return int(float(m[1]) * (1024 if m[3] else 1000) ** power)


# ---------------------------------------------------------------------------- fit
class MemoryReport(BaseModel):
    """What preflight found: the estimate and, where there are GPUs, whether it fits."""
    estimate: MemoryEstimate
    placement: str                   # "cpu", "gpu:0", "auto over gpu:0,gpu:1 (+cpu)"
    capacity_bytes: Optional[int] = None
    fits: Optional[bool] = None      # None: nothing compared (training on CPU)
    gpus: list[Gpu] = []
    # Under training.memory_cap_gib: the training fields chosen to fit the cap.
    training: Optional[dict] = None


class InsufficientMemoryError(errors.OutOfMemoryError):
    """Preflight: the run cannot fit the visible GPU memory at these settings."""


def _single_gpu_index(device_map) -> Optional[int]:
    """The GPU a placement puts everything on, or None when it spreads or uses the CPU."""
    if device_map is None or device_map == "cuda":
        return 0
    if isinstance(device_map, dict) and set(device_map) == {""}:
        v = device_map[""]
        if isinstance(v, int):
            return v
        if isinstance(v, str) and v.startswith("cuda"):
            return int(v.split(":")[1]) if ":" in v else 0
    return None


def place(profile: Profile, estimate: MemoryEstimate, gpus: list[Gpu],
          ram_bytes: Optional[int] = None) -> MemoryReport:
    """Compare the estimate with the devices the profile's device_map would use."""
    dm = profile.model.device_map
    if not gpus or dm == "cpu" or (isinstance(dm, dict) and set(map(str, dm.values()))
                                   <= {"cpu", "disk"}):
        return MemoryReport(estimate=estimate, placement="cpu", gpus=gpus)
    need = estimate.peak_bytes * (1 + HEADROOM)
    single = _single_gpu_index(dm)
    if single is not None:
        if single >= len(gpus):
            raise errors.ProfileError(
                f"model.device_map: GPU {single} is not visible (this process sees "
                f"{len(gpus)}). Fix: use an index below {len(gpus)}, or device_map auto.")
        gpu = gpus[single]
        return MemoryReport(estimate=estimate, placement=f"gpu:{single}",
                            capacity_bytes=gpu.usable_bytes, fits=need <= gpu.usable_bytes,
                            gpus=gpus)
    # Spread (auto, or a module map): the weights go over the GPUs (within max_memory),
    # then the CPU; everything else stays with the layers on a GPU.
    limits = {str(k): parse_size(v) for k, v in (profile.model.max_memory or {}).items()}
    named = None
    if isinstance(dm, dict):
        named = {int(v.split(":")[1]) if isinstance(v, str) and ":" in v else
                 (0 if v == "cuda" else v) for v in dm.values() if v not in ("cpu", "disk")}
    used = [g for g in gpus if named is None or g.index in named]
    caps = [min(g.usable_bytes, limits.get(str(g.index), g.usable_bytes)) for g in used]
    offload = dm == "auto" or (isinstance(dm, dict) and ("cpu" in dm.values()
                                                         or "disk" in dm.values()))
    cpu = 0
    if offload:
        ram = available_ram_bytes() if ram_bytes is None else ram_bytes
        cpu = min(ram, limits["cpu"]) if "cpu" in limits else ram
    if isinstance(dm, dict) and "disk" in dm.values():
        cpu = max(cpu, 1 << 62)  # disk offload: weights have somewhere to go
    rest = (estimate.peak_bytes - estimate.weights_bytes) * (1 + HEADROOM)
    fits = bool(caps) and rest <= max(caps) and need <= sum(caps) + cpu
    where = ",".join(f"gpu:{g.index}" for g in used) + (" (+cpu)" if cpu else "")
    return MemoryReport(estimate=estimate, placement=f"spread over {where}",
                        capacity_bytes=sum(caps) + min(cpu, 1 << 50), fits=fits, gpus=gpus)


def _variant(profile: Profile, **sections) -> Profile:
    update = {name: getattr(profile, name).model_copy(update=fields)
              for name, fields in sections.items()}
    return profile.model_copy(update=update)


def suggestions(profile: Profile, tensors: TensorSpecs, config: dict, gpus: list[Gpu],
                ram_bytes: Optional[int] = None, fused_loss: bool = False) -> list[str]:
    """Changes that would fit, each as the --set overrides to apply, with its estimate."""
    t = profile.training
    bf16_ok = all(g.bf16 for g in gpus)

    def fits(p: Profile) -> Optional[MemoryReport]:
        est = estimate_training_memory(p, tensors, config, on_gpu=True, bf16_ok=bf16_ok,
                                       fused_loss=fused_loss)
        rep = place(p, est, gpus, ram_bytes)
        return rep if rep.fits else None

    # Preference order: keep the model as it is, then quantize, then spread it out; the
    # first variant that fits in each family (same settings changed) is reported.
    quant_options = [{}] + ([{"mode": "nf4"}] if profile.quantization.mode == "none" else [])
    batches = []
    bs = t.per_device_batch_size
    while bs >= 1:
        batches.append(bs)
        bs //= 2
    candidates: list[tuple[list[str], Profile]] = []
    for quant in quant_options:
        for ckpt in sorted({t.gradient_checkpointing, True}):
            for bs in batches:
                if not quant and ckpt == t.gradient_checkpointing \
                        and bs == t.per_device_batch_size:
                    continue  # that is the profile itself
                accum = max(1, t.gradient_accumulation_steps * t.per_device_batch_size // bs)
                sets = [f"quantization.mode={quant['mode']}"] if quant else []
                if ckpt != t.gradient_checkpointing:
                    sets.append("training.gradient_checkpointing=true")
                if bs != t.per_device_batch_size:
                    sets += [f"training.per_device_batch_size={bs}",
                             f"training.gradient_accumulation_steps={accum}"]
                training = {"gradient_checkpointing": ckpt, "per_device_batch_size": bs,
                            "gradient_accumulation_steps": accum}
                candidates.append((sets, _variant(profile, training=training,
                                                  **({"quantization": quant} if quant
                                                     else {}))))
    if _single_gpu_index(profile.model.device_map) is not None and len(gpus) > 1:
        candidates.append((["model.device_map=auto"],
                           _variant(profile, model={"device_map": "auto"})))
    out, families = [], set()
    for sets, variant in candidates:
        family = frozenset(s.split("=")[0] for s in sets)
        lever = family & {"quantization.mode", "model.device_map"}
        if lever:
            family = frozenset(lever)  # the first (largest-batch) fit of that lever only
        if family in families or (not lever and any(f < family for f in families)):
            continue  # a simpler change already fits
        rep = fits(variant)
        if rep is not None:
            families.add(family)
            out.append(f"--set {' --set '.join(sets)} (estimated "
                       f"{rep.estimate.peak_bytes / GiB:.1f} GiB)")
    return out[:4]


def step_cost(tokens: int, micro_batches: int, checkpointed: int, layers: int) -> float:
    """A training step's relative time (see RECOMPUTE_COST, MICRO_BATCH_COST_TOKENS)."""
    return (micro_batches * MICRO_BATCH_COST_TOKENS
            + tokens * (1 + RECOMPUTE_COST * checkpointed / layers))


def fit_to_cap(profile: Profile, tensors: TensorSpecs, config: dict, on_gpu: bool,
               bf16_ok: bool = True, processes: int = 1, fused_loss: bool = False) -> dict:
    """The training fields that keep the estimate under training.memory_cap_gib at the
    same global batch (each of `processes` training processes takes its share): of every
    per-device batch that divides it, with as few checkpointed layers as fit, the one
    step_cost ranks fastest — fewer, larger micro-batches against less recomputation.

    Raises:
        InsufficientMemoryError: nothing fits, not even one example with every layer
            checkpointed.
    """
    t = profile.training
    cap = t.memory_cap_gib * GiB
    total = (t.global_batch_size // processes if t.global_batch_size
             else t.per_device_batch_size * t.gradient_accumulation_steps)
    batches = [b for b in range(total, 0, -1) if total % b == 0]
    layers = estimate_training_memory(profile, tensors, config, on_gpu, bf16_ok).layers
    tokens = total * profile.data.max_length
    fitting = []  # (cost, fields) of the fewest checkpointed layers that fit, per batch
    for batch in batches:
        for count in range(layers + 1):
            fields = {"per_device_batch_size": batch, "gradient_checkpointing": count > 0,
                      "checkpoint_layers": count if 0 < count < layers else None}
            if t.global_batch_size is None:
                fields["gradient_accumulation_steps"] = total // batch
            trial = _variant(profile, training=fields)
            if estimate_training_memory(trial, tensors, config, on_gpu, bf16_ok,
                                        fused_loss).peak_bytes <= cap:
                fitting.append((step_cost(tokens, total // batch, count, layers), fields))
                break
    if fitting:
        return min(fitting, key=lambda found: found[0])[1]
    raise InsufficientMemoryError(
        f"training.memory_cap_gib: even one example per step with every layer checkpointed "
        f"needs more than {t.memory_cap_gib} GiB. Fix: raise the cap, quantize "
        "(quantization.mode nf4) or shorten data.max_length.")


def plan_memory(profile: Profile, tensors: TensorSpecs, config: dict,
                gpus: Optional[list[Gpu]] = None, ram_bytes: Optional[int] = None
                ) -> MemoryReport:
    """Estimate, compare with the visible GPUs, and refuse a run that cannot fit.

    Raises:
        InsufficientMemoryError: naming the estimate, the capacity and the changes
            (each as --set overrides) that would fit.
    """
    from tasks.launch import resolve_launcher
    from tasks.speed import liger_expected

    gpus = visible_gpus() if gpus is None else gpus
    on_gpu = bool(gpus) and profile.model.device_map != "cpu"
    bf16_ok = all(g.bf16 for g in gpus) if gpus else True
    processes = resolve_launcher(profile.training, len(gpus))[1]
    fused_loss = liger_expected(profile, on_gpu, processes, config.get("model_type"))
    chosen = None
    if profile.training.memory_cap_gib is not None:
        chosen = fit_to_cap(profile, tensors, config, on_gpu, bf16_ok, processes, fused_loss)
        profile = _variant(profile, training=chosen)
    estimate = estimate_training_memory(profile, tensors, config, on_gpu=on_gpu,
                                        bf16_ok=bf16_ok, fused_loss=fused_loss)
    report = place(profile, estimate, gpus, ram_bytes)
    report.training = chosen
    if report.fits is False:
        fixes = suggestions(profile, tensors, config, gpus, ram_bytes, fused_loss)
        fix = ("Fix, any of: " + "; ".join(fixes)) if fixes else (
            "Fix: none of gradient checkpointing, a smaller batch, nf4 or device_map auto "
            "fits; use a GPU with more memory or a shorter data.max_length.")
        raise InsufficientMemoryError(
            f"training.per_device_batch_size / quantization.mode: this run needs about "
            f"{estimate.describe()}, more than {report.placement} can hold "
            f"({(report.capacity_bytes or 0) / GiB:.1f} GiB usable after "
            f"{CUDA_CONTEXT_BYTES / GiB:.0f} GiB for the CUDA context and "
            f"{HEADROOM:.0%} headroom). {fix}")
    return report
