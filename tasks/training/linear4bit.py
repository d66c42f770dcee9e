"""A compile-friendly frozen 4-bit base linear for QLoRA (issue #14, the nf4 row).

peft wraps each bitsandbytes `Linear4bit` of a 4-bit model in its LoRA `Linear4bit`, whose
forward calls `self.base_layer(x)`: bnb's `Linear4bit.forward` → `bnb.matmul_4bit` → the
`MatMul4Bit` autograd.Function, which takes the `Params4bit` weight (a tensor subclass)
and its `QuantState` (a plain Python object holding tensors and ints).
`convert_4bit_base_layers` swaps that base layer for a `Frozen4bitLinear` built from it
without copying or re-quantizing anything: the packed weight and the QuantState's tensors
(absmax; with double quantization the nested absmax, its code and the offset; the 4-bit
code) become buffers of the new module — the same storage — and its ints (blocksize, shape,
nested blocksize, quant_type, dtype) plain attributes. Its forward calls ONE custom op,
`torch.ops.loraflow.linear_4bit`, whose arguments are those tensors and ints: dynamo sees a
single opaque call with plain-tensor inputs (module buffers, which it lifts as graph
inputs, so the decoder layers share one compiled graph rather than specialising on each
layer's QuantState), a fake kernel gives it the output's shape and dtype, and the
registered autograd formula saves only the 4-bit weight tensors.

Numerics — the same as bnb's path, bit for bit (tests/unit/test_linear4bit.py asserts
`torch.equal` for outputs and gradients): the forward calls the very op `MatMul4Bit` calls,
`torch.ops.bitsandbytes.gemm_4bit`, with the same arguments (on CUDA it picks bnb's fused
kernel for few rows and dequantize + `F.linear` past 1,536 rows, as it does under bnb), and
the backward does what `MatMul4Bit.backward` does: `F.dequantize_4bit` with the QuantState
rebuilt from the op's arguments, cast to the gradient's dtype, then
`grad_x = grad · W` (no weight gradient; a trainable bias gets `grad.sum`, as bnb computes
it). The compute-dtype handling of `Linear4bit.forward` is kept: the input is cast to the
layer's `compute_dtype` (when set) and the output back to the input's dtype.

Why our own: nothing maintained gives bnb's 4-bit matmul as one op with tensor arguments
and an autograd formula — bnb's own op (`bitsandbytes::gemm_4bit`) has no autograd, and its
autograd.Function takes a QuantState object.

Memory: the op saves the packed weight and the quantization statistics (module buffers, no
new memory) — never the input nor the dequantized weight, which the backward rebuilds.

What no longer works on a converted model (the base layer has no `weight` any more):
peft's `merge` / `unmerge` / `merge_and_unload` (they dequantize `base_layer.weight` and
write a new `Params4bit` back), DoRA (its forward reads the base weight's norms; conversion
refuses it), and anything else that reads `base_layer.weight` or `base_layer.quant_state`.
Merging must happen on a model loaded without this conversion (the saved adapter is
unaffected: only lora_A / lora_B are saved). The buffers are not persistent: a full
`state_dict()` of a converted model leaves the 4-bit base weights out (an adapter's save
never had them).

Unlike most of tasks.training this module imports torch (and bitsandbytes, lazily, when the
op runs) at import time: only the training worker imports it.
"""
from __future__ import annotations

from typing import Optional

import torch

# bnb's gemm_4bit handles double quantization only with nested blocks of 256
# (bitsandbytes/autograd/_functions.py, MatMul4Bit.forward).
_NESTED_BLOCKSIZE = 256


