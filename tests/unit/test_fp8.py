"""FP8 frozen-base linears (tasks/training/fp8.py) on CPU: numerics, saved tensors, peft swap."""
from __future__ import annotations

import pytest
import torch

from tasks.training.fp8 import Float8FrozenLinear, convert_base_layers_to_float8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _linear(k=128, n=64, bias=True):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=bias, dtype=torch.bfloat16)
    lin.requires_grad_(False)
    return lin


def test_forward_matches_bf16_linear_within_e4m3_precision():
    lin = _linear()
    fp8 = Float8FrozenLinear.from_linear(lin)
    x = torch.randn(3, 7, 128, dtype=torch.bfloat16)  # M = 21: exercises the row padding
    y = fp8(x)
    assert y.shape == (3, 7, 64) and y.dtype == torch.bfloat16
    err = _rel(y, lin(x))
    print(f"forward rel err {err:.4f}")
    assert 0 < err < 0.06
    assert not list(fp8.parameters(recurse=False)) or all(not p.requires_grad for p in fp8.parameters())


def test_backward_grad_x_matches_and_saves_nothing_input_sized():
    lin = _linear()
    fp8 = Float8FrozenLinear.from_linear(lin)
    x = torch.randn(4, 32, 128, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(4, 32, 64, dtype=torch.bfloat16)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = fp8(x)
    y.backward(g)
    assert saved and max(saved) < x.numel(), saved

    x_ref = x.detach().clone().requires_grad_(True)
    lin(x_ref).backward(g)
    err = _rel(x.grad, x_ref.grad)
    print(f"backward rel err {err:.4f}")
    assert 0 < err < 0.08
    assert all(b.grad is None for b in fp8.buffers()) and fp8.bias.grad is None


def _tiny_lora_llama(use_dora=False, odd=False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=120 if odd else 128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=256, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, use_dora=use_dora)
    return get_peft_model(model, lora)


def test_convert_swaps_all_lora_bases_and_lora_still_trains():
    from peft.tuners.lora.layer import Linear as LoraLinear

    model = _tiny_lora_llama()
    lm_head = model.get_output_embeddings()
    n_lora = sum(isinstance(m, LoraLinear) for m in model.modules())  # peft's own matching
    assert n_lora == 14
    assert convert_base_layers_to_float8(model) == 14
    assert all(isinstance(m.base_layer, Float8FrozenLinear) for m in model.modules() if isinstance(m, LoraLinear))
    assert type(model.get_output_embeddings()) is torch.nn.Linear and model.get_output_embeddings() is lm_head

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print("losses", [round(v, 3) for v in losses])
    assert losses[-1] < losses[0] * 0.9
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, trainable[n]), n


def test_dora_is_refused():
    model = _tiny_lora_llama(use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        convert_base_layers_to_float8(model)


def test_layers_not_multiple_of_16_stay_plain_linear():
    from peft.tuners.lora.layer import Linear as LoraLinear

    model = _tiny_lora_llama(odd=True)  # intermediate 120: gate/up out 120, down in 120
    assert convert_base_layers_to_float8(model) == 2 * 4
    mlp = model.base_model.model.model.layers[0].mlp
    for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        assert isinstance(proj, LoraLinear) and type(proj.base_layer) is torch.nn.Linear
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, Float8FrozenLinear)


@pytest.mark.parametrize("backward", ["fp8", "dequantized"])
def test_dtype_cast_keeps_fp8_buffers_and_compile_traces_one_graph(backward):
    lin = torch.nn.Linear(128, 64, dtype=torch.float32).requires_grad_(False)
    fp8 = Float8FrozenLinear.from_linear(lin, backward=backward)
    fp8.to(torch.bfloat16)  # as model.to(dtype) does: torch counts float8 as floating point
    assert fp8.weight_fp8.dtype == torch.float8_e4m3fn and fp8.weight_scale.dtype == torch.float32
    assert fp8.compute_dtype == torch.bfloat16 and fp8.bias.dtype == torch.bfloat16

    x = torch.randn(2, 9, 128, dtype=torch.bfloat16, requires_grad=True)
    y_eager = fp8(x)
    y_eager.sum().backward()
    g_eager, x.grad = x.grad.clone(), None
    y = torch.compile(fp8, backend="aot_eager", fullgraph=True)(x)  # dynamo traces the Function
    y.sum().backward()
    assert torch.equal(y, y_eager) and torch.equal(x.grad, g_eager)


def test_dequantized_backward_keeps_one_fp8_copy_and_the_gradient_in_16_bits():
    lin = _linear()
    fp8 = Float8FrozenLinear.from_linear(lin, backward="dequantized")
    both = Float8FrozenLinear.from_linear(lin)
    nbytes = lambda m: sum(b.numel() * b.element_size() for b in m.buffers())  # noqa: E731
    assert fp8.weight_t_fp8 is None and fp8.weight_t_scale is None
    assert nbytes(fp8) < 0.6 * nbytes(both)  # one e4m3 copy of (N, K) instead of two

    x = torch.randn(4, 32, 128, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(4, 32, 64, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = fp8(x)
    assert torch.equal(y, both(x.detach()))  # the same fp8 forward
    y.backward(g)
    assert saved and max(saved) < x.numel(), saved
    # ∂x is the 16-bit gradient times the dequantized weight: exactly, not within FP8 noise.
    dequantized = (fp8.weight_fp8.float() * fp8.weight_scale.view(-1, 1)).to(torch.bfloat16)
    assert torch.equal(x.grad, g @ dequantized)
    x_ref = x.detach().clone().requires_grad_(True)
    lin(x_ref).backward(g)
    assert _rel(x.grad, x_ref.grad) < 0.06


def test_target_modules_pick_the_layers_and_unknown_names_are_refused():
    from peft.tuners.lora.layer import Linear as LoraLinear

    model = _tiny_lora_llama()
    mlp = ["gate_proj", "up_proj", "down_proj"]
    assert convert_base_layers_to_float8(model, mlp, backward="dequantized") == 2 * 3
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            in_mlp = name.rsplit(".", 1)[-1] in mlp
            assert isinstance(module.base_layer, Float8FrozenLinear) == in_mlp, name

    model = _tiny_lora_llama()
    with pytest.raises(ValueError, match=r"fp8_target_modules: \['gate'\].*gate_proj"):
        convert_base_layers_to_float8(model, ["gate", "up_proj"])
    assert not any(isinstance(m, Float8FrozenLinear) for m in model.modules())  # nothing converted
