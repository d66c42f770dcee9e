"""FP8 (e4m3) matmuls for the frozen base weights of LoRA layers (issue #14 lever).

Every peft LoRA `Linear` keeps its base `nn.Linear` frozen; only lora_A / lora_B train.
`convert_base_layers_to_float8` swaps that frozen base for a `Float8FrozenLinear`, whose
forward and backward matmuls run on FP8 tensor cores through `torch._scaled_mm`, while
the adapter path stays exactly as peft has it (bf16/fp32).

Why our own: torchao (whose float8 training does this) is not on the GPU image and not a
loraflow dependency, and what a *frozen* weight needs is small — one
`torch.autograd.Function` of ~50 lines of plain torch ops (row-wise quantize, two
`_scaled_mm` calls), no weight gradient, no delayed scaling state.

Shapes (N = out_features, K = in_features, M = tokens):
- `weight_fp8` (N, K) e4m3, row-major, with `weight_scale` (N,) fp32 = amax over K / 448;
- `weight_t_fp8` (K, N) e4m3, contiguous (the transpose, for the backward), with
  `weight_t_scale` (K,) fp32 = amax over N / 448;
- forward: x (..., K) → (M, K), quantized per row on the fly, y = x_q · W_qᵀ (M, N);
- backward (`backward="fp8"`): grad (M, N) quantized per row, grad_x = g_q · (Wᵀ)_qᵀ (M, K);
- backward (`backward="dequantized"`): grad_x = grad · W̃ (M, K) in `compute_dtype`, W̃ the
  fp8 weight dequantized on the fly (N, K): no transposed copy, no quantized gradient.

Numerics: e4m3 has 3 mantissa bits and a largest finite value of 448; every scale is a
row's (or column's) amax / 448 (amax clamped to ≥ 1e-12, so an all-zero row gives zeros,
not NaN) and values are clamped to ±448 before the cast (saturating). `_scaled_mm`
accumulates in fp32 and writes the original weight dtype (`compute_dtype`). The relative
(Frobenius) error of one matmul against bf16 is a few percent (tests/unit/test_fp8.py
measures it). It changes the matmul precision of the frozen base model, so it is an
opt-in lever that a profile turns on explicitly — never silently on.

Memory: the two fp8 copies cost 2 × 1 byte per parameter, the same as the bf16 weight they
replace (which is freed); with `backward="dequantized"` one copy, 1 byte per parameter (half
the weight), and one layer's dequantized weight lives only during its backward matmul.
Nothing the size of the input is saved for the backward: the weight is frozen, so its
gradient (the only use of x) is never computed.

Which recipe keeps training as 16 bits do (docs/benchmarks.md, 1B learnable check on the
H200, one seed each): all seven projections moved the loss 3.4–3.8% (either backward),
gate/up/down with the dequantized backward 2.3%, gate and up only with the dequantized
backward 0.6% — the 16-bit path's own 0.7%.

Padding: `_scaled_mm` needs K and N multiples of 16 (conversion skips other layers) and,
for some layouts on the GPU, M too; M is padded up to a multiple of 16 with zero rows and
the result sliced back — cheaper than a dequantized fallback and free when M already is.
The pad amount comes from the shape (no tensor values), so torch.compile traces it.

peft and `base_layer.weight`: `Float8FrozenLinear` has no `weight`. peft's LoRA
`Linear.forward` (peft 0.21, tuners/lora/layer.py) calls `self.base_layer(x)` and casts x
to `lora_A.weight.dtype` only — it never reads `base_layer.weight` — so training and
inference with unmerged adapters work. What does read it: `merge` / `unmerge` /
`merge_and_unload` (adds the delta into `base_layer.weight.data`) and the DoRA variant
(weight norms of the base). Conversion therefore refuses DoRA (ValueError), and merging
must happen on a model loaded without this conversion (the saved adapter is unaffected:
only lora_A / lora_B are saved).

Unlike the rest of tasks.training this module imports torch at import time (the class
subclasses nn.Module); only the training worker imports it.
"""
from __future__ import annotations

import torch

E4M3_MAX = 448.0
_AMAX_FLOOR = 1e-12
_ALIGN = 16


