"""The preflight memory estimate: parameter counts from headers, bytes per setting, the
fit against GPUs and the fixes it suggests; the presets against the real Llama configs.

No torch here: the estimate must run where torch is not imported.
"""
from __future__ import annotations

import math
import subprocess

import pytest

from profiles.loader import load_profile
from tasks.contracts import CUDA_CONTEXT_BYTES, GiB, Gpu
from tasks.errors import OutOfMemoryError, ProfileError
from tasks.memory.devices import parse_size, visible_gpus
from tasks.memory.estimate import HEADROOM, estimate_training_memory, resolved_dtype
from tasks.memory.fit import InsufficientMemoryError, fit_to_cap, plan_memory
from tasks.memory.tensors import (
    TensorSpecs,
    check_fp8_target_modules,
    check_target_modules,
    linear_modules,
    read_safetensors_headers,
)

# config.json of meta-llama/Llama-3.2-1B and meta-llama/Llama-3.1-8B (the fields the
# estimate reads), as published on the Hub.
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
    "tie_word_embeddings": True, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0, "torch_dtype": "bfloat16",
}
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "tie_word_embeddings": False, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0, "torch_dtype": "bfloat16",
}
H100 = Gpu(index=0, name="NVIDIA H100 80GB HBM3", total_bytes=81559 * 2**20,
           free_bytes=81000 * 2**20)


def llama_tensors(c: dict, dtype: str = "BF16") -> TensorSpecs:
    """The safetensors header of a LlamaForCausalLM with config c (names and shapes as
    transformers saves them; a tied lm_head is not stored)."""
    d, f, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim") or d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    t = {"model.embed_tokens.weight": (dtype, [V, d]), "model.norm.weight": (dtype, [d])}
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = (dtype, [V, d])
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shape in [("self_attn.q_proj", [q, d]), ("self_attn.k_proj", [kv, d]),
                            ("self_attn.v_proj", [kv, d]), ("self_attn.o_proj", [d, q]),
                            ("mlp.gate_proj", [f, d]), ("mlp.up_proj", [f, d]),
                            ("mlp.down_proj", [d, f])]:
            t[p + name + ".weight"] = (dtype, shape)
        t[p + "input_layernorm.weight"] = (dtype, [d])
        t[p + "post_attention_layernorm.weight"] = (dtype, [d])
    return t


@pytest.mark.parametrize("preset, config, params", [
    ("llama-3.2-1b-lora", LLAMA_3_2_1B, 1_235_814_400),
    ("llama-3.1-8b-qlora", LLAMA_3_1_8B, 8_030_261_248),
])
def test_presets_fit_an_80gb_gpu_with_the_real_llama_configs(preset, config, params):
    profile = load_profile(preset)
    tensors = llama_tensors(config)
    check_target_modules(profile.lora.target_modules, tensors)
    check_target_modules(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                 "up_proj", "down_proj"], tensors)
    report = plan_memory(profile, tensors, config, gpus=[H100])
    assert report.fits is True and report.placement == "gpu:0"
    est = report.estimate
    assert est.parameters == params
    assert est.peak_bytes * (1 + HEADROOM) + CUDA_CONTEXT_BYTES < 80e9
    # r=16 on every linear layer of every block: 11.3M (1B) / 42.0M (8B) adapter params.
    assert est.adapter_parameters == {1_235_814_400: 11_272_192,
                                      8_030_261_248: 41_943_040}[params]


def test_8b_preset_is_quantized_and_the_1b_is_not():
    est8 = estimate_training_memory(load_profile("llama-3.1-8b-qlora"),
                                           llama_tensors(LLAMA_3_1_8B), LLAMA_3_1_8B)
    # 32 blocks × 7 linear layers in 4 bits; embeddings and lm_head stay unquantized.
    assert est8.quantized_parameters == 8_030_261_248 - 2 * 128256 * 4096 - 65 * 4096
    assert 5.0 * GiB < est8.loaded_weights_bytes < 6.0 * GiB   # ≈3.5 GiB 4-bit + 2 GiB bf16
    assert est8.weights_bytes == est8.loaded_weights_bytes      # 16-bit rest: no upcast
    upcast = estimate_training_memory(
        load_profile("llama-3.1-8b-qlora", ["quantization.upcast_non_quantized=true"]),
        llama_tensors(LLAMA_3_1_8B), LLAMA_3_1_8B)
    assert upcast.weights_bytes > upcast.loaded_weights_bytes   # peft's k-bit prep: fp32
    assert upcast.activation_mode == "fp32" and est8.activation_mode == "mixed16"
    est1 = estimate_training_memory(load_profile("llama-3.2-1b-lora"),
                                           llama_tensors(LLAMA_3_2_1B), LLAMA_3_2_1B)
    assert est1.quantized_parameters == 0
    assert est1.loaded_weights_bytes == 2 * 1_235_814_400


