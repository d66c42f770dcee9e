"""Loading options: validated in the profile and in preflight (before any weight is
read), and mapped to from_pretrained's arguments in one place (tasks.training.modeling)."""
from __future__ import annotations

import pytest

from profiles.loader import load_profile
from tasks import preflight
from tasks.contracts import GiB, Gpu
from tasks.errors import ProfileError

GPU = [Gpu(index=0, name="H100", total_bytes=80 * GiB, free_bytes=79 * GiB)]


@pytest.mark.parametrize("sets", [
    ["model.dtype=bfloat16"], ["model.dtype=float16"], ["model.dtype=float32"],
    ["model.device_map=auto", "model.max_memory={0: 70GiB, cpu: 100GiB}"],
    ["model.device_map=cpu"], ["model.device_map=cuda"], ["model.device_map={'': 1}"],
    ["model.device_map={'': 'cuda:0'}"],
    ["model.device_map={model.embed_tokens: 0, model.layers: 0, lm_head: cpu}"],
    ["model.device_map={model.layers: 0, lm_head: disk}", "model.offload_folder=/tmp/off"],
    ["model.attn_implementation=eager"], ["model.attn_implementation=flex_attention"],
    ["model.dtype=bfloat16", "model.attn_implementation=flash_attention_2"],
    ["quantization.mode=nf4", "model.dtype=bfloat16", "quantization.quant_storage=bfloat16"],
    ["quantization.mode=fp4", "model.dtype=bfloat16", "quantization.double_quant=false"],
    ["quantization.mode=int8"],
])
def test_valid_loading_options(sets):
    load_profile("quickstart", sets)


@pytest.mark.parametrize("sets, field, hint", [
    (["model.max_memory={0: 20GiB}"], "model.max_memory", "device_map to auto"),
    (["model.device_map=auto", "model.max_memory={gpu0: 20GiB}"], "model.max_memory",
     "GPU indices"),
    (["model.device_map=auto", "model.max_memory={0: lots}"], "model.max_memory", "20GiB"),
    (["model.device_map={lm_head: gpu}"], "model.device_map", "cuda:N, cpu or disk"),
    (["model.device_map={}"], "model.device_map", "{'': 0}"),
    (["model.device_map={lm_head: disk}"], "model.offload_folder", "set model.offload_folder"),
    (["model.offload_folder=/tmp/off"], "model.offload_folder", "device_map to auto"),
    (["model.attn_implementation=flash_attention_2"], "model.attn_implementation",
     "bfloat16"),
    (["model.attn_implementation=flash_attn"], "model.attn_implementation", "valid value"),
    (["quantization.quant_storage=int4"], "quantization.quant_storage", "valid value"),
    (["model.dtype=float64"], "model.dtype", "valid value"),
])
def test_invalid_loading_options_name_field_and_fix(sets, field, hint):
    with pytest.raises(ProfileError) as err:
        load_profile("quickstart", sets)
    msg = str(err.value)
    assert field in msg and "Fix" in msg and hint in msg, msg


def test_loading_fields_describe_the_library_argument():
    from profiles.schema import ModelSection, QuantizationSection

    for section, names in [(ModelSection, ["dtype", "device_map", "max_memory",
                                           "offload_folder", "attn_implementation",
                                           "low_cpu_mem_usage", "trust_remote_code"]),
                           (QuantizationSection, ["mode", "double_quant", "compute_dtype",
                                                  "quant_storage"])]:
        for name in names:
            desc = section.model_fields[name].description
            assert any(arg in desc for arg in ("from_pretrained", "bnb_4bit", "BitsAndBytes")), name


def _check(sets, gpus, installed=("bitsandbytes",), monkeypatch=None):
    monkeypatch.setattr(preflight, "_installed", lambda m: m in installed)
    preflight.check_loading_options(load_profile("quickstart", sets), gpus)


