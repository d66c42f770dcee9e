"""keep_adapter_inputs_16bit (tasks.training.speed): with peft's input cast off, a bf16
base under autocast trains to the same loss and gradients, keeping fewer bytes for the
backward (one copy of a tensor that several LoRA layers read, none in float32)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def step(cast_off: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.training.speed import keep_adapter_inputs_16bit

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(cfg).to(torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                      init_lora_weights=False))
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    switched = keep_adapter_inputs_16bit(model) if cast_off else 0
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.data_ptr()] = t.numel() * t.element_size()
        return t

    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):   # as the Trainer runs a bf16 base
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return switched, loss.item(), grads, sum(saved.values())


def test_the_same_gradients_from_fewer_saved_bytes():
    _, loss, grads, saved = step(cast_off=False)
    switched, loss_off, grads_off, saved_off = step(cast_off=True)
    assert switched == 2 * 7
    assert loss_off == loss
    for name, grad in grads.items():
        assert torch.equal(grads_off[name], grad), name
    assert saved_off < 0.92 * saved, (saved_off, saved)