@pytest.mark.parametrize("sets, bits_per_param", [
    (["quantization.mode=nf4", "quantization.double_quant=false"], 4 + 32 / 64),
    (["quantization.mode=nf4", "quantization.double_quant=true"], 4 + 8 / 64 + 32 / 64 / 256),
    (["quantization.mode=fp4"], 4 + 8 / 64 + 32 / 64 / 256),
    (["quantization.mode=int8"], 8),
])
def test_quantized_weight_bytes(sets, bits_per_param):
    config = {**LLAMA_3_2_1B, "num_hidden_layers": 2}
    tensors = llama_tensors(config)
    profile = load_profile("llama-3.2-1b-lora", sets)
    est = estimate_training_memory(profile, tensors, config)
    linear = est.quantized_parameters
    others = est.parameters - linear
    expected = linear * bits_per_param / 8 + others * 2
    if "int8" in sets[0]:
        expected += 4 * sum(s[0] for n, (_, s) in tensors.items()
                            if len(s) == 2 and ".layers." in n)   # fp32 row scales
    assert est.loaded_weights_bytes == pytest.approx(expected, rel=1e-6)


def test_activations_scale_with_tokens_and_checkpointing_cuts_them():
    tensors, cfg = llama_tensors(LLAMA_3_2_1B), LLAMA_3_2_1B
    est = lambda *s: estimate_training_memory(  # noqa: E731
        load_profile("llama-3.2-1b-lora", list(s)), tensors, cfg)
    a = est("training.per_device_batch_size=2")
    b = est("training.per_device_batch_size=4")
    assert b.activation_bytes == 2 * a.activation_bytes and b.loss_bytes == 2 * a.loss_bytes
    c = est("training.per_device_batch_size=4", "training.gradient_checkpointing=true")
    assert c.activation_bytes < b.activation_bytes / 5
    # Offloaded checkpointing: 16 layer inputs (4 × 2048 tokens × 2048 × 2 B each) leave
    # the GPU but for the two the backward holds.
    offloaded = est("training.per_device_batch_size=4", "training.gradient_checkpointing=true",
                    "training.offload_activations=true")
    assert c.activation_bytes - offloaded.activation_bytes == 14 * 4 * 2048 * 2048 * 2
    no_dropout = est("lora.dropout=0")
    assert no_dropout.activation_bytes < est().activation_bytes
    eager = est("model.attn_implementation=eager")
    assert eager.activation_bytes > est().activation_bytes
    qv = est("lora.target_modules=[q_proj, v_proj]")
    assert qv.adapter_parameters == 16 * 16 * ((2048 + 2048) + (2048 + 512))
    assert qv.activation_bytes < est().activation_bytes


def test_a_run_that_cannot_fit_fails_with_the_fixes_that_would():
    small = Gpu(index=0, name="24GB card", total_bytes=24 * GiB, free_bytes=24 * GiB)
    profile = load_profile("llama-3.1-8b-qlora", [
        "quantization.mode=none", "training.per_device_batch_size=8",
        "training.gradient_checkpointing=false"])
    with pytest.raises(OutOfMemoryError) as err:
        plan_memory(profile, llama_tensors(LLAMA_3_1_8B), LLAMA_3_1_8B, gpus=[small])
    msg = str(err.value)
    assert isinstance(err.value, InsufficientMemoryError)
    assert "training.per_device_batch_size" in msg and "GiB" in msg and "Fix" in msg
    # bf16 8B weights alone are 15 GiB: only quantization gets it under 23 GiB.
    assert "--set quantization.mode=nf4" in msg and "--set training.gradient_checkpointing=true" in msg


