"""The `lora` section: what each peft method accepts, refused combinations, and the module
matching that preflight applies to the safetensors headers (no torch, no weights)."""
from __future__ import annotations

import pytest

from localhub import seed_adapters, seed_data
from profiles.loader import load_profile
from tasks import adapters, memory
from tasks.errors import ProfileError

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
    memory.check_target_modules(_lora(*sets), TENSORS)


def _targeted(*sets):
    linears = memory.linear_modules(TENSORS)
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
    est = {m: memory.estimate_training_memory(
        load_profile("llama-3.2-1b-lora", [f"lora.method={m}", "lora.dropout=0",
                                           *shape.get(m, [])]),
        tensors, LLAMA_3_2_1B).adapter_parameters for m in ("lora", "loha", "lokr", "ia3")}
    assert est["loha"] == 2 * est["lora"]
    assert est["ia3"] < est["lokr"] < est["lora"]
    regex = memory.estimate_training_memory(
        load_profile("llama-3.2-1b-lora", [r"lora.target_modules=.*\.layers\.0\.self_attn\.q_proj"]),
        tensors, LLAMA_3_2_1B).adapter_parameters
    assert regex == 16 * (2048 + 2048)       # r 16, one 2048×2048 module


# ------------------------------------------------------------------ continuation contract

SEEDED = __import__("json").loads(seed_adapters.adapter_config_json("0" * 40))


def _linears():
    linears = memory.linear_modules(TENSORS)
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