def test_flash_attention_2_without_flash_attn_says_what_to_install(monkeypatch):
    with pytest.raises(ProfileError) as err:
        _check(["model.dtype=bfloat16", "model.attn_implementation=flash_attention_2"], GPU,
               monkeypatch=monkeypatch)
    msg = str(err.value)
    assert "model.attn_implementation" in msg and "pip install flash-attn" in msg
    _check(["model.dtype=bfloat16", "model.attn_implementation=flash_attention_2"], GPU,
           installed=("flash_attn",), monkeypatch=monkeypatch)
    with pytest.raises(ProfileError, match="CUDA GPUs only"):
        _check(["model.dtype=bfloat16", "model.attn_implementation=flash_attention_2"], [],
               installed=("flash_attn",), monkeypatch=monkeypatch)


def test_quantization_without_bitsandbytes_says_what_to_install(monkeypatch):
    with pytest.raises(ProfileError, match="pip install 'bitsandbytes"):
        _check(["quantization.mode=int8"], GPU, installed=(), monkeypatch=monkeypatch)


def test_gpu_placement_without_a_gpu_is_refused(monkeypatch):
    for dm in ("cuda", "{'': 0}", "{model.layers: 0, lm_head: cpu}"):
        with pytest.raises(ProfileError, match="model.device_map.*no CUDA GPU"):
            _check([f"model.device_map={dm}"], [], monkeypatch=monkeypatch)
    _check(["model.device_map=cpu"], [], monkeypatch=monkeypatch)
    _check(["model.device_map=cuda"], GPU, monkeypatch=monkeypatch)


def test_low_cpu_mem_usage_false_is_refused_on_transformers_5(monkeypatch):
    with pytest.raises(ProfileError, match="model.low_cpu_mem_usage"):
        _check(["model.low_cpu_mem_usage=false"], GPU, monkeypatch=monkeypatch)


def test_4bit_on_cpu_with_evaluation_during_training_is_refused(monkeypatch):
    sets = ["quantization.mode=nf4", "quantization.compute_dtype=float32",
            "training.eval_steps=10"]
    with pytest.raises(ProfileError) as err:
        _check(sets, [], monkeypatch=monkeypatch)
    assert "training.eval_steps" in str(err.value) and "null" in str(err.value)
    with pytest.raises(ProfileError):
        _check(sets + ["model.device_map=cpu"], GPU, monkeypatch=monkeypatch)
    _check(sets, GPU, monkeypatch=monkeypatch)                       # on a GPU: fine
    _check(sets[:2], [], monkeypatch=monkeypatch)                    # eval once, at the end
    _check(["quantization.mode=int8", "training.eval_steps=10"], [], monkeypatch=monkeypatch)