def test_smaller_batch_is_suggested_with_the_same_effective_batch():
    profile = load_profile("llama-3.2-1b-lora", ["training.per_device_batch_size=16",
                                                 "training.gradient_accumulation_steps=1"])
    gpu = Gpu(index=0, name="40GB", total_bytes=40 * GiB, free_bytes=40 * GiB)
    with pytest.raises(InsufficientMemoryError) as err:
        plan_memory(profile, llama_tensors(LLAMA_3_2_1B), LLAMA_3_2_1B, gpus=[gpu])
    msg = str(err.value)
    assert "--set training.gradient_checkpointing=true" not in msg.split("Fix")[0]
    fixes = msg.split("Fix, any of: ")[1].split("; ")
    batch = [f for f in fixes if f.startswith("--set training.per_device_batch_size=")]
    assert batch, msg
    bs = int(batch[0].split("per_device_batch_size=")[1].split()[0])
    accum = int(batch[0].split("gradient_accumulation_steps=")[1].split()[0])
    assert bs * accum == 16


def test_device_map_auto_spreads_over_gpus_and_is_suggested():
    gpus = [Gpu(index=i, name="16GB", total_bytes=16 * GiB, free_bytes=16 * GiB)
            for i in range(2)]
    # One process (two would shard with FSDP: test_the_data_parallel_engine_…).
    profile = load_profile("llama-3.1-8b-qlora", [
        "quantization.mode=none", "training.per_device_batch_size=1",
        "data.max_length=512", "training.launcher=single"])
    tensors = llama_tensors(LLAMA_3_1_8B)
    with pytest.raises(InsufficientMemoryError) as err:
        plan_memory(profile, tensors, LLAMA_3_1_8B, gpus=gpus)
    assert "--set model.device_map=auto" in str(err.value)
    auto = load_profile("llama-3.1-8b-qlora", [
        "quantization.mode=none", "training.per_device_batch_size=1",
        "data.max_length=512", "model.device_map=auto", "model.max_memory={0: 15GiB, 1: 15GiB}"])
    report = plan_memory(auto, tensors, LLAMA_3_1_8B, gpus=gpus, ram_bytes=0)
    assert report.fits and report.placement == "spread over gpu:0,gpu:1"
    # A max_memory below what the weights need refuses the same run.
    tight = load_profile("llama-3.1-8b-qlora", [
        "quantization.mode=none", "training.per_device_batch_size=1",
        "data.max_length=512", "model.device_map=auto", "model.max_memory={0: 6GiB, 1: 6GiB}"])
    with pytest.raises(InsufficientMemoryError):
        plan_memory(tight, tensors, LLAMA_3_1_8B, gpus=gpus, ram_bytes=0)


def test_no_gpu_means_no_comparison_and_cpu_dtype():
    report = plan_memory(load_profile("quickstart"), llama_tensors(LLAMA_3_2_1B),
                                LLAMA_3_2_1B, gpus=[])
    assert report.fits is None and report.placement == "cpu"
    auto = load_profile("quickstart", ["model.dtype=auto"])
    assert estimate_training_memory(auto, llama_tensors(LLAMA_3_2_1B), LLAMA_3_2_1B,
                                           on_gpu=False).activation_mode == "fp32"


def test_a_gpu_index_that_is_not_visible_is_a_profile_error():
    profile = load_profile("llama-3.2-1b-lora", ["model.device_map={'': 3}"])
    with pytest.raises(ProfileError) as err:
        plan_memory(profile, llama_tensors(LLAMA_3_2_1B), LLAMA_3_2_1B, gpus=[H100])
    assert "model.device_map" in str(err.value) and "GPU 3" in str(err.value)


def test_fp8_target_modules_are_leaf_names_of_the_model_s_linear_layers():
    tensors = llama_tensors(LLAMA_3_2_1B)
    check_fp8_target_modules(["gate_proj", "up_proj"], tensors, LLAMA_3_2_1B)
    check_fp8_target_modules(None, tensors, LLAMA_3_2_1B)      # null: every LoRA layer
    for wrong in (["gate", "up_proj"], ["mlp.gate_proj"]):      # a typo; a dotted path
        with pytest.raises(ProfileError) as err:
            check_fp8_target_modules(wrong, tensors, LLAMA_3_2_1B)
        msg = str(err.value)
        assert msg.startswith(f"training.fp8_target_modules: {wrong[:1]}") and "Fix:" in msg
        assert "gate_proj" in msg.split("leaf names:")[1]


