"""Frozen 4-bit base linears (tasks/training/linear4bit.py) on CPU: the same numbers as
bitsandbytes' own path, what the backward saves, one compiled graph, peft's swap."""
from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from tasks.training.linear4bit import Frozen4bitLinear, convert_4bit_base_layers  # noqa: E402

pytestmark = pytest.mark.bitsandbytes

K, N = 64, 128


def _bnb_linear(n=N, k=K, quant_type="nf4", double_quant=True, bias=False,
                compute_dtype=torch.float32, seed=0):
    """A bnb Linear4bit quantized on the CPU, the way bnb quantizes on `.to(device)`."""
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(torch.randn(n, k), requires_grad=False,
                                     quant_type=quant_type, compress_statistics=double_quant,
                                     module=layer).to("cpu")
    if bias:
        layer.bias.data.normal_()
        layer.bias.requires_grad_(False)
    return layer


class _Two(torch.nn.Module):
    """Two 4-bit linears with a nonlinearity between: K → N → K."""

    def __init__(self, seed=0, **kw):
        super().__init__()
        self.up = _bnb_linear(N, K, seed=seed, **kw)
        self.down = _bnb_linear(K, N, seed=seed + 1, **kw)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _lora(module, **lora_kw):
    from peft import LoraConfig, get_peft_model

    module.is_loaded_in_4bit = True  # what transformers sets: peft then picks its Linear4bit
    cfg = dict(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
    cfg.update(lora_kw)
    torch.manual_seed(123)  # the same LoRA init on both models
    return get_peft_model(module, LoraConfig(**cfg))


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _run(model, x, g):
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(g)
    return y.detach(), x.grad, _lora_grads(model)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_outputs_and_gradients_equal_bnb_bit_for_bit(quant_type, double_quant, bias):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model = _lora(_Two(quant_type=quant_type, double_quant=double_quant, bias=bias))
    x = torch.randn(2, 5, K)
    g = torch.randn(2, 5, K)
    y0, gx0, grads0 = _run(model, x, g)

    assert convert_4bit_base_layers(model) == 2
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(lora_layers) == 2
    assert all(type(m.base_layer) is Frozen4bitLinear for m in lora_layers)
    y1, gx1, grads1 = _run(model, x, g)

    # Same ops, same arguments, same order as bnb's MatMul4Bit: exact equality.
    assert torch.equal(y0, y1)
    assert torch.equal(gx0, gx1)
    assert grads0.keys() == grads1.keys() and len(grads0) == 4  # lora_A/B of up and down
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name


def test_compute_dtype_bf16_with_fp32_input_and_trainable_bias_match_bnb():
    """bnb casts the input to its compute dtype and the output back; a bias that trains
    (peft bias="all") gets bnb's gradient."""
    model = _lora(_Two(bias=True, compute_dtype=torch.bfloat16), bias="all")
    x = torch.randn(3, 4, K)
    g = torch.randn(3, 4, K)
    y0, gx0, grads0 = _run(model, x, g)
    assert y0.dtype == torch.float32
    assert convert_4bit_base_layers(model) == 2
    y1, gx1, grads1 = _run(model, x, g)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert any(n.endswith("base_layer.bias") for n in grads1)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name


def test_shares_the_bnb_tensors_without_copying():
    layer = _bnb_linear(bias=True)
    qs = layer.weight.quant_state
    new = Frozen4bitLinear.from_bnb(layer)
    assert new.weight_packed.data_ptr() == layer.weight.data_ptr()
    assert type(new.weight_packed) is torch.Tensor  # not the Params4bit subclass
    assert new.absmax is qs.absmax and new.code is qs.code
    assert new.nested_absmax is qs.state2.absmax and new.nested_code is qs.state2.code
    assert new.offset is qs.offset
    assert new.bias is layer.bias
    assert (new.blocksize, new.nested_blocksize, new.quant_type, new.weight_dtype) == (
        qs.blocksize, qs.state2.blocksize, qs.quant_type, qs.dtype)
    assert not list(new.parameters()) or all(not p.requires_grad for p in new.parameters())
    # A dtype cast of the model moves nothing in the quantized tensors (as in bnb).
    new.to(torch.bfloat16)
    assert new.absmax.dtype == torch.uint8 and new.nested_absmax.dtype == torch.float32
    assert new.weight_packed.dtype == torch.uint8 and new.bias.dtype == torch.bfloat16


def test_backward_saves_only_the_4bit_weight_tensors():
    """Nothing the size of the input or of the dequantized weight waits for the backward."""
    new = Frozen4bitLinear.from_bnb(_bnb_linear(bias=True))
    x = torch.randn(4, 32, K, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = new(x)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    buffers = {b.data_ptr() for b in new.buffers()}
    assert saved, "the op saves the weight tensors through save_for_backward"
    assert {t.data_ptr() for t in saved} <= buffers
    # The largest is the packed weight: N·K/2 bytes, an eighth of the float32 weight.
    assert max(t.numel() * t.element_size() for t in saved) == N * K // 2
    assert not any(t.shape in (x.shape, (N, K)) for t in saved)


def test_compiled_fullgraph_two_lora_layers_forward_backward_match_eager():
    """fullgraph=True fails on any graph break: the converted LoRA layers trace as one graph
    (aot_eager: AOTAutograd's forward/backward split, without inductor's codegen)."""
    model = _lora(_Two())
    assert convert_4bit_base_layers(model) == 2
    x = torch.randn(2, 6, K)
    g = torch.randn(2, 6, K)
    y0, gx0, grads0 = _run(model, x, g)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y1, gx1, grads1 = _run(compiled, x, g)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name.replace("_orig_mod.", "")]), name


