"""Every adapter option that trains on CPU, one factor at a time, through the pipeline's
own code: the tiny seeded Llama loaded by tasks.training.modeling, the adapter attached by
tasks.training.adapters (via inject_adapter), trained by tasks.training.run.build_trainer's Trainer,
saved by tasks.training.adapters.save_adapter. Each case asserts that

- peft wrapped exactly the modules tasks.training.adapters.targeted_names predicts (the rule
  preflight applies to the safetensors headers);
- every trainable tensor changed, and the loss fell;
- the saved adapter reloads on a freshly loaded base with identical outputs (pissa /
  olora: the saved adapter is the trained one converted to plain LoRA of rank 2r on the
  unmodified base — the same function, so equal up to float rounding, not bit for bit).

Then several named adapters on one model, continuing a saved adapter, and peft's mixed
mode (LoRA + LoHa together, inference only).
"""
from __future__ import annotations

import json

import pytest

from profiles.loader import load_profile

CASES = {
    "lora": [],
    "ia3": ["lora.method=ia3", "training.learning_rate=0.3"],
    "ia3-feedforward": ["lora.method=ia3", "lora.target_modules=[k_proj, v_proj, down_proj]",
                        "lora.feedforward_modules=[down_proj]", "training.learning_rate=0.3"],
    "loha": ["lora.method=loha", "training.learning_rate=0.01"],
    "lokr": ["lora.method=lokr", "training.learning_rate=0.01"],
    "target-list": ["lora.target_modules=[q_proj, v_proj]"],
    "target-regex": [r"lora.target_modules=.*\.layers\.1\.(self_attn|mlp)\.\w+_proj"],
    "exclude-list": ["lora.exclude_modules=[down_proj, o_proj]"],
    "exclude-regex": [r"lora.exclude_modules=.*\.layers\.0\.mlp\..*"],
    "bias-lora_only": ["lora.bias=lora_only"],
    "rslora": ["lora.use_rslora=true"],
    "dora": ["lora.use_dora=true"],
    "init-gaussian": ["lora.init=gaussian"],
    "init-pissa": ["lora.init=pissa"],
    "init-olora": ["lora.init=olora"],
    "modules_to_save": ["lora.modules_to_save=[lm_head]"],
    "layers_to_transform": ["lora.layers_to_transform=[1]"],
    "rank_pattern": ["lora.rank_pattern={q_proj: 4, down_proj: 2}"],
    "alpha_pattern": ["lora.alpha_pattern={v_proj: 64}"],
    "adapter_name": ["lora.adapter_name=mine"],
    "bf16-autocast-off": ["model.dtype=bfloat16", "lora.autocast_adapter_dtype=false"],
}
IDS = [[1, 5, 9, 13, 17, 21, 25, 29]]
# Tensors each adapted module gets, per method (modules_to_save / DoRA add their own).
PER_MODULE = {"lora": 2, "ia3": 1, "loha": 4, "lokr": 3}


def _profile(sets, steps=12):
    return load_profile("quickstart", [f"training.max_steps={steps}",
                                       "training.per_device_batch_size=8",
                                       "training.logging_steps=1", "data.eval_split=0",
                                       "training.save_steps=100", *sets])


def _logits(model):
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.float()


def _wrapped(model) -> set:
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model()
    return {n for n, m in base.named_modules() if isinstance(m, BaseTunerLayer)}