def test_target_modules_that_match_nothing_list_the_real_names():
    with pytest.raises(ProfileError) as err:
        check_target_modules(["q_proj", "query"], llama_tensors(LLAMA_3_2_1B))
    msg = str(err.value)
    assert "lora.target_modules" in msg and "['query']" in msg
    assert "q_proj" in msg.split("names from:")[1] and "down_proj" in msg


def test_headers_of_the_seeded_model_are_read(tmp_path):
    from localhub import seed_data

    (tmp_path / "model.safetensors").write_bytes(seed_data.model_files()["model.safetensors"])
    specs = read_safetensors_headers(tmp_path)
    assert specs["model.layers.0.self_attn.q_proj.weight"] == ("F32", [64, 64])
    assert specs["lm_head.weight"] == ("F32", [512, 64])
    assert {m.leaf for m in linear_modules(specs)} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        "lm_head"}


def test_memory_module_does_not_import_torch():
    code = ("import sys, tasks.memory.fit, tasks.preflight; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    import sys

    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _fake_smi(stdout: str, rc: int = 0):
    def run(cmd, **_):
        assert cmd[0] == "nvidia-smi"
        return subprocess.CompletedProcess(cmd, rc, stdout=stdout, stderr="")
    return run


SMI = ("0, GPU-aaaa, NVIDIA H100 80GB HBM3, 81559, 81000, 9.0\n"
       "1, GPU-bbbb, Tesla T4, 15360, 15000, 7.5\n")


def test_visible_gpus_parses_nvidia_smi_and_honours_cuda_visible_devices():
    gpus = visible_gpus(run=_fake_smi(SMI), env={})
    assert [(g.index, g.name, g.bf16) for g in gpus] == [
        (0, "NVIDIA H100 80GB HBM3", True), (1, "Tesla T4", False)]
    assert gpus[0].free_bytes == 81000 * 2**20
    only_t4 = visible_gpus(run=_fake_smi(SMI), env={"CUDA_VISIBLE_DEVICES": "1"})
    assert [(g.index, g.name) for g in only_t4] == [(0, "Tesla T4")]
    by_uuid = visible_gpus(run=_fake_smi(SMI), env={"CUDA_VISIBLE_DEVICES": "GPU-bbbb"})
    assert [g.name for g in by_uuid] == ["Tesla T4"]
    assert visible_gpus(run=_fake_smi(SMI), env={"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus(run=_fake_smi("", rc=9), env={}) == []


def test_auto_dtype_follows_the_gpu():
    profile = load_profile("llama-3.2-1b-lora", ["model.dtype=auto"])
    t4 = Gpu(index=0, name="Tesla T4", total_bytes=15 * GiB, free_bytes=15 * GiB, bf16=False)
    tensors = llama_tensors(LLAMA_3_2_1B)
    est = estimate_training_memory(profile, tensors, LLAMA_3_2_1B, on_gpu=True,
                                          bf16_ok=t4.bf16)
    assert est.loaded_weights_bytes == 4 * est.parameters
    assert resolved_dtype(profile, on_gpu=True) == "bfloat16"


@pytest.mark.parametrize("size, expected", [("20GiB", 20 * GiB), ("500MB", 500_000_000),
                                            ("1.5GB", 1_500_000_000), (1024, 1024),
                                            ("2TiB", 2 * 1024 * GiB)])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


def test_a_memory_cap_picks_the_fastest_batch_and_checkpointing_that_fit():
    """8B in bf16, 4 examples of 2048 tokens per step, Liger's fused loss (as on the H100
    of docs/benchmarks.md, where these choices measured fastest under each cap)."""
    base = ["model.dtype=bfloat16", "data.max_length=2048", "training.global_batch_size=4",
            "training.per_device_batch_size=4", "lora.dropout=0"]
    tensors = llama_tensors(LLAMA_3_1_8B)

    def peak(fields) -> float:
        sets = [f"training.{k}={'null' if v is None else v}" for k, v in fields.items()]
        profile = load_profile("llama-3.2-1b-lora", base + sets)
        return estimate_training_memory(profile, tensors, LLAMA_3_1_8B,
                                               fused_loss=True).peak_bytes / GiB

    def choose(cap, fused_loss=True):
        profile = load_profile("llama-3.2-1b-lora", base + [f"training.memory_cap_gib={cap}"])
        return fit_to_cap(profile, tensors, LLAMA_3_1_8B, on_gpu=True,
                                 fused_loss=fused_loss)

    # Under 48 GiB: two micro-batches of 2 without checkpointing beat one of 4 that must
    # checkpoint some layers to fit.
    roomy = choose(48)
    assert roomy == {"per_device_batch_size": 2, "gradient_checkpointing": False,
                     "checkpoint_layers": None} and peak(roomy) <= 48
    assert peak({"per_device_batch_size": 4}) > 48
    # Under 31.3 GiB: the whole batch with the fewest checkpointed layers that fit.
    tight = choose(31.3)
    assert tight["per_device_batch_size"] == 4 and peak(tight) <= 31.3
    assert peak({**tight, "checkpoint_layers": tight["checkpoint_layers"] - 1}) > 31.3
    # Without the fused loss the vocabulary-sized logits count: less fits.
    assert choose(44) == roomy and choose(44, fused_loss=False) != roomy
    with pytest.raises(InsufficientMemoryError, match="training.memory_cap_gib"):
        choose(5)
    # Below what every layer checkpointed needs (about 19 GiB with bf16 weights of 15 GiB),
    # the plan keeps the layer inputs in CPU memory (offloaded checkpointing) — and only then.
    all_checkpointed = peak({"per_device_batch_size": 1, "gradient_checkpointing": True})
    assert "offload_activations" not in tight
    offloaded = choose(all_checkpointed - 0.05)
    assert offloaded["offload_activations"] is True and offloaded["gradient_checkpointing"]
    assert peak(offloaded) <= all_checkpointed - 0.05


def test_compiled_layers_keep_the_activation_budget_s_share():
    """training.activation_memory_budget: compiled layers (packing, a GPU) keep about that
    fraction of the activations; eager ones are not affected."""
    tensors, cfg = llama_tensors(LLAMA_3_2_1B), LLAMA_3_2_1B
    base = ["training.packing=true", "training.torch_compile=true", "lora.dropout=0"]

    def activations(*sets, on_gpu=True):
        return estimate_training_memory(load_profile("llama-3.2-1b-lora", base + list(sets)),
                                        tensors, cfg, on_gpu=on_gpu).activation_bytes

    full = activations()
    assert activations("training.activation_memory_budget=0.5") == pytest.approx(full / 2)
    assert activations("training.activation_memory_budget=0.5", "training.torch_compile=false") \
        == activations("training.torch_compile=false") == full


# openai-community/gpt2's config.json (the fields the estimate reads) and its header:
# transformers' Conv1D stores c_attn / c_proj / c_fc as [in, out]; lm_head is tied.
GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 768,
        "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}


def gpt2_tensors(c: dict = GPT2) -> TensorSpecs:
    d, V = c["n_embd"], c["vocab_size"]
    t = {"wte.weight": ("F32", [V, d]), "wpe.weight": ("F32", [c["n_positions"], d]),
         "ln_f.weight": ("F32", [d]), "ln_f.bias": ("F32", [d])}
    for i in range(c["n_layer"]):
        p = f"h.{i}."
        t.update({p + "attn.c_attn.weight": ("F32", [d, 3 * d]),
                  p + "attn.c_proj.weight": ("F32", [d, d]),
                  p + "mlp.c_fc.weight": ("F32", [d, 4 * d]),
                  p + "mlp.c_proj.weight": ("F32", [4 * d, d]),
                  p + "ln_1.weight": ("F32", [d]), p + "ln_2.weight": ("F32", [d])})
    return t


def test_gpt2_conv1d_weights_are_read_in_out_from_the_config():
    """Known from the config (model_type gpt2, read from transformers' source without
    importing it): Conv1D shapes are [in, out]; without the config they read as Linear."""
    linears = {m.name: m for m in linear_modules(gpt2_tensors(), GPT2)}
    assert (linears["h.0.mlp.c_fc"].in_features, linears["h.0.mlp.c_fc"].out_features) \
        == (768, 3072)
    assert (linears["h.0.attn.c_attn"].in_features,
            linears["h.0.attn.c_attn"].out_features) == (768, 2304)
    assert linears["lm_head"].tied_to == "wte" and not linears["lm_head"].in_block
    blind = {m.name: m for m in linear_modules(gpt2_tensors())}
    assert blind["h.0.mlp.c_fc"].in_features == 3072  # what preflight read before


def test_gpt2_estimate_counts_conv1d_targets_and_their_saved_inputs():
    profile = load_profile("quickstart", ["model.dtype=float32", "lora.r=8"])
    est = estimate_training_memory(profile, gpt2_tensors(), GPT2, on_gpu=False)
    # peft's count for gpt2 with r=8 on c_attn, c_proj, c_fc: 8 × (in + out) per module.
    assert est.adapter_parameters == 12 * 8 * ((768 + 2304) + (768 + 768) + (768 + 3072)
                                               + (3072 + 768))
    assert est.parameters == sum(math.prod(s) for _, s in gpt2_tensors().values())
    # The saved inputs of the targeted modules are at hidden width 768 (c_fc reads the
    # 768-wide residual), not the 3072 a transposed read gave.
    transposed = estimate_training_memory(profile, gpt2_tensors(),
                                                 {k: v for k, v in GPT2.items()
                                                  if k != "model_type"}, on_gpu=False)
    assert est.activation_bytes < transposed.activation_bytes


def test_a_tied_lm_head_passes_the_header_check():
    tensors = llama_tensors(LLAMA_3_2_1B)
    assert "lm_head.weight" not in tensors
    lora = load_profile("quickstart", ["lora.target_modules=[q_proj, v_proj, lm_head]",
                                       "lora.modules_to_save=[embed_tokens]"]).lora
    check_target_modules(lora, tensors, LLAMA_3_2_1B)
    lora = load_profile("quickstart", ["lora.modules_to_save=[lm_head]"]).lora
    check_target_modules(lora, tensors, LLAMA_3_2_1B)
    # Still refused: a name that is no module at all.
    lora = load_profile("quickstart", ["lora.modules_to_save=[score]"]).lora
    with pytest.raises(ProfileError, match="lora.modules_to_save: .* name no module"):
        check_target_modules(lora, tensors, LLAMA_3_2_1B)


@pytest.mark.parametrize("preset, config", [("llama-3.1-8b-qlora", LLAMA_3_1_8B)])
def test_the_data_parallel_engine_follows_one_gpu_s_room(preset, config):
    """Two processes: DDP while a full copy fits one GPU, FSDP when only a shard of the
    weights does (with the reason), the profile's choice when it forces one, and a forced
    FSDP with no GPU refused before anything runs."""
    tensors = llama_tensors(config)
    two = ["training.launcher=torchrun", "training.nproc_per_node=2"]
    profile = load_profile(preset, two)
    roomy = plan_memory(profile, tensors, config, gpus=[H100, H100])
    assert roomy.data_parallel == "ddp" and "fits one GPU" in roomy.data_parallel_reason
    full, weights = roomy.estimate.peak_bytes, roomy.estimate.weights_bytes
    # Room for everything but half the weights: a shard fits, a full copy does not.
    room = int((full - weights // 3) * 1.1)
    tight = Gpu(index=0, name="tight", total_bytes=room + (1 << 30), free_bytes=room + (1 << 30))
    sharded = plan_memory(profile, tensors, config, gpus=[tight, tight])
    assert sharded.data_parallel == "fsdp" and sharded.fits
    assert "FSDP shards the weights over 2 processes" in sharded.data_parallel_reason
    forced = plan_memory(load_profile(preset, two + ["training.data_parallel=ddp"]), tensors,
                         config, gpus=[H100, H100])
    assert forced.data_parallel_reason == "training.data_parallel: ddp, the profile's choice"
    one = plan_memory(load_profile(preset), tensors, config, gpus=[H100])
    assert one.data_parallel is None  # one process
    with pytest.raises(ProfileError, match="training.data_parallel: fsdp"):
        plan_memory(load_profile(preset, two + ["training.data_parallel=fsdp",
                                                "quantization.quant_storage=bfloat16"]),
                    tensors, config, gpus=[])
