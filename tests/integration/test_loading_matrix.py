"""Every loading option that trains on CPU, through the pipeline's own code: the tiny
seeded Llama loaded by tasks.training.modeling (dtype, attention, bitsandbytes int8 / 4-bit,
device_map cpu), LoRA injected, trained by tasks.training.run.build_trainer's Trainer. Each case
asserts that every adapter tensor changed, the loss fell, and the saved adapter reloads
on a freshly loaded base with identical outputs.

And the CPU 4-bit hazard (../shared/NOTES.md): bitsandbytes repacks 4-bit weights for its
CPU inference kernel on an eval-mode no-grad forward, after which gradients are wrong;
load_base_model turns the repacking off.
"""
from __future__ import annotations

import pytest

from profiles.loader import load_profile

CASES = {
    "float32-sdpa": [],
    "bfloat16": ["model.dtype=bfloat16"],
    "float16": ["model.dtype=float16"],
    "eager": ["model.attn_implementation=eager"],
    "device_map-cpu": ["model.device_map=cpu"],
    "int8": ["quantization.mode=int8"],
    "nf4": ["quantization.mode=nf4", "quantization.compute_dtype=float32"],
    "fp4-double-bf16": ["model.dtype=bfloat16", "quantization.mode=fp4",
                        "quantization.double_quant=true", "quantization.compute_dtype=bfloat16"],
    "fp4-bf16-upcast": ["model.dtype=bfloat16", "quantization.mode=fp4",
                        "quantization.upcast_non_quantized=true"],
    # Speed levers (issue #7) that run on CPU: packing, checkpointing only some layers.
    "packing": ["training.packing=true", "data.max_length=128"],
    "checkpoint-first-layer": ["training.gradient_checkpointing=true",
                               "training.checkpoint_layers=1"],
    "torch-compile": ["training.torch_compile=true"],
}


def _profile(sets):
    return load_profile("quickstart", [*sets, "training.max_steps=12",
                                       "training.per_device_batch_size=8",
                                       "training.logging_steps=1", "data.eval_split=0",
                                       "training.save_steps=100"])


@pytest.mark.parametrize("case", list(CASES))
def test_each_cpu_loading_option_trains_and_reloads(case, tiny_llama_dir, pattern_dataset, tmp_path):
    import torch
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoTokenizer, set_seed

    from tasks.training.modeling import inject_adapter, load_base_model
    from tasks.training.run import build_trainer

    profile = _profile(CASES[case])
    set_seed(0)
    base = load_base_model(profile.model, profile.quantization, str(tiny_llama_dir))
    model = inject_adapter(base, profile.lora, profile.quantization, False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer, _ = build_trainer(profile, model, AutoTokenizer.from_pretrained(str(tiny_llama_dir)),
                               pattern_dataset, tmp_path / "run")
    trainer.train()
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None)]
    assert len(compiled) == (2 if case == "torch-compile" else 0)  # both decoder layers

    unchanged = [n for n, p in model.named_parameters()
                 if p.requires_grad and torch.equal(p.detach(), before[n])]
    assert len(before) == 2 * 7 * 2 and unchanged == []      # A and B of 7 modules × 2 layers
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.95 * losses[0], losses

    model.save_pretrained(str(tmp_path / "adapter"), safe_serialization=True)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    # With bf16/fp16 the Trainer (accelerate) wraps forward in autocast; compare the
    # model as a user holds it, not the wrapper.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits.float()
    fresh = load_base_model(profile.model, profile.quantization, str(tiny_llama_dir))
    if profile.quantization.mode != "none" and profile.quantization.upcast_non_quantized:
        # As training had it: peft's k-bit preparation upcasts the unquantized weights.
        fresh = prepare_model_for_kbit_training(fresh, use_gradient_checkpointing=False)
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    reloaded.eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits.float()
    if case == "torch-compile":  # inductor's fused kernels round differently from eager
        torch.testing.assert_close(trained, again, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(trained, again), (trained - again).abs().max()
    with torch.no_grad(), reloaded.disable_adapter():
        bare = reloaded(input_ids=ids).logits.float()
    assert (again - bare).abs().max() > 1e-3                  # the adapter does something


def _grads_after_eval_forward(model, ids):
    """LoRA gradients of one training batch, before and after an eval-mode no-grad forward."""
    import torch

    def grads():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    first = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    second = grads()
    return [n for n in first if not torch.allclose(first[n], second[n], atol=1e-6)]


def test_cpu_4bit_eval_forward_leaves_gradients_alone(tiny_llama_dir):
    import bitsandbytes as bnb
    import torch

    from tasks.training.modeling import inject_adapter, load_base_model

    profile = _profile(["quantization.mode=nf4", "quantization.compute_dtype=float32"])
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]] * 2)

    def build():
        torch.manual_seed(0)
        base = load_base_model(profile.model, profile.quantization, str(tiny_llama_dir))
        model = inject_adapter(base, profile.lora, profile.quantization, False)
        for n, p in model.named_parameters():   # non-zero B, so every tensor gets gradient
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        return model

    model = build()
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and not any(m.support_avx512bf16_for_cpu for m in linears)
    assert _grads_after_eval_forward(model, ids) == []

    # The hazard is real: with bitsandbytes' CPU repacking on (what an AVX512-BF16 CPU
    # gets by default), the same eval forward changes every gradient afterwards.
    exposed = build()
    for m in exposed.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True
    assert len(_grads_after_eval_forward(exposed, ids)) > 0
