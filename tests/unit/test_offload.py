"""Offloaded activation checkpointing (tasks.training.offload): the gradients equal those
of training without checkpointing — LoRA dropout included, whose masks the recomputation
must draw again — each offloaded layer runs its forward twice, and the layer inputs wait
outside the autograd graph (the CPU copy on a CPU run)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def tiny_lora_llama(seed: int = 0, dropout: float = 0.3):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                             target_modules="all-linear", init_lora_weights=False))
    model.train()
    return model


def lora_grads(model, ids, autocast: bool = False) -> dict:
    torch.manual_seed(123)  # the dropout masks
    # The Trainer runs the forward under autocast and the backward outside it.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_recomputation_runs_under_the_forward_s_autocast():
    """A bf16 base whose LoRA layers take their 16-bit input as it is (the Trainer's
    autocast casts the float32 adapter weights): the recomputation in the backward, which
    runs outside the forward's autocast, must enter it again or the matmuls mix dtypes."""
    from tasks.training.offload import offload_checkpointed_layers
    from tasks.training.speed import keep_adapter_inputs_16bit

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for offload in (False, True):
        model = tiny_lora_llama().to(torch.bfloat16)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()   # peft's float32 adapter on a 16-bit base
        keep_adapter_inputs_16bit(model)
        if offload:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            assert offload_checkpointed_layers(model) == 3
        grads.append(lora_grads(model, ids, autocast=True))
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_offloaded_checkpointing_gives_the_gradients_of_no_checkpointing():
    from tasks.training.offload import offload_checkpointed_layers, offloading_layers

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    plain = lora_grads(tiny_lora_llama(), ids)

    model = tiny_lora_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = model.base_model.model.model.layers
    layers[2].gradient_checkpointing = False          # as partial checkpointing leaves it
    assert offload_checkpointed_layers(model) == 2 and offloading_layers(model) == 0
    calls = []
    for i, layer in enumerate(layers):
        layer.self_attn.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    offloaded = lora_grads(model, ids)

    assert calls.count(0) == calls.count(1) == 2 and calls.count(2) == 1  # recomputed
    assert offloading_layers(model) == 2
    assert plain.keys() == offloaded.keys() and len(plain) == 3 * 7 * 2
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(offloaded[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_second_micro_batch_links_its_own_layers_only():
    """Gradient accumulation: the layer chain of one forward pass never reaches into the
    previous pass (each backward prefetches only its own pass's earlier layer)."""
    from tasks.training import offload

    model = tiny_lora_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    offload.offload_checkpointed_layers(model)
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    first_last = offload._LAST
    model(input_ids=ids, labels=ids).loss.backward()
    chain, saved = [], offload._LAST
    while saved is not None:
        chain.append(saved.index)
        assert saved is not first_last and saved.host is None and saved.device_copy is None
        saved = saved.previous
    assert chain == [2, 1, 0]


def test_compiled_layers_that_checkpoint_inside_their_forward_fall_back_to_torch_s():
    """transformers 5.2x checkpoints inside the layer's (compiled) forward: there the
    offloaded path would recompute outside the compiled code, drawing other dropout
    masks (gradients off by 0.24 on this model when it did); torch's checkpoint runs
    instead and the gradients are those of the same compiled model without it."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from tasks.training.offload import offload_checkpointed_layers, offloading_layers

    if "__call__" in vars(GradientCheckpointingLayer):
        pytest.skip("this transformers checkpoints around the layer's call, outside it")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointed in (False, True):
        model = tiny_lora_llama()
        if checkpointed:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            offload_checkpointed_layers(model)
        for layer in model.base_model.model.model.layers:
            layer.compile()
        grads.append(lora_grads(model, ids))
    assert offloading_layers(model) == 0
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-3, atol=1e-5, msg=name)
