"""The `lora` section: what each peft method accepts, refused combinations, and the module
matching that preflight applies to the safetensors headers (no torch, no weights)."""
from __future__ import annotations

import pytest

from localhub import seed_adapters, seed_data
from profiles.loader import load_profile
from tasks.errors import ProfileError
from tasks.memory.estimate import estimate_training_memory
from tasks.memory.tensors import (
    check_target_modules,
    linear_modules,
    read_safetensors_headers,
)
from tasks.training import adapters

# The tiny seeded Llama's weights by name, dtype and shape: what preflight reads from headers.
TENSORS = {name: ("F32", list(arr.shape)) for name, arr in seed_data.model_tensors(512).items()}


def _lora(*sets):
    return load_profile("quickstart", list(sets)).lora


def _refused(*sets) -> str:
    with pytest.raises(ProfileError) as err:
        load_profile("quickstart", list(sets))
    return str(err.value)


@pytest.mark.parametrize("sets, field", [
    (["lora.method=ia3", "lora.r=4"], "lora.r"),
    (["lora.method=ia3", "lora.dropout=0.1"], "lora.dropout"),
    (["lora.method=ia3", "lora.layers_to_transform=[0]"], "lora.layers_to_transform"),
    (["lora.method=ia3", "lora.rank_pattern={q_proj: 4}"], "lora.rank_pattern"),
    (["lora.method=loha", "lora.use_dora=true"], "lora.use_dora"),
    (["lora.method=loha", "lora.init=pissa"], "lora.init"),
    (["lora.method=lokr", "lora.bias=all"], "lora.bias"),
    (["lora.method=lokr", "lora.feedforward_modules=[down_proj]"], "lora.feedforward_modules"),
    (["lora.method=lora", "lora.module_dropout=0.1"], "lora.module_dropout"),
    (["lora.feedforward_modules=[down_proj]"], "lora.feedforward_modules"),
])
def test_options_of_another_method_are_refused_naming_the_method(sets, field):
    message = _refused(*sets)
    assert field in message and "not an option of method" in message and "Fix" in message


@pytest.mark.parametrize("sets, field, says", [
    (["lora.target_modules=(q_proj"], "lora.target_modules", "not a valid regular expression"),
    (["lora.exclude_modules=[]"], "lora.exclude_modules", "not a list of module names"),
    (["lora.layers_to_transform=[0]", r"lora.target_modules=.*\.q_proj"],
     "lora.layers_to_transform", "regex"),
    (["lora.layers_to_transform=[]"], "lora.layers_to_transform", "non-empty"),
    (["lora.method=ia3", "lora.target_modules=[k_proj]", "lora.feedforward_modules=[down_proj]"],
     "lora.feedforward_modules", "not in lora.target_modules"),
    (["lora.init=pissa", "lora.use_dora=true"], "lora.init", "drops use_dora"),
    (["lora.init=olora", "lora.modules_to_save=[lm_head]"], "lora.init", "modules_to_save"),
    (["lora.init=pissa", "lora.use_rslora=true", "lora.rank_pattern={q_proj: 4}"], "lora.init",
     "use_rslora"),
    (["lora.init=pissa", "quantization.mode=int8"], "lora.init", "quantization.mode"),
    (["lora.rank_pattern={q_proj: 0}"], "lora.rank_pattern", "not positive"),
    (["lora.adapter_name=my.adapter"], "lora.adapter_name", "plain name"),
    (["lora.method=dora"], "lora.method", "lora"),
    (["lora.init=loftq"], "lora.init", "default"),
])
def test_bad_combinations_are_refused_with_field_cause_and_fix(sets, field, says):
    message = _refused(*sets)
    assert field in message and says in message and "Fix" in message, message


def test_each_method_has_a_peft_config_with_the_mapped_fields():
    pytest.importorskip("peft")
    c = adapters.peft_config(_lora("lora.use_dora=true", "lora.use_rslora=true",
                                   "lora.init=gaussian", "lora.bias=lora_only",
                                   "lora.rank_pattern={q_proj: 4}", "lora.alpha=32"))
    assert (type(c).__name__, c.use_dora, c.use_rslora, c.init_lora_weights, c.bias,
            c.rank_pattern, c.lora_alpha) == ("LoraConfig", True, True, "gaussian",
                                              "lora_only", {"q_proj": 4}, 32)
    assert adapters.peft_config(_lora()).init_lora_weights is True
    c = adapters.peft_config(_lora("lora.method=loha", "lora.dropout=0.1",
                                   "lora.module_dropout=0.2"))
    assert (type(c).__name__, c.rank_dropout, c.module_dropout) == ("LoHaConfig", 0.1, 0.2)
    assert type(adapters.peft_config(_lora("lora.method=lokr"))).__name__ == "LoKrConfig"
    c = adapters.peft_config(_lora("lora.method=ia3", "lora.target_modules=[k_proj, down_proj]",
                                   "lora.feedforward_modules=[down_proj]"))
    assert (type(c).__name__, c.feedforward_modules) == ("IA3Config", {"down_proj"})
    assert str(c.task_type) in ("CAUSAL_LM", "TaskType.CAUSAL_LM")


