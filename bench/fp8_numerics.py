"""Which part of the FP8 recipe moves the loss? A CPU study for issue #14.

On the H200, `training.fp8: true` (tasks/training/fp8.py) trained the learnable task with a
mean relative loss difference of 3.84% against the bf16 baseline (the bound is 2%). This
script trains a small random Llama with LoRA on the same task (localhub.seed_data's
alphabet rows) once per variant of the recipe, on CPU (torch runs row-wise
`torch._scaled_mm` there), and prints per variant the mean / max relative loss difference
against the bf16 run over the steps where the bf16 loss is above 0.1 (issue #14's measure),
the final-loss ratio, and the relative error of one forward (logits) and one input
gradient (∂ inputs_embeds) against bf16 on a random batch.

Variants (`VARIANTS`; each name = forward / backward ∂x recipe of every LoRA base linear):
- `bf16`: plain nn.Linear (the reference).
- `fp32-base`: the base matmuls in fp32 — a *benign* precision change, the noise floor of
  how far the 50-step trajectory moves from any perturbation.
- `fp8-committed`: tasks.training.fp8.convert_base_layers_to_float8, unchanged;
  `fp8-committed-dq` with `backward="dequantized"`, `fp8-committed-mlp-dq` also with the MLP
  projections only, `fp8-committed-gu-dq` with gate_proj/up_proj only (the recipes of
  training.fp8_backward / fp8_target_modules; gu-dq is the README's recommended one).
- `fp8-copy`: this script's copy of the committed recipe (checks the copy matches it).
- `fp8fwd-bf16bwd`: fp8 forward; ∂x = grad (bf16, not quantized) · W dequantized (bf16).
- `fp8fwd-e5m2bwd`: fp8 forward; incoming gradients quantized row-wise to e5m2 (max 57344).
- `fp8-consistent-w`: as committed, but ∂x uses the forward's (row-wise) quantized weight,
  so forward and backward see the same weight (emulated in fp32 on CPU).
- `fp8-mlp-only`: the committed recipe on gate/up/down only; attention projections bf16.
- `wq-only`: weights quantized to e4m3 (row-wise) and dequantized, bf16 matmuls, nothing
  else quantized — the share of the error that the frozen weight's rounding alone causes.
- `bf16fwd-fp8bwd`: bf16 forward; committed fp8 backward (the ∂x share alone).
- `fp8-wtensor`: the committed recipe with one per-tensor weight scale (both orientations)
  instead of row-wise scales.

Why our own Functions: the committed module is one fixed recipe; the variants swap one of
its pieces at a time, so each is a small copy of `_Float8FrozenMatmul` (the committed file
is not edited).

Run (repo root; ~2 cores):
    .venv/bin/python bench/fp8_numerics.py [--hidden 256] [--only a,b] [--steps 50]

CPU and a tiny shape only indicate what the 1B run on the H200 will do.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from localhub.seed_data import alphabet_rows  # noqa: E402
from tasks.training import fp8 as committed  # noqa: E402

E4M3_MAX = 448.0
E5M2_MAX = 57344.0
MLP = ("gate_proj", "up_proj", "down_proj")


def quantize_rows(t: torch.Tensor, dtype=torch.float8_e4m3fn, fmax=E4M3_MAX):
    """Row-wise quantization (as committed `_quantize_rows`, dtype and max as arguments)."""
    t32 = t.float()
    scale = t32.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / fmax
    return (t32 / scale).clamp(-fmax, fmax).to(dtype), scale


def quantize_tensor(t: torch.Tensor):
    """One scale for the whole tensor, broadcast to a per-row column for `_scaled_mm`."""
    t32 = t.float()
    scale = t32.abs().amax().clamp(min=1e-12) / E4M3_MAX
    q = (t32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale.expand(t.shape[0], 1).contiguous()


def scaled_matmul(a, b_q, b_scale, out_dtype, a_dtype=torch.float8_e4m3fn, a_max=E4M3_MAX):
    """a (M, K) → quantize rows → a_q · b_qᵀ (M, N); b_q (N, K) with scale (N, 1)."""
    a_q, a_scale = quantize_rows(a, a_dtype, a_max)
    return torch._scaled_mm(a_q, b_q.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1),
                            out_dtype=out_dtype)


class VariantMatmul(torch.autograd.Function):
    """y = x · Wᵀ with W frozen; `layer.fwd` / `layer.bwd` pick each matmul's recipe."""

    @staticmethod
    def forward(ctx, x2d, layer):
        with torch.autocast("cpu", enabled=False):  # "fp32" must not be cast back to bf16
            return VariantMatmul._forward(ctx, x2d, layer)

    @staticmethod
    def _forward(ctx, x2d, layer):
        ctx.layer = layer
        dt = layer.compute_dtype
        if layer.fwd == "bf16":
            return (x2d.to(dt) @ layer.w.t()).to(dt)
        if layer.fwd == "fp32":
            return (x2d.float() @ layer.w.float().t()).to(dt)
        if layer.fwd == "wq":  # dequantized weight, activations untouched
            return (x2d.to(dt) @ layer.w_dq.t()).to(dt)
        if layer.fwd == "fp8":
            return scaled_matmul(x2d, layer.w_q, layer.w_scale, dt)
        raise ValueError(layer.fwd)

    @staticmethod
    def backward(ctx, g):
        with torch.autocast("cpu", enabled=False):
            return VariantMatmul._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        layer = ctx.layer
        dt = layer.compute_dtype
        if layer.bwd == "bf16":
            gx = g.to(dt) @ layer.w
        elif layer.bwd == "fp32":
            gx = g.float() @ layer.w.float()
        elif layer.bwd == "wq":  # grad not quantized, weight dequantized
            gx = g.to(dt) @ layer.w_dq
        elif layer.bwd == "fp8":
            gx = scaled_matmul(g, layer.wt_q, layer.wt_scale, dt)
        elif layer.bwd == "e5m2":
            # e5m2 gradient × e4m3 weight, the pairing _scaled_mm takes on Hopper. CPU's
            # _scaled_mm runs this mixed pair ~10× slower than e4m3 × e4m3, so it is emulated:
            # both operands dequantized exactly to fp32, one fp32 matmul (what _scaled_mm
            # computes, up to the order of the fp32 accumulation), one rounding to bf16.
            g_q, g_s = quantize_rows(g, torch.float8_e5m2, E5M2_MAX)
            gx = (g_q.float() * g_s) @ (layer.wt_q.float() * layer.wt_scale).t()
        elif layer.bwd == "e4m3-wdq":
            # The gradient quantized as committed, but multiplied by the *forward's* weight
            # (row-wise e4m3, dequantized): the backward is then the exact gradient of the
            # forward's weight. _scaled_mm cannot take this (the weight's scale runs along the
            # contraction), so it is emulated in fp32 as above.
            g_q, g_s = quantize_rows(g)
            gx = (g_q.float() * g_s) @ layer.w_dq.float()
        else:
            raise ValueError(layer.bwd)
        return gx.to(dt), None