@torch.library.custom_op("loraflow::linear_4bit", mutates_args=())
def linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    shape: list[int],
    blocksize: int,
    nested_blocksize: int,
    quant_type: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """y = x · Wᵀ (+ bias) for a bnb 4-bit weight W, as `bnb.matmul_4bit` computes it.

    Args:
        x: (..., K) input, already in the compute dtype.
        packed: the packed 4-bit weight (any shape; viewed as bnb's canonical (N·K/2, 1)).
        absmax: per-block scales — float32, or uint8 codes when double-quantized.
        code: the 4-bit quantization map (`QuantState.code`); only the backward's
            QuantState carries it.
        nested_absmax, nested_code, offset: the double quantization's statistics
            (`state2.absmax`, `state2.code`, `offset`), or None.
        bias: (N,) in x's dtype, or None.
        shape: [N, K], the unpacked weight's shape (`QuantState.shape`).
        blocksize: the 4-bit block size.
        nested_blocksize: the nested block size (0 when not double-quantized).
        quant_type: "nf4" or "fp4".
        dtype: the dtype the weight was quantized from (`QuantState.dtype`).

    Returns:
        (..., N) in x's dtype.
    """
    import bitsandbytes  # noqa: F401  (registers the bitsandbytes ops and their kernels)

    if x.numel() == 0:  # bnb returns an empty result without calling a kernel
        return x.new_empty((*x.shape[:-1], shape[0]))
    b = packed.view(-1, 1)
    if nested_absmax is None:
        return torch.ops.bitsandbytes.gemm_4bit.default(
            x, b, shape, absmax, blocksize, quant_type, bias=bias)
    return torch.ops.bitsandbytes.gemm_4bit.default(
        x, b, shape, nested_absmax, blocksize, quant_type, bias=bias,
        absmax_8bit=absmax, absmax_code=nested_code, absmax_offset=offset)


@linear_4bit.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, offset, bias, shape, blocksize,
      nested_blocksize, quant_type, dtype):
    torch._check(x.shape[-1] == shape[1], lambda: f"linear_4bit: x has {x.shape[-1]} "
                 f"features, the weight {shape[1]}")
    return x.new_empty((*x.shape[:-1], shape[0]))


def _quant_state(packed_stats, shape, blocksize, nested_blocksize, quant_type, dtype):
    """bnb's QuantState rebuilt from the op's arguments (no copies)."""
    from bitsandbytes.functional import QuantState

    absmax, code, nested_absmax, nested_code, offset = packed_stats
    state2 = None
    if nested_absmax is not None:
        # bnb quantizes the float32 absmax blockwise: its nested dtype is float32.
        state2 = QuantState(absmax=nested_absmax, code=nested_code,
                            blocksize=nested_blocksize, dtype=torch.float32)
    return QuantState(absmax=absmax, shape=torch.Size(shape), code=code, blocksize=blocksize,
                      quant_type=quant_type, dtype=dtype, offset=offset, state2=state2)


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, code, nested_absmax, nested_code, offset, bias, shape, blocksize,
     nested_blocksize, quant_type, dtype) = inputs
    # Only the weight's own tensors (module buffers): never x, never the dequantized W.
    ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code, offset)
    ctx.meta = (list(shape), blocksize, nested_blocksize, quant_type, dtype)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    import bitsandbytes.functional as bnbf

    packed, *stats = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        # As MatMul4Bit.backward: dequantize in the weight's dtype, cast to the gradient's.
        w = bnbf.dequantize_4bit(packed.view(-1, 1), _quant_state(stats, *ctx.meta))
        grad_x = torch.matmul(grad, w.to(grad.dtype))
    if ctx.needs_input_grad[7]:
        # As bnb: a sum over the first dimension in the bias dtype, then (autograd's
        # sum_to in bnb's case) over the remaining leading ones.
        grad_bias = grad.sum(0, dtype=ctx.bias_dtype)
        if grad_bias.dim() > 1:
            grad_bias = grad_bias.sum(tuple(range(grad_bias.dim() - 1)))
    return (grad_x, None, None, None, None, None, None, grad_bias,
            None, None, None, None, None)


linear_4bit.register_autograd(_backward, setup_context=_setup_context)