def _quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 quantization of a 2-D tensor: (t_fp8, scale (rows, 1) fp32)."""
    t32 = t.float()
    scale = t32.abs().amax(dim=-1, keepdim=True).clamp(min=_AMAX_FLOOR) / E4M3_MAX
    q = (t32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _scaled_matmul(a: torch.Tensor, b_fp8: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype):
    """a (M, K) any float → a_q · b_fp8ᵀ (M, N) in out_dtype; b_fp8 (N, K) row-major."""
    m = a.shape[0]
    pad = (-m) % _ALIGN
    if pad:
        a = torch.nn.functional.pad(a, (0, 0, 0, pad))
    a_q, a_scale = _quantize_rows(a)
    out = torch._scaled_mm(
        a_q, b_fp8.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1), out_dtype=out_dtype
    )
    return out[:m] if pad else out


class _Float8FrozenMatmul(torch.autograd.Function):
    """y = x · Wᵀ with W frozen, the forward in e4m3; saves only fp8 weight buffers.

    The input gradient: in e4m3 against the transposed copy (weight_t_fp8 given), or — with
    weight_t_fp8 None — in 16 bits against the fp8 weight dequantized for this backward
    (the gradient itself is not quantized)."""

    @staticmethod
    def forward(ctx, x2d, weight_fp8, weight_scale, weight_t_fp8, weight_t_scale, out_dtype):
        ctx.dequantized = weight_t_fp8 is None
        if ctx.dequantized:
            ctx.save_for_backward(weight_fp8, weight_scale)
        else:
            ctx.save_for_backward(weight_t_fp8, weight_t_scale)
        ctx.out_dtype = out_dtype
        return _scaled_matmul(x2d, weight_fp8, weight_scale, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        if ctx.dequantized:
            dequantized = (weight.float() * scale.view(-1, 1)).to(ctx.out_dtype)
            grad_x = grad_out.to(ctx.out_dtype) @ dequantized
        else:
            grad_x = _scaled_matmul(grad_out, weight, scale, ctx.out_dtype)
        return grad_x, None, None, None, None, None


BACKWARDS = ("fp8", "dequantized")


class Float8FrozenLinear(torch.nn.Module):
    """A frozen `nn.Linear` whose forward matmul runs in FP8 e4m3 (its input-gradient matmul
    too, unless `backward="dequantized"`).

    Build it with `Float8FrozenLinear.from_linear(linear)`. It holds no parameters that
    train: the weight lives in fp8 buffers (see the module docstring), the bias (if any)
    as a frozen parameter in its original dtype.

    Attributes:
        in_features: K.
        out_features: N.
        compute_dtype: the original weight dtype; the output dtype of forward.
        backward: "fp8" (input gradient in e4m3 against the transposed copy) or
            "dequantized" (in `compute_dtype` against the dequantized weight; no
            transposed copy: `weight_t_fp8` / `weight_t_scale` are None).
    """

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype,
                 device=None, backward: str = "fp8"):
        super().__init__()
        if backward not in BACKWARDS:
            raise ValueError(f"Float8FrozenLinear: backward={backward!r}; one of {BACKWARDS}.")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.backward = backward
        f8 = torch.float8_e4m3fn
        transposed = backward == "fp8"
        self.register_buffer("weight_fp8", torch.empty(out_features, in_features, dtype=f8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("weight_t_fp8", torch.empty(in_features, out_features, dtype=f8, device=device)
                             if transposed else None)
        self.register_buffer("weight_t_scale", torch.empty(in_features, dtype=torch.float32, device=device)
                             if transposed else None)
        self.bias: torch.nn.Parameter | None = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: torch.nn.Linear, backward: str = "fp8") -> "Float8FrozenLinear":
        """Quantize a frozen linear layer's weight (row-wise; both orientations for an fp8
        backward, one for a dequantized one).

        Args:
            linear: an `nn.Linear` with a floating-point weight (N, K); K and N
                multiples of 16.
            backward: "fp8" or "dequantized" (see the class).

        Returns:
            The FP8 layer, on the linear's device; the linear itself is left unchanged
            (the caller drops it to free the weight).

        Raises:
            ValueError: K or N is not a multiple of 16, or the weight is not floating-point.
        """
        w = linear.weight
        n, k = w.shape
        if n % _ALIGN or k % _ALIGN:
            raise ValueError(
                f"Float8FrozenLinear: in_features={k}, out_features={n}: torch._scaled_mm needs "
                f"multiples of {_ALIGN}. Fix: leave this layer in its original dtype."
            )
        if not w.is_floating_point():
            raise ValueError(
                f"Float8FrozenLinear: weight dtype {w.dtype} is not floating point "
                "(already quantized?). Fix: convert only plain bf16/fp16/fp32 linears."
            )
        layer = cls(k, n, w.dtype, device=w.device, backward=backward)
        w_q, w_scale = _quantize_rows(w)
        layer.weight_fp8.copy_(w_q)
        layer.weight_scale.copy_(w_scale.view(n))
        if backward == "fp8":
            wt_q, wt_scale = _quantize_rows(w.t())
            layer.weight_t_fp8.copy_(wt_q.contiguous())
            layer.weight_t_scale.copy_(wt_scale.view(k))
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` / `.half()` cast every floating tensor, and torch counts
        # float8 as floating: the fp8 buffers and their fp32 scales would be cast too (the
        # scales lossily). They only follow device moves; a dtype change becomes the new
        # compute_dtype (and the bias follows it), so the layer keeps matching its model.
        buffer_ids = {id(b) for b in self._buffers.values() if b is not None}
        new_dtype = []

        def keep_buffer_dtypes(t):
            out = fn(t)
            if id(t) in buffer_ids and out.dtype != t.dtype:
                new_dtype.append(out.dtype)
                out = t.to(device=out.device)
            return out

        super()._apply(keep_buffer_dtypes, recurse)
        if new_dtype and new_dtype[-1].is_floating_point and new_dtype[-1].itemsize >= 2:
            self.compute_dtype = new_dtype[-1]
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) → (..., N) in `compute_dtype`."""
        lead = x.shape[:-1]
        y = _Float8FrozenMatmul.apply(x.reshape(-1, self.in_features), self.weight_fp8,
                                      self.weight_scale, self.weight_t_fp8, self.weight_t_scale,
                                      self.compute_dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}, "
            f"weight=float8_e4m3fn row-wise, backward={self.backward}"
        )