class VariantLinear(torch.nn.Module):
    """A frozen linear whose two matmuls follow `fwd` / `bwd` (see `VariantMatmul`)."""

    def __init__(self, linear: torch.nn.Linear, fwd: str, bwd: str, per_tensor: bool = False):
        super().__init__()
        w = linear.weight.detach()
        self.compute_dtype = w.dtype
        self.fwd, self.bwd = fwd, bwd
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.w = w
        quant = quantize_tensor if per_tensor else quantize_rows
        self.w_q, self.w_scale = quant(w)
        self.wt_q, self.wt_scale = quant(w.t().contiguous())
        self.w_dq = (self.w_q.float() * self.w_scale).to(w.dtype)

    def forward(self, x):
        lead = x.shape[:-1]
        y = VariantMatmul.apply(x.reshape(-1, self.in_features), self)
        return y.reshape(*lead, self.out_features)


# name → (fwd, bwd, which base layers, per-tensor weight scale); None = use the committed module
VARIANTS = {
    "bf16": ("bf16", "bf16", "all", False),
    "fp32-base": ("fp32", "fp32", "all", False),
    "fp8-committed": None,
    # the committed module with its recipe options (training.fp8_target_modules / fp8_backward)
    "fp8-committed-dq": None,
    "fp8-committed-mlp-dq": None,
    "fp8-committed-gu-dq": None,
    "fp8-copy": ("fp8", "fp8", "all", False),
    "fp8fwd-bf16bwd": ("fp8", "wq", "all", False),
    "fp8fwd-e5m2bwd": ("fp8", "e5m2", "all", False),
    "fp8-consistent-w": ("fp8", "e4m3-wdq", "all", False),
    "fp8-mlp-only": ("fp8", "fp8", "mlp", False),
    "wq-only": ("wq", "wq", "all", False),
    "bf16fwd-fp8bwd": ("bf16", "fp8", "all", False),
    "fp8-wtensor": ("fp8", "fp8", "all", True),
}