class Frozen4bitLinear(torch.nn.Module):
    """A frozen bitsandbytes 4-bit linear whose forward is one `loraflow::linear_4bit` op.

    Build it with `Frozen4bitLinear.from_bnb(linear4bit)`: the buffers share storage with
    the bnb layer's packed weight and QuantState (nothing is copied or re-quantized).

    Attributes:
        in_features: K.
        out_features: N.
        blocksize, nested_blocksize, quant_type, weight_dtype: the QuantState's ints
            (`nested_blocksize` 0 without double quantization; `weight_dtype` is the dtype
            the weight was quantized from).
        compute_dtype: the bnb layer's `compute_dtype` when it was set (the input is cast
            to it, the output back to the input's dtype); None: compute in the input's
            dtype (what bnb settles on at its first call for a float32/bfloat16 input).
        bias: the bnb layer's bias parameter itself (or None).
    """

    def __init__(self, in_features: int, out_features: int, blocksize: int,
                 nested_blocksize: int, quant_type: str, weight_dtype: torch.dtype,
                 compute_dtype: Optional[torch.dtype]):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = blocksize
        self.nested_blocksize = nested_blocksize
        self.quant_type = quant_type
        self.weight_dtype = weight_dtype
        self.compute_dtype = compute_dtype
        self.bias: Optional[torch.nn.Parameter] = None
        for name in ("weight_packed", "absmax", "code", "nested_absmax", "nested_code",
                     "offset"):
            self.register_buffer(name, None, persistent=False)

    @classmethod
    def from_bnb(cls, layer) -> "Frozen4bitLinear":
        """The frozen 4-bit layer over a quantized bnb `Linear4bit`'s own tensors.

        Args:
            layer: a `bitsandbytes.nn.Linear4bit` whose `Params4bit` weight is quantized
                (nf4 or fp4, with or without double quantization, bias or not).

        Returns:
            The new layer, on the bnb layer's device, sharing its tensors; the bnb layer is
            left unchanged.

        Raises:
            ValueError: the weight is not quantized, is in bnb's CPU inference layout
                (after a forward under `torch.no_grad()` on an AVX512-BF16 CPU), was
                quantized from a transposed (K, N) tensor, or is double-quantized with
                nested blocks other than 256 — cases bnb's training path does not take.
        """
        weight = layer.weight
        qs = getattr(weight, "quant_state", None)
        if qs is None:  # bnb keeps a copy on the module (its FSDP path restores from it)
            qs = getattr(layer, "quant_state", None)
        n, k = layer.out_features, layer.in_features
        if qs is None or not getattr(weight, "bnb_quantized", True):
            raise ValueError(
                f"Frozen4bitLinear: the {type(layer).__name__} weight ({n}×{k}) is not "
                "quantized yet. Fix: move the model to its device (bnb quantizes there) "
                "before converting.")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError(
                "Frozen4bitLinear: the weight was repacked into bitsandbytes' CPU inference "
                "layout (a forward under torch.no_grad() on an AVX512-BF16 CPU), which has "
                "no backward. Fix: convert before any no-grad forward.")
        if list(qs.shape) != [n, k]:
            raise ValueError(
                f"Frozen4bitLinear: the weight was quantized with shape {list(qs.shape)}, "
                f"not [out_features, in_features] = [{n}, {k}]. Fix: re-quantize it from "
                "the (N, K) weight.")
        nested = qs.state2 is not None
        if nested and (qs.state2.blocksize != _NESTED_BLOCKSIZE
                       or qs.state2.dtype not in (None, torch.float32)):
            raise ValueError(
                f"Frozen4bitLinear: double quantization with nested blocksize "
                f"{qs.state2.blocksize} and dtype {qs.state2.dtype}: bitsandbytes' matmul "
                f"takes blocksize {_NESTED_BLOCKSIZE}, float32 only. Fix: leave this layer "
                "unconverted.")
        compute_dtype = layer.compute_dtype if getattr(layer, "compute_type_is_set", True) \
            else None
        new = cls(k, n, qs.blocksize, qs.state2.blocksize if nested else 0, qs.quant_type,
                  qs.dtype, compute_dtype)
        # A plain-tensor view of the same storage: the Params4bit subclass (and its
        # QuantState) stays out of what dynamo traces.
        new.weight_packed = weight.detach().as_subclass(torch.Tensor)
        new.absmax = qs.absmax
        new.code = qs.code
        if nested:
            new.nested_absmax = qs.state2.absmax
            new.nested_code = qs.state2.code
            new.offset = qs.offset
        new.bias = layer.bias
        return new

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` casts every floating tensor: the float32 scales (and a
        # bf16 quant storage) would be cast too, lossily. As in bnb, the buffers only follow
        # device moves; the bias is cast like any parameter.
        buffer_ids = {id(b) for b in self._buffers.values() if b is not None}

        def keep_buffer_dtypes(t):
            out = fn(t)
            if id(t) in buffer_ids and out.dtype != t.dtype:
                out = t.to(device=out.device)
            return out

        return super()._apply(keep_buffer_dtypes, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) → (..., N) in x's dtype, as bnb's `Linear4bit.forward` computes it."""
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = torch.ops.loraflow.linear_4bit(
            x, self.weight_packed, self.absmax, self.code, self.nested_absmax,
            self.nested_code, self.offset, bias, [self.out_features, self.in_features],
            self.blocksize, self.nested_blocksize, self.quant_type, self.weight_dtype)
        return y.to(inp_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.nested_blocksize > 0}, "
                f"compute_dtype={self.compute_dtype}")


def convert_4bit_base_layers(model: torch.nn.Module) -> int:
    """Swap the bnb base layer of every peft LoRA `Linear4bit` for a `Frozen4bitLinear`.

    Each converted layer computes what it computed before, bit for bit (see the module
    docstring), as one `loraflow::linear_4bit` op that torch.compile traces without a
    graph break. The 4-bit tensors are shared, not copied: no memory is added or freed.
    Other modules (LoRA on plain linears, lm_head, embeddings) are left alone. Call it
    after counting parameters (the packed weights become buffers) and before compiling.

    What no longer works on the converted model: peft's merge / unmerge /
    merge_and_unload (they read and rewrite `base_layer.weight`), DoRA (refused below),
    and anything else reading `base_layer.weight` or `base_layer.quant_state`; a full
    `state_dict()` leaves the 4-bit base weights out (the saved adapter is unaffected).

    Args:
        model: a peft model (or any module tree containing peft LoRA layers).

    Returns:
        How many base layers were converted (0 when bitsandbytes is not installed).

    Raises:
        ValueError: a LoRA 4-bit layer uses DoRA (it reads the base weight in its forward),
            or a base weight is in a layout bnb's training path does not take
            (`Frozen4bitLinear.from_bnb`); nothing is converted then.
    """
    from peft.tuners.lora import bnb as lora_bnb

    lora_cls = getattr(lora_bnb, "Linear4bit", None)  # defined only when bnb 4-bit is there
    if lora_cls is None:
        return 0
    import bitsandbytes as bnb

    swaps = []
    for name, module in model.named_modules():
        if not isinstance(module, lora_cls):
            continue
        variants = getattr(module, "lora_variant", {}).values()
        if any(module.use_dora.values()) or any("Dora" in type(v).__name__ for v in variants):
            raise ValueError(
                f"training: LoRA layer {name!r} uses DoRA, which reads the 4-bit base weight "
                "in its forward. Fix: turn DoRA off or leave the 4-bit base layers as bnb "
                "has them.")
        base = module.base_layer
        if isinstance(base, bnb.nn.Linear4bit):
            try:
                swaps.append((module, Frozen4bitLinear.from_bnb(base)))
            except ValueError as exc:
                raise ValueError(f"training: LoRA layer {name!r}: {exc}") from None
    for module, new in swaps:
        module.base_layer = new
    return len(swaps)