def float8_supported() -> bool:
    """Whether this machine has FP8 tensor cores (CUDA compute capability ≥ 8.9: Ada, Hopper+).

    Returns:
        True when CUDA is available and device 0's capability is at least (8, 9).
    """
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def convert_base_layers_to_float8(model: torch.nn.Module, target_modules=None,
                                  backward: str = "fp8") -> int:
    """Swap the frozen base linear of every peft LoRA `Linear` for a `Float8FrozenLinear`.

    Only layers whose `base_layer` is a plain `nn.Linear` with in/out features multiples
    of 16 and no `fan_in_fan_out` are converted; lm_head, embeddings and modules without
    LoRA are left alone. The old weight is freed.

    Args:
        model: a peft model (or any module tree containing peft LoRA layers).
        target_modules: leaf names (the last part of the module name) of the LoRA layers
            to convert, e.g. ["gate_proj", "up_proj"]; None: every one that qualifies.
        backward: "fp8" or "dequantized" (`Float8FrozenLinear`).

    Returns:
        How many base layers were converted.

    Raises:
        ValueError: a LoRA layer uses DoRA (it reads `base_layer.weight`, which the FP8
            layer does not provide), or a name in target_modules is no LoRA layer's;
            nothing is converted then.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    candidates, lora_names = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLinear):
            continue
        lora_names.add(name.rsplit(".", 1)[-1])
        variants = getattr(module, "lora_variant", {}).values()
        if any(module.use_dora.values()) or any("Dora" in type(v).__name__ for v in variants):
            raise ValueError(
                f"training.fp8: LoRA layer {name!r} uses DoRA, which reads the base weight in "
                "its forward. Fix: turn DoRA off or leave FP8 off."
            )
        base = module.base_layer
        if target_modules is not None and name.rsplit(".", 1)[-1] not in target_modules:
            continue
        if (
            type(base) is torch.nn.Linear
            and base.in_features % _ALIGN == 0
            and base.out_features % _ALIGN == 0
            and not getattr(module, "fan_in_fan_out", False)
        ):
            candidates.append(module)
    unknown = sorted(set(target_modules or ()) - lora_names)
    if unknown:
        raise ValueError(
            f"training.fp8_target_modules: {unknown} name no LoRA layer of this model by its "
            f"leaf name (its LoRA layers: {sorted(lora_names)}). Fix: use those names, or "
            "null for all of them.")
    for module in candidates:
        old = module.base_layer
        module.base_layer = Float8FrozenLinear.from_linear(old, backward=backward)
        # Free the bf16 weight now, not whenever the last reference happens to go.
        old.weight = None
        old.bias = None
        del old
    return len(candidates)
