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

from dataclasses import dataclass

from profiles.schema import Profile
from tasks.contracts import CUDA_CONTEXT_BYTES, GiB, MemoryEstimate  # noqa: F401 (re-used by fit)
from tasks.memory.tensors import (
    Linear,
    TensorSpecs,
    _block_prefix,
    _block_stacks,
    linear_modules,
    targeted,
)
from tasks.training.adapters import adapter_param_count
from tasks.training.speed import offloads_activations, use_torch_compile

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
    # 16-bit base under the Trainer's autocast. peft's cast of each LoRA input to float32
    # is off (tasks.training.speed.keep_adapter_inputs_16bit), so modules reading one
    # tensor keep it once, as in fp32 mode; before, each kept a 16-bit copy of its own.
    "mixed16": ActivationCoefficients(base_d=14.5, base_f=6.0, per_target=2.0,
                                      shared_inputs=True, dropout=4.0, eager=6.0),
    # fp32 activations: a float32 base, or a k-bit base after peft's
    # prepare_model_for_kbit_training (it upcasts the unquantized weights, so the
    # residual stream is fp32 and the Trainer runs without autocast).
    "fp32": ActivationCoefficients(base_d=18.7, base_f=12.0, per_target=4.0,
                                   shared_inputs=True, dropout=6.0, eager=5.0),
}
# training.offload_activations: layer inputs on the GPU at once during the backward.
OFFLOADED_INPUTS_ON_GPU = 2
# Fragmentation between torch's peak allocation and what it reserves from the GPU.
HEADROOM = 0.08

# Names of projections that read the output of another projection of the same block:
# attention output (reads attention's saved output) and MLP down projections.
ATTN_OUT = {"o_proj", "out_proj", "dense", "c_proj", "wo"}
MLP_OUT = {"down_proj", "fc2", "w2"}


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

    from tasks.model_tasks import config_attribute_map

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
    # others keep everything. Offloaded inputs wait in CPU memory: at most two are on the
    # GPU at once (the one being recomputed and the one prefetched, tasks.training.offload).
    kept_inputs = min(checkpointed, OFFLOADED_INPUTS_ON_GPU) \
        if offloads_activations(profile, on_gpu, processes=1) else checkpointed
    # Compiled layers keep about training.activation_memory_budget of what eager ones do
    # (the partitioner recomputes the rest; measured 0.58–0.63 at budgets 0.5–0.6, 8B and
    # 1B, docs/benchmarks.md).
    if use_torch_compile(profile, on_gpu, processes=1):
        per_layer *= t.activation_memory_budget
    activations = tokens * (kept_inputs * act_elem * d + (layers - checkpointed) * per_layer
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