def build(args, state, variant):
    """The random model (shared weights), LoRA (seeded: same init every variant), converted."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers import LlamaForCausalLM, set_seed

    cfg = config(args)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.load_state_dict(state)
    set_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    spec = VARIANTS[variant]
    if spec is None:
        targets = (list(MLP) if "-mlp" in variant else ["gate_proj", "up_proj"]
                   if "-gu" in variant else None)
        n = committed.convert_base_layers_to_float8(
            model, targets,
            "dequantized" if variant.endswith("-dq") else "fp8")
    else:
        fwd, bwd, which, per_tensor = spec
        n = 0
        for name, mod in model.named_modules():
            if isinstance(mod, LoraLinear) and (which == "all" or name.endswith(MLP)):
                mod.base_layer = VariantLinear(mod.base_layer, fwd, bwd, per_tensor)
                n += 1
    model.train()
    return model, n


def config(args):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                       vocab_size=512, tie_word_embeddings=True, max_position_embeddings=1024)


def one_pass(model, ids, embeds):
    """Logits and ∂ inputs_embeds of a mean-square-of-logits objective on a random batch."""
    e = embeds.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(inputs_embeds=e).logits.float()
    # A fixed random direction: ∂x flows through every base layer's backward.
    torch.manual_seed(1)
    direction = torch.randn_like(logits)
    (logits * direction).sum().backward()
    model.zero_grad(set_to_none=True)
    return logits.detach(), e.grad.detach().float()


def train(model, ids, steps, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0, help="model weights, LoRA init and data")
    p.add_argument("--only", default="", help="comma-separated variant names (bf16 always runs)")
    args = p.parse_args()
    torch.set_num_threads(2)
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.bfloat16)
    state = LlamaForCausalLM(config(args)).state_dict()
    torch.set_default_dtype(torch.float32)
    ids = torch.tensor(alphabet_rows(args.rows, args.seq, seed=args.seed, first_id=100))
    g = torch.Generator().manual_seed(2)
    embeds = (torch.randn(2, args.seq, args.hidden, generator=g) * 0.02).to(torch.bfloat16)

    only = [v for v in args.only.split(",") if v]
    names = ["bf16"] + [v for v in VARIANTS if v != "bf16" and (not only or v in only)]
    print(f"shape: hidden {args.hidden}, layers {args.layers}, {args.rows}×{args.seq} tokens, "
          f"{args.steps} steps, lr {args.lr}, seed {args.seed}; torch {torch.__version__}", flush=True)
    ref = None
    rows = []
    for name in names:
        t0 = time.time()
        model, n = build(args, state, name)
        init = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        logits, gx = one_pass(model, ids, embeds)
        losses = train(model, ids, args.steps, args.lr)
        if ref is None:
            ref = {"losses": losses, "logits": logits, "gx": gx, "init": init}
        same_init = all(torch.equal(v, ref["init"][k]) for k, v in init.items())
        a, b = ref["losses"], losses
        r = [abs(x - y) / abs(x) for x, y in zip(a, b) if x > 0.1]
        row = dict(variant=name, converted=n, same_init=same_init,
                   fwd_rel=rel(logits, ref["logits"]), dx_rel=rel(gx, ref["gx"]),
                   steps=len(r), mean=sum(r) / len(r) if r else math.nan,
                   max=max(r) if r else math.nan, final=b[-1] / a[-1] if a[-1] else math.nan,
                   first_last=(b[0], b[-1]), secs=time.time() - t0)
        rows.append(row)
        print(f"{name:16s} conv={n:3d} init={'same' if same_init else 'DIFF'} "
              f"fwd={row['fwd_rel']:.4f} dx={row['dx_rel']:.4f} "
              f"mean={100 * row['mean']:.2f}% max={100 * row['max']:.1f}% "
              f"final×{row['final']:.3f} loss {b[0]:.4f}→{b[-1]:.5f} ({row['secs']:.0f}s)",
              flush=True)
        if name == "bf16":
            print("  bf16 losses:", " ".join(f"{x:.4f}" for x in losses), flush=True)
        del model
    print("\n| variant | fwd rel err | ∂x rel err | mean rel loss diff | max | final ratio |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['fwd_rel']:.4f} | {row['dx_rel']:.4f} | "
              f"{100 * row['mean']:.2f}% | {100 * row['max']:.1f}% | {row['final']:.3f} |")
    print(f"(steps where the bf16 loss > 0.1: {rows[0]['steps']})")


if __name__ == "__main__":
    main()