def test_compiled_layers_share_one_graph():
    """Each decoder layer is compiled on its own (regional compilation): layers alike in
    shape must reuse one graph, not recompile on their own quantization constants."""
    from torch._dynamo.testing import CompileCounterWithBackend

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(_Two(seed=2 * i) for i in range(3))

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return x

    model = _lora(Stack())
    assert convert_4bit_base_layers(model) == 6
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    blocks = list(model.base_model.model.layers)
    for block in blocks:
        block.compile(backend=counter, fullgraph=True)
    x = torch.randn(2, 3, K, requires_grad=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        model(x).sum().backward()
    assert counter.frame_count == 1
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_tiny_llama_loaded_in_4bit_same_loss_and_lora_grads(tmp_path):
    """transformers loads a tiny Llama in nf4 + double quant on the CPU; peft all-linear;
    the converted model's loss and every LoRA gradient equal the unconverted one's."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=32)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant,
                                            device_map="cpu", dtype=torch.float32)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False))
    lora_4bit = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(lora_4bit) == 2 * 7  # peft's all-linear: every projection, not lm_head
    ids = torch.randint(0, 96, (2, 12))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), _lora_grads(model)

    loss0, grads0 = loss_and_grads()
    assert convert_4bit_base_layers(model) == 14
    assert all(type(m.base_layer) is Frozen4bitLinear for m in lora_4bit)
    assert type(model.base_model.model.lm_head) is torch.nn.Linear  # left alone
    loss1, grads1 = loss_and_grads()
    assert torch.equal(loss0, loss1)
    assert len(grads0) == 28 and grads0.keys() == grads1.keys()
    for name in grads0:
        assert grads0[name].abs().sum() > 0, name
        assert torch.equal(grads0[name], grads1[name]), name


def test_dora_is_refused_and_nothing_converted():
    model = _lora(_Two(), use_dora=True)
    with pytest.raises(ValueError, match=r"training: .*DoRA.*Fix:"):
        convert_4bit_base_layers(model)
    assert not any(isinstance(m, Frozen4bitLinear) for m in model.modules())


def test_only_lora_wrapped_4bit_layers_are_converted():
    model = _lora(_Two(), target_modules=["up"])
    assert convert_4bit_base_layers(model) == 1
    inner = model.base_model.model
    assert type(inner.up.base_layer) is Frozen4bitLinear
    assert type(inner.down) is bnb.nn.Linear4bit  # not LoRA-wrapped: untouched
    assert convert_4bit_base_layers(model) == 0  # already converted


def test_weight_repacked_for_cpu_inference_is_refused():
    """bnb repacks a 4-bit weight for CPU inference at a no-grad eval forward (AVX512-BF16
    CPUs); that layout has no backward, so conversion says so instead of computing wrong."""
    layer = _bnb_linear()
    layer.weight.quant_state.packing_format_for_cpu = True  # what bnb's repacking sets
    with pytest.raises(ValueError, match="CPU inference layout.*Fix:"):
        Frozen4bitLinear.from_bnb(layer)