# ------------------------------------------------------------------ module matching

def _check(*sets):
    check_target_modules(_lora(*sets), TENSORS)


def _targeted(*sets):
    linears = linear_modules(TENSORS)
    return adapters.targeted_names(_lora(*sets), [m.name for m in linears],
                                   [m.name for m in linears if not m.in_block])


def test_targets_follow_peft_rules():
    assert len(_targeted()) == 14 and not any("lm_head" in n for n in _targeted())
    assert len(_targeted("lora.target_modules=[q_proj, v_proj]")) == 4
    assert _targeted(r"lora.target_modules=.*\.layers\.1\.self_attn\.q_proj") == [
        "model.layers.1.self_attn.q_proj"]
    assert len(_targeted("lora.exclude_modules=[down_proj]")) == 12
    assert len(_targeted(r"lora.exclude_modules=.*\.mlp\..*")) == 8
    assert {n.split(".")[2] for n in _targeted("lora.layers_to_transform=[1]")} == {"1"}
    assert len(_targeted("lora.modules_to_save=[q_proj]")) == 12  # never both


@pytest.mark.parametrize("sets, field, says", [
    (["lora.target_modules=[q_proj, query]"], "lora.target_modules", "['query']"),
    (["lora.target_modules=q_proj|v_proj"], "lora.target_modules", "whole module path"),
    (["lora.exclude_modules=[dense]"], "lora.exclude_modules", "['dense']"),
    (["lora.target_modules=[q_proj]", "lora.exclude_modules=[v_proj]"], "lora.exclude_modules",
     "exclude none"),
    ([r"lora.exclude_modules=.*_proj"], "lora.exclude_modules", "no module"),
    (["lora.layers_to_transform=[0, 5]"], "lora.layers_to_transform", "[5]"),
    (["lora.rank_pattern={query: 4}"], "lora.rank_pattern", "['query']"),
    (["lora.modules_to_save=[classifier]"], "lora.modules_to_save", "lm_head"),
    (["lora.method=ia3", "lora.feedforward_modules=[fc2]"], "lora.feedforward_modules", "fc2"),
])
def test_selectors_that_match_nothing_list_the_linear_module_names(sets, field, says):
    with pytest.raises(ProfileError) as err:
        _check(*sets)
    message = str(err.value)
    assert field in message and says in message and "Fix" in message, message
    if field == "lora.target_modules":
        assert "q_proj" in message.split("names from:")[1] and "down_proj" in message


def test_memory_estimate_counts_each_methods_parameters():
    from tests.unit.test_memory_estimate import LLAMA_3_2_1B, llama_tensors

    tensors = llama_tensors(LLAMA_3_2_1B)
    shape = {"ia3": ["lora.r=8", "lora.alpha=16"]}  # the preset's r 16 is LoRA's
    est = {m: estimate_training_memory(
        load_profile("llama-3.2-1b-lora", [f"lora.method={m}", "lora.dropout=0",
                                           *shape.get(m, [])]),
        tensors, LLAMA_3_2_1B).adapter_parameters for m in ("lora", "loha", "lokr", "ia3")}
    assert est["loha"] == 2 * est["lora"]
    assert est["ia3"] < est["lokr"] < est["lora"]
    regex = estimate_training_memory(
        load_profile("llama-3.2-1b-lora", [r"lora.target_modules=.*\.layers\.0\.self_attn\.q_proj"]),
        tensors, LLAMA_3_2_1B).adapter_parameters
    assert regex == 16 * (2048 + 2048)       # r 16, one 2048×2048 module


# ------------------------------------------------------------------ continuation contract

SEEDED = __import__("json").loads(seed_adapters.adapter_config_json("0" * 40))


def _linears():
    linears = linear_modules(TENSORS)
    return [m.name for m in linears], [m.name for m in linears if not m.in_block]