def test_load_kwargs_map_every_field():
    import torch

    from tasks.training.modeling import load_kwargs

    p = load_profile("quickstart", [
        "model.dtype=bfloat16", "model.device_map=auto",
        "model.max_memory={0: 20GiB, '1': 30GiB, cpu: 64GiB}", "model.offload_folder=/tmp/o",
        "model.attn_implementation=eager", "quantization.mode=nf4",
        "quantization.double_quant=false", "quantization.compute_dtype=float16",
        "quantization.quant_storage=bfloat16"])
    kw = load_kwargs(p.model, p.quantization)
    assert kw["dtype"] is torch.bfloat16 and kw["attn_implementation"] == "eager"
    assert kw["device_map"] == "auto" and kw["offload_folder"] == "/tmp/o"
    assert kw["max_memory"] == {0: "20GiB", 1: "30GiB", "cpu": "64GiB"}
    assert kw["use_safetensors"] is True and kw["trust_remote_code"] is False
    q = kw["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4"
    assert q.bnb_4bit_use_double_quant is False
    assert q.bnb_4bit_compute_dtype is torch.float16
    assert q.bnb_4bit_quant_storage is torch.bfloat16
    assert q.llm_int8_enable_fp32_cpu_offload is True      # auto may offload to the CPU
    p8 = load_profile("quickstart", ["quantization.mode=int8", "model.device_map={'': 0}"])
    kw8 = load_kwargs(p8.model, p8.quantization)
    assert kw8["quantization_config"].load_in_8bit
    assert kw8["quantization_config"].llm_int8_enable_fp32_cpu_offload is False
    assert kw8["device_map"] == {"": 0} and "max_memory" not in kw8
    assert "quantization_config" not in load_kwargs(*_sections("quickstart"))


def _sections(name):
    p = load_profile(name)
    return p.model, p.quantization


def test_flex_attention_is_refused_for_cpu_training(monkeypatch):
    with pytest.raises(ProfileError, match="flex_attention has no backward pass on CPU"):
        _check(["model.attn_implementation=flex_attention"], [], monkeypatch=monkeypatch)
    _check(["model.attn_implementation=flex_attention"], GPU, monkeypatch=monkeypatch)


def test_fp8_is_refused_before_download_without_fp8_tensor_cores(monkeypatch):
    with pytest.raises(ProfileError, match="training.fp8.*no CUDA GPU is visible.*Fix"):
        _check(["training.fp8=true"], [], monkeypatch=monkeypatch)
    a100 = [Gpu(index=0, name="A100", total_bytes=80 * GiB, free_bytes=79 * GiB,
                compute_capability=8.0)]
    with pytest.raises(ProfileError, match="training.fp8.*GPU 0 \\(A100\\) has 8.0.*Fix"):
        _check(["training.fp8=true"], a100, monkeypatch=monkeypatch)
    h100 = [a100[0].model_copy(update={"name": "H100", "compute_capability": 9.0})]
    _check(["training.fp8=true"], h100, monkeypatch=monkeypatch)


def test_offloading_is_refused_before_download_when_training_would_run_several_processes(
        monkeypatch):
    two = [GPU[0], GPU[0].model_copy(update={"index": 1})]
    sets = ["training.offload_activations=true", "training.gradient_checkpointing=true"]
    with pytest.raises(ProfileError, match="training.offload_activations.*2 processes.*Fix"):
        _check(sets, two, monkeypatch=monkeypatch)
    _check([*sets, "training.launcher=single"], two, monkeypatch=monkeypatch)
    _check(sets, GPU, monkeypatch=monkeypatch)


def test_liger_kernel_true_needs_the_package_and_a_gpu(monkeypatch):
    with pytest.raises(ProfileError, match="training.liger_kernel.*not installed"):
        _check(["training.liger_kernel=true"], GPU, monkeypatch=monkeypatch)
    with pytest.raises(ProfileError, match="training.liger_kernel.*none is visible"):
        _check(["training.liger_kernel=true"], [], installed=("liger_kernel",),
               monkeypatch=monkeypatch)
    _check(["training.liger_kernel=true"], GPU, installed=("liger_kernel",),
           monkeypatch=monkeypatch)
    _check(["training.liger_kernel=auto"], [], installed=(), monkeypatch=monkeypatch)


def test_torch_compile_auto_is_on_only_where_it_measured_faster():
    from tasks.training.speed import use_torch_compile

    def compiles(sets, cuda=True, processes=1):
        return use_torch_compile(load_profile("quickstart", sets), cuda, processes)

    assert compiles(["training.packing=true"])           # fixed row length: compiles once
    assert not compiles([])                              # padded: recompiles per length
    assert not compiles(["training.packing=true"], cuda=False)
    assert not compiles(["training.packing=true"], processes=2)
    assert compiles(["training.packing=true", "quantization.mode=nf4",   # 4-bit too (#14)
                     "quantization.compute_dtype=float32"])
    assert not compiles(["quantization.mode=nf4", "quantization.compute_dtype=float32"])
    assert compiles(["training.torch_compile=true"], cuda=False)
    assert not compiles(["training.packing=true", "training.torch_compile=false"])
