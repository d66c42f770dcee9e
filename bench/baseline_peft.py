"""(Copied from the project's shared bench/baseline_peft.py so it travels to the GPU machine;
bench/train_throughput.py and bench/peer_unsloth.py import it. One addition, outside the timed
loop: after it, one more step reports the gradient norm, the trainable-parameter count and
whether checkpointing was on, so a row that does not train shows it (issue #14).)

Baseline: plain transformers + peft LoRA/QLoRA training throughput on one GPU.

The anchor a user would pick instead of the pipeline: random-initialised models of
real Llama shapes (no weights can be downloaded on the GPU machine), a manual
training loop over full-length sequences (no padding), bf16, fused AdamW.
Prints one JSON line per case: tokens/s, model TFLOP/s, MFU, peak memory.
"""
import gc
import json
import os
import sys
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=True, head_dim=64),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=False, head_dim=128),
}
PEAK = float(os.environ.get("PEAK_TFLOPS", "989"))  # H100 SXM dense bf16


def flops_per_token(cfg, seq):
    d, L, f, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = 2 * (d * d + 2 * d * kv + d * d) + 2 * 3 * d * f  # qkvo + mlp matmuls
    attn = 2 * 2 * seq * d  # QK^T and AV per token per layer (full, not causal-halved)
    fwd = L * (per_layer + attn) + 2 * d * V
    return 2 * fwd  # LoRA: backward computes activation grads only (~= forward)


def build(shape, quant, tmp):
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    if not quant:
        with torch.device("cuda"):
            torch.set_default_dtype(torch.bfloat16)
            m = LlamaForCausalLM(cfg)
            torch.set_default_dtype(torch.float32)
        return m, cfg, None
    path = os.path.join(tmp, shape)
    if not os.path.exists(path):
        with torch.device("cuda"):
            torch.set_default_dtype(torch.bfloat16)
            m = LlamaForCausalLM(cfg)
            torch.set_default_dtype(torch.float32)
        t = time.time(); m.save_pretrained(path); save_s = time.time() - t
        del m; gc.collect(); torch.cuda.empty_cache()
        print(json.dumps({"event": "saved", "shape": shape, "save_s": round(save_s, 1)}), flush=True)
    torch.cuda.reset_peak_memory_stats()
    t = time.time()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map={"": 0},
                                             dtype=torch.bfloat16, attn_implementation="sdpa")
    load_s = time.time() - t
    return m, cfg, load_s


def run(shape, quant, seq, bs, ckpt, liger, steps=8, warm=3, tmp=os.path.join(tempfile.gettempdir(), "bl")):
    torch.manual_seed(0)
    m, cfg, load_s = build(shape, quant, tmp)
    if liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        _apply_liger_kernel_to_instance(model=m)
    if quant:
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=ckpt,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    m = get_peft_model(m, lcfg)
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, fused=True)
    x = torch.randint(0, cfg.vocab_size, (bs, seq), device="cuda")
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warm + steps):
        t = time.time()
        out = m(input_ids=x, labels=x)
        out.loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.time() - t)
    # One more step, untimed: the gradient norm before the optimizer zeroes it.
    out = m(input_ids=x, labels=x)
    out.loss.backward()
    gnorm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in m.parameters()
                           if p.grad is not None)).item()
    ntrain = sum(p.numel() for p in m.parameters() if p.requires_grad)
    opt.zero_grad(set_to_none=True)
    step = sorted(times[warm:])[len(times[warm:]) // 2]
    tps = bs * seq / step
    tf = flops_per_token(cfg, seq) * tps / 1e12
    res = dict(shape=shape, quant="nf4" if quant else "bf16", seq=seq, bs=bs, grad_ckpt=ckpt, liger=liger,
               offload=False, grad_norm=round(gnorm, 4), trainable=ntrain,
               trains=bool(gnorm > 0 and gnorm == gnorm),
               step_s=round(step, 4), tokens_per_s=round(tps), model_tflops=round(tf, 1),
               mfu=round(tf / PEAK, 3), peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
               load_s=None if load_s is None else round(load_s, 1),
               loss=round(out.loss.item(), 3))
    print(json.dumps(res), flush=True)
    del m, opt, out, x; gc.collect(); torch.cuda.empty_cache()
    return res


if __name__ == "__main__":
    cases = [
        ("llama-1b", False, 2048, 8, False, False),
        ("llama-1b", False, 2048, 8, True, False),
        ("llama-1b", False, 2048, 8, False, True),
        ("llama-8b", False, 2048, 4, True, False),
        ("llama-8b", True, 2048, 4, True, False),
        ("llama-8b", True, 2048, 4, True, True),
    ]
    if os.environ.get("EXPLORE"):
        # Off-the-shelf levers on top of the baseline: Liger kernels, no checkpointing, batch size.
        cases = [
            ("llama-1b", False, 2048, 16, False, True),
            ("llama-8b", False, 2048, 2, False, True),
            ("llama-8b", False, 2048, 8, True, True),
            ("llama-8b", True, 2048, 2, False, True),
            ("llama-8b", True, 2048, 8, True, True),
        ]
    only = sys.argv[1:]
    for c in cases:
        tag = f"{c[0]}-{'q' if c[1] else 'b'}-{'ck' if c[4] else 'nock'}-{'lig' if c[5] else 'nolig'}"
        if only and tag not in only:
            continue
        try:
            run(*c)
        except Exception as e:  # keep going: one failing case must not hide the rest
            print(json.dumps({"case": tag, "error": repr(e)[:500]}), flush=True)
            gc.collect(); torch.cuda.empty_cache()