def _train(model, profile, tiny_llama_dir, pattern_dataset, out):
    """Train the model's active adapter; (trainable tensors before, losses)."""
    from transformers import AutoTokenizer, set_seed

    from tasks.training.run import build_trainer

    set_seed(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer, _ = build_trainer(profile, model, AutoTokenizer.from_pretrained(str(tiny_llama_dir)),
                               pattern_dataset, out)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return before, losses, trainer


def _unchanged(model, before) -> list[str]:
    import torch

    params = dict(model.named_parameters())
    return [n for n, v in before.items() if torch.equal(params[n].detach(), v)]


class Trained:
    """One case's outcome, shared with the tests that reuse its adapter."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


_STATE: dict = {}


def _run_case(case, tiny_llama_dir, pattern_dataset, tmp_root) -> Trained:
    if case in _STATE:
        return _STATE[case]
    from transformers import set_seed

    from tasks.training import adapters
    from tasks.training.modeling import inject_adapter, load_base_model

    profile = _profile(CASES[case])
    out = tmp_root / case
    set_seed(0)
    base = load_base_model(profile.model, profile.quantization, str(tiny_llama_dir))
    linears, heads, _ = adapters.model_modules(base)
    predicted = set(adapters.targeted_names(profile.lora, linears, heads))
    model = inject_adapter(base, profile.lora, profile.quantization, False)
    initial = adapters.save_initial_adapter(model, profile.lora, out / "adapter_init_peft")
    before, losses, trainer = _train(model, profile, tiny_llama_dir, pattern_dataset, out / "run")
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    adapters.save_adapter(model, out / "adapter", profile.lora.adapter_name,
                          base_repo="tinylabs/tiny-llama", base_commit="0" * 40,
                          initial=initial)
    _STATE[case] = Trained(profile=profile, model=model, before=before, losses=losses,
                           predicted=predicted, wrapped=_wrapped(model),
                           adapter_dir=out / "adapter", trained=_logits(model))
    return _STATE[case]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@pytest.mark.parametrize("case", list(CASES))
def test_each_adapter_option_trains_and_reloads(case, tiny_llama_dir, pattern_dataset, tmp_root):
    import torch
    from peft import PeftModel

    from tasks.training.modeling import load_base_model

    t = _run_case(case, tiny_llama_dir, pattern_dataset, tmp_root)
    lora = t.profile.lora
    assert t.wrapped == t.predicted and t.wrapped
    assert _unchanged(t.model, t.before) == []
    expected = PER_MODULE[lora.method] * len(t.predicted)
    expected += len(t.predicted) if lora.use_dora else 0          # magnitude vectors
    expected += 1 if lora.modules_to_save else 0                  # lm_head copy
    if lora.method == "lokr":  # a factor is full or w_a × w_b, by its size against r
        assert 2 * len(t.predicted) <= len(t.before) <= 4 * len(t.predicted)
    else:
        assert len(t.before) == expected, sorted(t.before)
    assert t.losses[-1] < 0.95 * t.losses[0], t.losses

    saved = json.loads((t.adapter_dir / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "tinylabs/tiny-llama"
    assert not (t.adapter_dir / lora.adapter_name).exists()       # flat, whatever its name
    fresh = load_base_model(t.profile.model, t.profile.quantization,
                            str(tiny_llama_dir))
    reloaded = PeftModel.from_pretrained(fresh, str(t.adapter_dir),
                                         autocast_adapter_dtype=lora.autocast_adapter_dtype)
    again = _logits(reloaded)
    if lora.init in ("pissa", "olora"):
        assert saved["r"] == 2 * lora.r and saved["init_lora_weights"] is True
        assert torch.allclose(t.trained, again, atol=1e-5), (t.trained - again).abs().max()
    else:
        assert torch.equal(t.trained, again), (t.trained - again).abs().max()
    with torch.no_grad(), reloaded.disable_adapter():
        bare = reloaded(input_ids=torch.tensor(IDS)).logits.float()
    assert (again - bare).abs().max() > 1e-3
    if case == "bf16-autocast-off":
        assert {p.dtype for n, p in t.model.named_parameters() if "lora_" in n} == {
            torch.bfloat16}
    if case == "lora":
        assert {p.dtype for n, p in t.model.named_parameters() if "lora_" in n} == {
            torch.float32}


def test_two_named_adapters_on_one_model(tiny_llama_dir, pattern_dataset, tmp_path):
    import torch

    from tasks.training import adapters
    from tasks.training.modeling import inject_adapter, load_base_model

    first = _profile(["lora.adapter_name=first", "lora.target_modules=[q_proj, v_proj]"])
    second = _profile(["lora.adapter_name=second", "lora.r=4", "lora.init=gaussian"])
    base = load_base_model(first.model, first.quantization, str(tiny_llama_dir))
    model = inject_adapter(base, first.lora, first.quantization, False)
    before1, losses1, _ = _train(model, first, tiny_llama_dir, pattern_dataset, tmp_path / "r1")
    assert _unchanged(model, before1) == [] and losses1[-1] < 0.95 * losses1[0]
    trained_first = {n: p.detach().clone() for n, p in model.named_parameters()
                     if ".first." in n}

    model = adapters.add_named_adapter(model, second.lora)
    before2, losses2, _ = _train(model, second, tiny_llama_dir, pattern_dataset, tmp_path / "r2")
    assert set(before2) and all(".second." in n for n in before2)   # only it trains
    assert _unchanged(model, before2) == [] and losses2[-1] < 0.95 * losses2[0]
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in trained_first.items())

    outs = {}
    for name in ("first", "second"):
        model.set_adapter(name)
        outs[name] = _logits(model)
        adapters.save_adapter(model, tmp_path / name, name)
    assert (outs["first"] - outs["second"]).abs().max() > 1e-3
    fresh = load_base_model(first.model, first.quantization, str(tiny_llama_dir))
    reloaded = adapters.load_named_adapters(fresh, {n: str(tmp_path / n)
                                                    for n in ("first", "second")})
    for name in ("first", "second"):
        reloaded.set_adapter(name)
        assert torch.equal(_logits(reloaded), outs[name]), name

    with pytest.raises(Exception) as err:
        adapters.add_named_adapter(model, second.lora)
    assert "lora.adapter_name" in str(err.value) and "Fix" in str(err.value)
    loha = _profile(["lora.method=loha", "lora.adapter_name=third"])
    with pytest.raises(Exception) as err:
        adapters.add_named_adapter(model, loha.lora)
    assert "lora.method" in str(err.value) and "load_mixed" in str(err.value)


def test_continuing_a_saved_adapter_starts_from_its_weights(tiny_llama_dir, pattern_dataset, tmp_root,
                                                            tmp_path):
    import torch
    from safetensors.torch import load_file

    from tasks.training import adapters
    from tasks.training.modeling import inject_adapter, load_base_model

    t = _run_case("lora", tiny_llama_dir, pattern_dataset, tmp_root)
    profile = _profile(["training.learning_rate=0.001"], steps=6)
    base = load_base_model(profile.model, profile.quantization, str(tiny_llama_dir))
    model = inject_adapter(base, profile.lora, profile.quantization, False,
                           continue_from=str(t.adapter_dir))
    start = {k: v for k, v in _adapter_state(model).items()}
    saved = load_file(str(t.adapter_dir / "adapter_model.safetensors"))
    assert set(start) == set(saved) and all(torch.equal(start[k], saved[k]) for k in saved)
    assert torch.equal(_logits(model), t.trained)                  # where the first run ended
    model.train()
    before, losses, _ = _train(model, profile, tiny_llama_dir, pattern_dataset, tmp_path / "run")
    assert len(before) == len(saved) and _unchanged(model, before) == []
    # It goes on from a trained adapter: its loss starts where the fresh one's ended.
    assert losses[0] < (t.losses[0] + t.losses[-1]) / 2, (losses, t.losses)
    adapters.save_adapter(model, tmp_path / "adapter")
    fresh = load_base_model(profile.model, profile.quantization, str(tiny_llama_dir))
    from peft import PeftModel

    assert torch.equal(_logits(PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))),
                       _logits(model))

    other = _profile(["lora.r=4"])
    with pytest.raises(Exception) as err:
        inject_adapter(load_base_model(other.model, other.quantization, str(tiny_llama_dir)),
                       other.lora, other.quantization, False, continue_from=str(t.adapter_dir))
    assert "Fix" in str(err.value)


def _adapter_state(model):
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_mixed_lora_and_loha_for_inference(tiny_llama_dir, pattern_dataset, tmp_root):
    import torch
    from peft import PeftModel

    from tasks.training import adapters
    from tasks.training.modeling import load_base_model

    lora = _run_case("lora", tiny_llama_dir, pattern_dataset, tmp_root)
    loha = _run_case("loha", tiny_llama_dir, pattern_dataset, tmp_root)
    p = lora.profile
    mixed = adapters.load_mixed(load_base_model(p.model, p.quantization, str(tiny_llama_dir)),
                                {"lora": str(lora.adapter_dir), "loha": str(loha.adapter_dir)})
    assert not any(q.requires_grad for q in mixed.parameters())
    both = _logits(mixed)
    mixed.set_adapter(["lora"])
    assert torch.allclose(_logits(mixed), lora.trained, atol=1e-6)
    mixed.set_adapter(["loha"])
    assert torch.allclose(_logits(mixed), loha.trained, atol=1e-6)
    for alone in (lora.trained, loha.trained):
        assert (both - alone).abs().max() > 1e-3
    # Both active: each adapted layer adds both deltas (checked on one layer).
    q = mixed.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        mixed.set_adapter(["lora", "loha"])
        y_both = q(x)
        base_y = q.get_base_layer()(x)
        deltas = []
        for name in ("lora", "loha"):
            mixed.set_adapter([name])
            deltas.append(q(x) - base_y)
    assert torch.allclose(y_both, base_y + deltas[0] + deltas[1], atol=1e-6)

    ia3 = _run_case("ia3", tiny_llama_dir, pattern_dataset, tmp_root)
    with pytest.raises(Exception) as err:
        adapters.load_mixed(load_base_model(p.model, p.quantization, str(tiny_llama_dir)),
                            {"lora": str(lora.adapter_dir), "ia3": str(ia3.adapter_dir)})
    assert "ia3" in str(err.value) and "Fix" in str(err.value)
    assert isinstance(PeftModel, type)