def test_the_quickstart_lora_section_describes_the_seeded_adapter():
    assert adapters.structure_mismatches(_lora(), SEEDED, *_linears()) == []
    assert adapters.structure_mismatches(
        _lora("lora.target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
              "down_proj]", "lora.dropout=0.1", "lora.adapter_name=x"), SEEDED, *_linears()) == []


@pytest.mark.parametrize("sets, says", [
    (["lora.r=4"], "lora.r: 4, the adapter has 8"),
    (["lora.alpha=32"], "lora.alpha: 32, the adapter has 16"),
    (["lora.use_rslora=true"], "lora.use_rslora"),
    (["lora.exclude_modules=[down_proj]"], "only in the adapter: ['down_proj']"),
    (["lora.layers_to_transform=[0]"], "adapts 7 modules, the adapter 14"),
    (["lora.method=loha"], "lora.method: loha, the adapter is lora"),
    (["lora.modules_to_save=[lm_head]"], "lora.modules_to_save"),
])
def test_a_different_adapter_shape_is_named(sets, says):
    wrong = adapters.structure_mismatches(_lora(*sets), SEEDED, *_linears())
    assert any(says in w for w in wrong), wrong


# ------------------------------------------------------------------ Conv1D and tied heads
# Tiny real transformers models (random weights): what preflight reads from their headers
# and config.json must select exactly the modules peft itself adapts.

def _tiny(arch: str, tmp_path):
    """A tiny model of localhub.seed_arch saved to disk: (directory, config.json, headers)."""
    import json

    from localhub.seed_arch import ARCHS, build

    directory = build(ARCHS[arch], tmp_path / arch)
    config = json.loads((directory / "config.json").read_text())
    return directory, config, read_safetensors_headers(directory)


