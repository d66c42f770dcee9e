"""On a CUDA GPU: every quantization mode loads as the profile says (module types, quant
type, double quant, storage dtype, memory), attention implementations agree, and
device_map auto / max_memory place the model as asked."""
from __future__ import annotations

import gc
import json

import pytest
from llama_shapes import record

from profiles.loader import load_profile

pytestmark = pytest.mark.gpu

QUANT_CASES = {
    "nf4": ["quantization.mode=nf4", "quantization.double_quant=false"],
    "nf4-double": ["quantization.mode=nf4", "quantization.double_quant=true"],
    "fp4-double-bf16-storage": ["quantization.mode=fp4", "quantization.double_quant=true",
                                "quantization.quant_storage=bfloat16"],
    "int8": ["quantization.mode=int8"],
}


def _profile(*sets):
    return load_profile("llama-3.2-1b-lora", ["model.dtype=bfloat16",
                                              "model.device_map={'': 0}", *sets])


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_quantized_loading(case, checkpoints):
    import bitsandbytes as bnb
    import torch

    from tasks.memory.estimate import estimate_training_memory
    from tasks.memory.tensors import read_safetensors_headers
    from tasks.training.modeling import load_base_model

    ckpt = checkpoints("1b")
    profile = _profile(*QUANT_CASES[case])
    q = profile.quantization
    est = estimate_training_memory(profile, read_safetensors_headers(ckpt),
                                   json.loads((ckpt / "config.json").read_text()))
    gc.collect()    # earlier cases' models must be gone before the baseline is read
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = load_base_model(profile.model, q, str(ckpt))
    allocated = torch.cuda.memory_allocated() - before
    footprint = model.get_memory_footprint()

    layers = [(n, m) for n, m in model.named_modules() if ".layers." in n
              and n.rsplit(".", 1)[-1].endswith("_proj")]
    assert len(layers) == 16 * 7
    want = bnb.nn.Linear8bitLt if q.mode == "int8" else bnb.nn.Linear4bit
    assert all(isinstance(m, want) for _, m in layers), {type(m) for _, m in layers}
    assert type(model.lm_head) is torch.nn.Linear                 # the head stays 16-bit
    assert model.lm_head.weight.dtype == torch.bfloat16
    w = layers[0][1].weight
    if q.mode == "int8":
        assert w.dtype == torch.int8 and layers[0][1].state.has_fp16_weights is False
    else:
        assert w.quant_state.quant_type == q.mode
        assert bool(w.quant_state.nested) is q.double_quant
        assert w.dtype == getattr(torch, q.quant_storage)
        assert layers[0][1].compute_dtype == torch.bfloat16        # compute dtype
    assert all(p.device.type == "cuda" for p in model.parameters())
    ratio = est.loaded_weights_bytes / allocated
    record("quantized_loading", case=case, allocated_gib=allocated / 2**30,
           footprint_gib=footprint / 2**30,
           estimated_gib=est.loaded_weights_bytes / 2**30, ratio=ratio)
    assert 0.95 < ratio < 1.05, (est.loaded_weights_bytes, allocated)
    with torch.no_grad():
        out = model(input_ids=torch.randint(4, 500, (1, 32), device="cuda")).logits
    assert torch.isfinite(out).all()
    del model
    torch.cuda.empty_cache()


def test_bf16_attention_implementations_agree_and_train(checkpoints):
    import torch

    from tasks.training.modeling import inject_adapter, load_base_model

    ckpt = checkpoints("1b-2layer")
    ids = torch.randint(4, 30000, (2, 256), device="cuda")
    logits, grads = {}, {}
    for attn in ("eager", "sdpa", "flex_attention"):
        p = _profile(f"model.attn_implementation={attn}", "lora.dropout=0")
        model = inject_adapter(load_base_model(p.model, p.quantization, str(ckpt)), p.lora,
                               p.quantization, False)
        assert model.base_model.model.config._attn_implementation == attn
        with torch.no_grad():
            logits[attn] = model(input_ids=ids).logits.float()
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads[attn] = sum(p.grad.float().norm() for n, p in model.named_parameters()
                          if p.requires_grad and p.grad is not None)
        del model
        torch.cuda.empty_cache()
    scale = logits["eager"].abs().max()
    diffs = {a: float((logits[a] - logits["eager"]).abs().max() / scale)
             for a in ("sdpa", "flex_attention")}
    record("attention", relative_max_logit_diff_vs_eager=diffs,
           grad_norms={a: float(g) for a, g in grads.items()})
    assert all(d < 0.02 for d in diffs.values()), diffs
    assert all(float(g) > 0 for g in grads.values())


def test_flash_attention_2_is_refused_in_preflight_unless_installed():
    import importlib.util

    from tasks import preflight
    from tasks.errors import ProfileError
    from tasks.memory.devices import visible_gpus

    p = _profile("model.attn_implementation=flash_attention_2")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ProfileError, match="pip install flash-attn"):
            preflight.check_loading_options(p, visible_gpus())
    else:
        preflight.check_loading_options(p, visible_gpus())


def test_device_map_auto_and_max_memory(checkpoints):
    import torch

    from tasks.memory.devices import visible_gpus
    from tasks.training.modeling import load_base_model

    gpus = visible_gpus()
    assert gpus and gpus[0].total_bytes > 10 * 2**30          # nvidia-smi was read
    ckpt = checkpoints("1b-2layer")
    ids = torch.randint(4, 30000, (1, 64), device="cuda")
    auto = load_profile("llama-3.2-1b-lora", ["model.dtype=bfloat16", "model.device_map=auto"])
    model = load_base_model(auto.model, auto.quantization, str(ckpt))
    # One device: transformers places the model without accelerate's dispatch (and sets
    # no hf_device_map); everything must be on GPU 0.
    placed = {str(p.device) for p in model.parameters()}
    assert placed == {"cuda:0"}, placed
    assert set(getattr(model, "hf_device_map", {"": 0}).values()) == {0}
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float().cpu()
    del model
    torch.cuda.empty_cache()
    # 300 MiB on the GPU for a ≈360 MiB model (accelerate also keeps room for its
    # largest layer): part of it must go to the CPU.
    capped = load_profile("llama-3.2-1b-lora", [
        "model.dtype=bfloat16", "model.device_map=auto",
        "model.max_memory={0: 300MiB, cpu: 20GiB}"])
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = load_base_model(capped.model, capped.quantization, str(ckpt))
    on_gpu = torch.cuda.memory_allocated() - before
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    where = getattr(model, "hf_device_map", None)
    first = model.get_input_embeddings().weight.device
    with torch.no_grad():
        out = model(input_ids=ids.to(first)).logits.float().cpu()
    record("device_map", auto=sorted(placed), capped=where, capped_gpu_mib=on_gpu / 2**20,
           model_mib=total / 2**20, max_abs_diff=float((out - ref).abs().max()))
    assert on_gpu <= 300 * 2**20 < total
    assert where is not None and "cpu" in where.values() and 0 in where.values(), where
    assert torch.allclose(out, ref, atol=2e-2, rtol=2e-2)
    del model
    torch.cuda.empty_cache()