def _peft_targets(directory, lora):
    """peft's own choice of modules on the loaded model, with loraflow's peft config."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(directory))
    model = get_peft_model(base, adapters.peft_config(lora, "causal-lm", base))
    return model, sorted(model.targeted_module_names)


@pytest.mark.parametrize("sets", [[], ["lora.target_modules=[c_attn]"],
                                  ["lora.target_modules=[c_fc, c_proj]"]])
def test_gpt2_conv1d_layers_are_targets_in_preflight_and_in_peft(sets, tmp_path):
    import warnings

    directory, config, tensors = _tiny("arch-gpt2", tmp_path)
    lora = _lora(*sets)
    check_target_modules(lora, tensors, config)  # no "only lm_head exists"
    linears = linear_modules(tensors, config)
    ours = sorted(adapters.targeted_names(lora, [m.name for m in linears],
                                          [m.name for m in linears if not m.in_block]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # peft's fan_in_fan_out flip warns
        model, theirs = _peft_targets(directory, lora)
    assert ours == theirs and ours
    assert model.peft_config["default"].fan_in_fan_out is True
    # The loaded model's scan (what training checks) agrees as well.
    assert sorted(adapters.targeted_names(lora, *adapters.model_modules(model)[:2])) == theirs


def test_conv1d_shapes_are_read_in_out_and_the_estimate_counts_peft_parameters(tmp_path):
    directory, config, tensors = _tiny("arch-gpt2", tmp_path)
    c_fc = next(m for m in linear_modules(tensors, config) if m.leaf == "c_fc")
    assert (c_fc.in_features, c_fc.out_features) == (64, 256)   # Conv1D weight is [in, out]
    profile = load_profile("quickstart", ["model.dtype=float32"])
    model, _ = _peft_targets(directory, profile.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    estimate = estimate_training_memory(profile, tensors, config, on_gpu=False)
    assert estimate.adapter_parameters == trainable


@pytest.mark.parametrize("arch", ["arch-llama-tied", "arch-qwen2", "arch-gemma", "arch-gpt2"])
@pytest.mark.parametrize("sets", [["lora.target_modules=[q_proj, v_proj, lm_head]"],
                                  ["lora.modules_to_save=[lm_head]"]])
def test_a_tied_head_passes_preflight_and_peft_adapts_it(arch, sets, tmp_path):
    directory, config, tensors = _tiny(arch, tmp_path)
    assert "lm_head.weight" not in tensors and config["tie_word_embeddings"] is True
    if arch == "arch-gpt2":
        sets = [s.replace("q_proj, v_proj", "c_attn") for s in sets]
    lora = _lora(*sets)
    check_target_modules(lora, tensors, config)  # was: "name no module"
    head = next(m for m in linear_modules(tensors, config) if m.name == "lm_head")
    assert head.tied_to and head.out_features == config["vocab_size"]
    linears = linear_modules(tensors, config)
    ours = sorted(adapters.targeted_names(lora, [m.name for m in linears],
                                          [m.name for m in linears if not m.in_block]))
    model, theirs = _peft_targets(directory, lora)
    assert ours == theirs
    if lora.modules_to_save:
        saved = [n for n, _ in model.named_modules() if n.endswith("lm_head.modules_to_save")]
        assert saved and lora.modules_to_save == ["lm_head"]   # peft did not rewrite ours
    notes = adapters.adapter_notes(model, lora)
    assert any("ties lm_head" in n for n in notes), notes
    if lora.modules_to_save:
        count = config["vocab_size"] * tensors[head.tied_to + ".weight"][1][1]
        assert any(f"lm_head is saved in full (modules_to_save): {count:,} parameters" in n
                   for n in notes), notes


def test_a_tied_head_is_listed_only_where_the_task_s_class_has_one(tmp_path):
    _, config, tensors = _tiny("arch-llama", tmp_path)
    head = next(m for m in linear_modules(tensors, config) if m.name == "lm_head")
    assert head.tied_to is None                      # untied: the file's own lm_head
    _, config, tensors = _tiny("arch-qwen2", tmp_path)
    names = [m.name for m in linear_modules(tensors, config, "seq-classification")]
    assert "lm_head" not in names                    # Qwen2ForSequenceClassification: score
    assert "lm_head" in [m.name for m in linear_modules(tensors, config)]


def test_liger_stays_off_where_its_fused_loss_would_bypass_an_adapted_lm_head(monkeypatch):
    from tasks import preflight
    from tasks.contracts import Gpu
    from tasks.training import speed

    monkeypatch.setattr(speed, "liger_installed", lambda: True)  # a GPU machine with Liger
    monkeypatch.setattr(speed, "liger_model_types", lambda: frozenset({"llama", "qwen2"}))
    plain = load_profile("quickstart", [])
    assert speed.liger_expected(plain, cuda=True, processes=1, model_type="llama")
    assert not speed.liger_expected(plain, cuda=True, processes=1, model_type="gpt2")
    for sets in (["lora.target_modules=[q_proj, lm_head]"], ["lora.modules_to_save=[lm_head]"]):
        head = load_profile("quickstart", sets)
        assert not speed.liger_expected(head, cuda=True, processes=1, model_type="llama")
        forced = load_profile("quickstart", [*sets, "training.liger_kernel=true"])
        monkeypatch.setattr(preflight, "_installed", lambda module: True)
        gpu = Gpu(index=0, name="H200", total_bytes=140 * 2**30, free_bytes=140 * 2**30)
        with pytest.raises(ProfileError, match="training.liger_kernel: true, and the adapter"):
            preflight.check_loading_options(forced, [gpu])


@pytest.mark.parametrize("sets", [["lora.target_modules=[q_proj, lm_head]"],
                                  ["lora.modules_to_save=[lm_head]"]])
def test_a_merged_export_of_a_tied_head_is_untied_and_reproduces_the_adapter(sets, tmp_path,
                                                                              monkeypatch):
    import json
    import shutil

    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from tasks import errors, merge
    from tasks.contracts import SnapshotManifest, TrainResult

    directory, _, _ = _tiny("arch-llama-tied", tmp_path)
    profile = load_profile("quickstart", sets)
    base = AutoModelForCausalLM.from_pretrained(str(directory))
    model = get_peft_model(base, adapters.peft_config(profile.lora, "causal-lm", base))
    with torch.no_grad():  # a "trained" adapter: every tensor moved
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    adapters.save_adapter(model, tmp_path / "run" / "adapter")
    train = TrainResult.model_construct(run_dir=str(tmp_path / "run"),
                                        adapter_dir=str(tmp_path / "run" / "adapter"))
    snapshot = SnapshotManifest.model_construct(local_dir=str(directory))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    fresh = AutoModelForCausalLM.from_pretrained(str(directory))
    peft_model = PeftModel.from_pretrained(fresh, train.adapter_dir).eval()
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits

    out = merge.merge_adapter(train, snapshot, profile)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()   # 16-bit export

    if profile.lora.modules_to_save is None:
        # Merging a LoRA into the shared weight (what merge_and_unload does on a tied
        # model) changes the embeddings too: refused, not published.
        monkeypatch.setattr(merge, "_untie_adapted_head", lambda m: False)
        shutil.rmtree(out)
        with pytest.raises(errors.PublishError, match="publish.merged: merging"):
            merge.merge_adapter(train, snapshot, profile)
        assert not out.exists()
