"""The adapter: the `lora` section → a peft config, which modules it adapts, and the
ways an adapter gets onto a model (fresh, continued from a file, a second named adapter,
several adapter types together for inference).

The module matching here is peft's rule written without torch, so preflight can check
the profile against the safetensors headers before any weight is read, and the loaded
model is checked again with the same function. tasks.training.modeling.py keeps the loading and
the k-bit preparation; it calls `attach_adapter` for the peft part.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterable, Optional

from profiles.schema import METHOD_FIELDS, LoraSection
from tasks import errors

# peft_type in adapter_config.json ↔ lora.method.
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "LOHA": "loha", "LOKR": "lokr"}
# peft's mixed mode (PeftMixedModel) takes these types only.
MIXABLE = ("lora", "loha", "lokr")
INIT_LORA_WEIGHTS = {"default": True, "gaussian": "gaussian", "pissa": "pissa",
                     "olora": "olora"}
# What the training of a continued adapter cannot change: its shape and how it scales.
STRUCTURE = ("r", "alpha", "bias", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# peft's rule for a module's block index (layers_to_transform without layers_pattern).
_LAYER_RE = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


# ------------------------------------------------------------------ module matching

def leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _selects(selector, name: str) -> bool:
    """peft's target_modules / exclude_modules rule: a string is a regex that must match
    the whole module path; a list entry matches the path or its last segments."""
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return name in selector or any(name.endswith("." + s) for s in selector)


def _to_save(modules_to_save, name: str) -> bool:
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save or ())


def _pattern_key(pattern: dict, name: str) -> Optional[str]:
    """The rank_pattern / alpha_pattern key peft applies to `name` (first match)."""
    return next((k for k in pattern if re.match(rf"(.*\.)?({k})$", name)), None)


def resolved_targets(lora: LoraSection, linears: list[str], heads: Iterable[str] = ()):
    """target_modules as peft uses it: 'all-linear' becomes the leaf names of every linear
    module except the output head(s)."""
    if lora.target_modules != "all-linear":
        return lora.target_modules
    head_leaves = {leaf(h) for h in heads}
    return sorted({leaf(n) for n in linears if n not in heads} - head_leaves)


def leaf_named_targets(lora: LoraSection, base) -> LoraSection:
    """lora with 'all-linear' written out as the sorted leaf names peft would wrap, where
    they select exactly the modules 'all-linear' does (peft expands 'all-linear' to full
    module paths in adapter_config.json; leaf names are the convention there and read the
    same on every run). Kept as 'all-linear' where a leaf name would also pick an excluded
    output head — except with layers_to_transform, which peft takes with a list of names
    only, and IA3, whose own config check refuses full paths next to leaf-named
    feedforward_modules.

    Args:
        lora: the profile's lora section, target_modules 'all-linear'.
        base: the loaded transformers model.
    Returns:
        The section to build the peft config from.
    """
    linears, heads, _ = model_modules(base)
    leaves = lora.model_copy(update={"target_modules": resolved_targets(lora, linears, heads)})
    if lora.layers_to_transform is not None or lora.method == "ia3":
        return leaves
    paths = lora.model_copy(update={"target_modules": [n for n in linears if n not in heads]})
    same = targeted_names(leaves, linears) == targeted_names(paths, linears)
    return leaves if same else lora


def targeted_names(lora: LoraSection, linears: list[str], heads: Iterable[str] = ()) -> list[str]:
    """The linear modules (full paths) the adapter wraps, by peft's rules: target_modules,
    then exclude_modules, modules_to_save (never both) and layers_to_transform."""
    targets = resolved_targets(lora, linears, heads)
    out = []
    for name in linears:
        if lora.exclude_modules and _selects(lora.exclude_modules, name):
            continue
        if _to_save(lora.modules_to_save, name) or not _selects(targets, name):
            continue
        if lora.layers_to_transform is not None and not isinstance(targets, str):
            m = _LAYER_RE.match(name)
            if m is None or int(m["idx"]) not in lora.layers_to_transform:
                continue
        out.append(name)
    return out


def _names_hint(linears: list[str]) -> str:
    return ", ".join(sorted({leaf(n) for n in linears}))


def check_modules(lora: LoraSection, linears: list[str], heads: Iterable[str] = (),
                  modules: Optional[list[str]] = None, what: str = "this model") -> list[str]:
    """Refuse module selectors that match nothing, listing the model's linear modules.

    Args:
        lora: the profile's lora section.
        linears: full paths of the model's linear modules.
        heads: the output head(s) 'all-linear' leaves out.
        modules: every module path (for modules_to_save); None: not checked.
        what: how the model is named in messages.
    Returns:
        The targeted module paths.
    Raises:
        ProfileError: naming the field, what matched nothing and the names that exist.
    """
    heads = list(heads)
    names = _names_hint(linears)
    example = next((n for n in linears if n not in heads), linears[0] if linears else "")
    targets = resolved_targets(lora, linears, heads)
    if isinstance(targets, str):
        if not any(_selects(targets, n) for n in linears):
            raise errors.ProfileError(
                f"lora.target_modules: the regex '{targets}' matches no linear module of "
                f"{what} (a regex must match the whole module path, e.g. '{example}'). Fix: "
                f"change the regex, or use 'all-linear' or a list of names from: {names}.")
    else:
        unknown = [t for t in targets if not any(_selects([t], n) for n in linears)]
        if unknown:
            raise errors.ProfileError(
                f"lora.target_modules: {unknown} match no linear module of {what}. Fix: use "
                f"'all-linear' or names from: {names}.")
    candidates = [n for n in linears if _selects(targets, n)]
    excl = lora.exclude_modules
    if isinstance(excl, str) and not any(_selects(excl, n) for n in candidates):
        raise errors.ProfileError(
            f"lora.exclude_modules: the regex '{excl}' excludes none of the targeted modules "
            f"of {what} (it must match a whole path, e.g. '{candidates[0]}'). Fix: change "
            f"it or remove it; targeted names: {_names_hint(candidates)}.")
    if isinstance(excl, list):
        idle = [e for e in excl if not any(_selects([e], n) for n in candidates)]
        if idle:
            raise errors.ProfileError(
                f"lora.exclude_modules: {idle} exclude none of the targeted modules of "
                f"{what}. Fix: use names from: {_names_hint(candidates)}, or remove them.")
    if modules is not None and lora.modules_to_save:
        missing = [m for m in lora.modules_to_save if not any(_to_save([m], n) for n in modules)]
        if missing:
            tops = sorted({leaf(n) for n in modules if n and "." not in n}
                          | {leaf(n) for n in linears if n in heads})
            raise errors.ProfileError(
                f"lora.modules_to_save: {missing} name no module of {what}. Fix: use module "
                f"names such as {', '.join(tops) or 'lm_head'}.")
    if lora.layers_to_transform is not None:
        blocks = sorted({int(m["idx"]) for n in candidates if (m := _LAYER_RE.match(n))})
        bad = [i for i in lora.layers_to_transform if i not in blocks]
        if bad:
            raise errors.ProfileError(
                f"lora.layers_to_transform: {bad} are not blocks of {what} (its targeted "
                f"modules sit in blocks {blocks}). Fix: use indices from that list.")
    chosen = targeted_names(lora, linears, heads)
    if not chosen:
        raise errors.ProfileError(
            "lora.exclude_modules / lora.modules_to_save: together they leave no module of "
            f"{what} to adapt. Fix: exclude fewer modules; linear names: {names}.")
    for field in ("rank_pattern", "alpha_pattern"):
        idle = [k for k in (getattr(lora, field) or {})
                if not any(_pattern_key({k: 0}, n) for n in chosen)]
        if idle:
            raise errors.ProfileError(
                f"lora.{field}: keys {idle} match none of the adapted modules of {what}. "
                f"Fix: use names from: {_names_hint(chosen)}.")
    if lora.method == "ia3" and lora.feedforward_modules:
        idle = [f for f in lora.feedforward_modules if not any(_selects([f], n) for n in chosen)]
        if idle:
            raise errors.ProfileError(
                f"lora.feedforward_modules: {idle} are not among the adapted modules of "
                f"{what}. Fix: use names from: {_names_hint(chosen)}.")
    return chosen


def adapter_param_count(lora: LoraSection, name: str, in_features: int,
                        out_features: int) -> int:
    """Trainable parameters the adapter adds to one linear module (memory estimate)."""
    r = (lora.rank_pattern or {}).get(_pattern_key(lora.rank_pattern or {}, name), lora.r)
    if lora.method == "ia3":
        ff = lora.feedforward_modules or ["down_proj", "fc2", "c_proj", "wo"]
        return in_features if _selects(ff, name) else out_features
    if lora.method == "loha":
        return 2 * r * (in_features + out_features)
    if lora.method == "lokr":
        return r * (in_features + out_features) // 4 + 64
    extra = out_features if lora.use_dora else 0
    return r * (in_features + out_features) + extra


# ------------------------------------------------------------------ the loaded model

def model_modules(model) -> tuple[list[str], list[str], list[str]]:
    """(linear module paths, output head paths, every module path) of a transformers
    model; inside a peft model, an adapted layer counts as the linear it wraps.
    transformers' Conv1D (GPT-2 family) counts as linear, as peft's 'all-linear' does."""
    import torch
    from transformers.pytorch_utils import (
        Conv1D,  # GPT-2 family: a linear stored [in, out]
    )

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        BaseTunerLayer = ()  # noqa: N806
    linears, modules, wrapped = [], [], []
    for name, module in base.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue  # the adapter's own parts and the wrapped base layer
        modules.append(name)
        if isinstance(module, BaseTunerLayer):
            wrapped.append(name)
            linears.append(name)
        elif isinstance(module, (torch.nn.Linear, Conv1D)) or "Linear" in type(module).__name__:
            linears.append(name)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    heads = [n for n, m in base.named_modules() if head is not None and m is head]
    return linears, heads, modules


def linear_module_names(model) -> list[str]:
    """Distinct leaf names of the model's linear layers (what target_modules can match)."""
    return sorted({leaf(n) for n in model_modules(model)[0]})


def check_target_modules(model, lora: LoraSection) -> list[str]:
    """check_modules on a loaded model; returns the module paths the adapter wraps."""
    linears, heads, modules = model_modules(model)
    return check_modules(lora, linears, heads, modules, what=type(model).__name__)


def _peft_task_type(task: str):
    try:
        from tasks.model_tasks import peft_task_type
    except ImportError:  # pragma: no cover - before task types existed
        from peft import TaskType

        return TaskType.CAUSAL_LM
    return peft_task_type(task)


def _weight_of(module):
    """The weight of a module, through peft's wrappers (LoRA layer, modules_to_save)."""
    for attr in ("base_layer", "original_module"):
        module = getattr(module, attr, module)
    return getattr(module, "weight", None)


def tied_embeddings(model) -> bool:
    """Whether the model's output head shares its weight with the input embeddings
    (tie_word_embeddings: Llama-3.2-1B, Qwen2, Gemma, GPT-2, T5, …)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        head, emb = base.get_output_embeddings(), base.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    if head is None or emb is None:
        return False
    weight, source = _weight_of(head), _weight_of(emb)  # through peft's wrappers
    return weight is not None and source is not None and weight is source


def touches_tied(model, lora: LoraSection) -> bool:
    """Whether the adapter adapts or saves the tied head or input embeddings."""
    if not tied_embeddings(model):
        return False
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    emb = base.get_input_embeddings()
    names = {n for n, m in base.named_modules() if m is head or m is emb}
    leaves = {leaf(n) for n in names} | set(EMBEDDING_LAYER_NAMES)
    targets = lora.target_modules
    if isinstance(targets, str):
        targeted = targets != "all-linear" and any(re.fullmatch(targets, n) for n in names)
    else:
        targeted = any(t in leaves or t in names for t in targets)
    saved = any(_to_save([m], n) for m in lora.modules_to_save or () for n in names)
    return targeted or saved


def peft_config(lora: LoraSection, task: str = "causal-lm", model=None):
    """The peft config of the profile's method: the one mapping from `lora.*`.

    Fields a method has no use for are not passed (the schema refuses them when set).
    With the base `model`: `fan_in_fan_out` when a targeted layer is transformers'
    Conv1D (GPT-2 family), as peft expects it (it would otherwise warn and flip it per
    layer).

    Tied embeddings (lm_head sharing the input embeddings' weight) get *untied*
    adapters: a LoRA on lm_head, or its copy in modules_to_save, changes the head only,
    and the input embeddings stay the base's. peft's `ensure_weight_tying` (one adapter
    for both) was not chosen: with it the tied LoRA weights are transposed views that a
    plain safetensors save refuses, a second adapter loaded next to the first
    (verification) does not reproduce it, and merging doubles the delta. adapter_notes
    says this in the card; tasks/merge.py unties the merged export.
    """
    import peft

    # Copies: peft rewrites modules_to_save / target_modules in place for tied models.
    listed = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    common = dict(target_modules=listed(lora.target_modules),
                  exclude_modules=listed(lora.exclude_modules),
                  modules_to_save=listed(lora.modules_to_save), task_type=_peft_task_type(task))
    layout = {}
    if model is not None and lora.method in ("lora", "ia3") and _targets_conv1d(model, lora):
        layout["fan_in_fan_out"] = True
    if lora.method == "ia3":
        return peft.IA3Config(feedforward_modules=lora.feedforward_modules, **common, **layout)
    shaped = dict(layers_to_transform=lora.layers_to_transform,
                  rank_pattern=dict(lora.rank_pattern or {}),
                  alpha_pattern=dict(lora.alpha_pattern or {}), **common)
    if lora.method == "lora":
        return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                               bias=lora.bias, use_rslora=lora.use_rslora,
                               use_dora=lora.use_dora,
                               init_lora_weights=INIT_LORA_WEIGHTS[lora.init], **shaped,
                               **layout)
    cls = peft.LoHaConfig if lora.method == "loha" else peft.LoKrConfig
    return cls(r=lora.r, alpha=lora.alpha, rank_dropout=lora.dropout,
               module_dropout=lora.module_dropout, **shaped)


def adapter_notes(model, lora: LoraSection) -> list[str]:
    """Sentences for the model card about what the adapter does to the model's layout
    that the adapter_config alone does not tell a reader: the cost of heads saved in
    full, tied embeddings, GPT-2-style Conv1D layers.

    Written by hand (no library renders these); the numbers come from the model.

    Args:
        model: the base model, or the peft model built on it.
        lora: the profile's lora section.
    Returns:
        Card sentences, possibly none.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    notes: list[str] = []
    named = dict(base.named_modules())
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    head_name = next((n for n, m in named.items() if head is not None and m is head), None)
    emb_name = next((n for n, m in named.items() if emb is not None and m is emb), None)
    tied = tied_embeddings(base)
    for wanted in lora.modules_to_save or ():
        for name, module in named.items():
            if not _to_save([wanted], name) or any(_to_save([wanted], p) for p in named
                                                   if name.startswith(p + ".")):
                continue
            weights = [p for p in (module.original_module if hasattr(module, "original_module")
                                   else module).parameters()]
            count = sum(p.numel() for p in weights)
            if not count:
                continue
            size = sum(p.numel() * p.element_size() for p in weights)
            dtype = str(weights[0].dtype).replace("torch.", "")
            notes.append(f"{name} is saved in full (modules_to_save): {count:,} parameters, "
                         f"{size / 1e6:.1f} MB in {dtype}, in the adapter file and in "
                         "memory while training (weights, gradients and optimizer state).")
    if tied and touches_tied(base, lora):
        notes.append(
            f"The base ties {head_name} to {emb_name} (tie_word_embeddings: one weight for "
            f"both). This adapter changes {head_name} only; {emb_name} keeps the base's "
            f"weights. Loaded with peft on the base, that is what runs; a merged export "
            f"unties them (tie_word_embeddings false, {head_name} saved as its own weight).")
    from transformers.pytorch_utils import Conv1D

    linears, heads, _ = model_modules(base)
    chosen = set(targeted_names(lora, linears, heads))
    conv = sorted({leaf(n) for n, m in named.items() if n in chosen and isinstance(m, Conv1D)})
    if conv:
        notes.append(f"{', '.join(conv)} are transformers Conv1D layers (weights stored "
                     "[in, out]); the adapter is configured with fan_in_fan_out=true for them.")
    return notes


def _targets_conv1d(model, lora: LoraSection) -> bool:
    from transformers.pytorch_utils import Conv1D

    linears, heads, _ = model_modules(model)
    chosen = set(targeted_names(lora, linears, heads))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return any(isinstance(m, Conv1D) for n, m in base.named_modules() if n in chosen)


def attach_adapter(base, lora: LoraSection, task: str = "causal-lm",
                   continue_from: Optional[str] = None):
    """get_peft_model with the profile's adapter, or — `continue_from`, a directory with
    adapter_config.json and adapter_model.safetensors — that adapter, trainable.

    A continued adapter is built from the profile's config (preflight checked that its
    shape is the file's) and must then hold exactly the file's tensors: a key the model
    lacks, or one left unloaded, is an error rather than a silently fresh tensor.

    Raises:
        ProfileError: low_cpu_mem_usage for a fresh adapter; TrainingError: the file's
            tensors do not fill the adapter.
    """
    from peft import PeftModel, get_peft_model

    if lora.target_modules == "all-linear":
        lora = leaf_named_targets(lora, base)
    config = peft_config(lora, task, base)
    if continue_from is None:
        if lora.low_cpu_mem_usage:
            raise errors.ProfileError(
                "lora.low_cpu_mem_usage: it creates the adapter's weights empty, to be filled "
                "from a saved adapter, and a fresh adapter has none (training would start "
                "from uninitialised weights). Fix: set it to false, or point model.id at an "
                "adapter repo to continue.")
        return get_peft_model(base, config, adapter_name=lora.adapter_name,
                              autocast_adapter_dtype=lora.autocast_adapter_dtype)
    try:
        model = PeftModel.from_pretrained(
            base, continue_from, adapter_name=lora.adapter_name, is_trainable=True,
            config=config, autocast_adapter_dtype=lora.autocast_adapter_dtype,
            low_cpu_mem_usage=lora.low_cpu_mem_usage)
    except RuntimeError as exc:  # torch's load_state_dict: tensor shapes differ
        raise errors.TrainingError(
            f"the adapter in {continue_from} does not fit the adapter the lora section "
            f"describes ({str(exc).splitlines()[-1].strip()}). Fix: make lora.r, "
            "lora.target_modules etc. those of the adapter being continued.") from None
    _check_loaded(model, lora.adapter_name, Path(continue_from) / ADAPTER_WEIGHTS)
    return model


def _check_loaded(model, adapter_name: str, weights: Path) -> None:
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(weights))
    # save_embedding_layers False, as save_adapter saves: no base weights of a targeted
    # lm_head / embedding ("auto" would add them, and ask the Hub for the base config).
    held = get_peft_model_state_dict(model, adapter_name=adapter_name,
                                     save_embedding_layers=False)
    missing = sorted(set(held) - set(saved))
    extra = sorted(set(saved) - set(held))
    differ = sorted(k for k in set(held) & set(saved)
                    if not torch.equal(held[k].detach().cpu().to(saved[k].dtype), saved[k]))
    if missing or extra or differ:
        raise errors.TrainingError(
            f"the adapter in {weights.parent} does not fill the model's adapter: "
            f"{len(missing)} tensors not in the file (e.g. {missing[:1]}), {len(extra)} in the "
            f"file but not in the model (e.g. {extra[:1]}), {len(differ)} loaded with other "
            "values. Fix: make the lora section describe that adapter (method, r, "
            "target_modules, …).")


def add_named_adapter(model, lora: LoraSection, task: str = "causal-lm"):
    """A further adapter, `lora.adapter_name`, on a peft model, made the active (and only
    trainable) one; the others keep their weights.

    Raises:
        ProfileError: the name is taken, or the method differs from the model's adapters
            (one PeftModel holds one method; see load_mixed for inference).
    """
    name = lora.adapter_name
    if name in model.peft_config:
        raise errors.ProfileError(
            f"lora.adapter_name: '{name}' is already an adapter of this model "
            f"({', '.join(model.peft_config)}). Fix: give the new adapter another name.")
    have = {PEFT_TYPES.get(c.peft_type.value, c.peft_type.value) for c in model.peft_config.values()}
    if have != {lora.method}:
        raise errors.ProfileError(
            f"lora.method: this model's adapters are {sorted(have)}, and one peft model holds "
            f"one method. Fix: set lora.method to {sorted(have)[0]}, or load adapters of "
            "different types together with load_mixed (inference only).")
    check_target_modules(model, lora)
    model.add_adapter(name, peft_config(lora, task, model))
    model.set_adapter(name)
    return model


# ------------------------------------------------------------------ saving and loading

def converts_on_save(lora: LoraSection) -> bool:
    """pissa / olora rewrite the base weights; their adapter is saved as the difference
    from its initial value, a plain LoRA of rank 2r that loads on the original base."""
    return lora.method == "lora" and lora.init in ("pissa", "olora")


def _flatten(directory: Path, adapter_name: str) -> None:
    # peft saves an adapter not named "default" in a sub-folder of that name.
    sub = directory / adapter_name
    if adapter_name != "default" and sub.is_dir():
        for p in sub.iterdir():
            shutil.move(str(p), str(directory / p.name))
        sub.rmdir()


def save_initial_adapter(model, lora: LoraSection, directory) -> Optional[str]:
    """For pissa / olora: the adapter as initialised, before training (what save_adapter
    subtracts); None for other inits. The directory's name becomes a temporary adapter
    name, so it must be a plain name."""
    if not converts_on_save(lora):
        return None
    directory = Path(directory)
    config = model.peft_config[lora.adapter_name]
    init = config.init_lora_weights
    config.init_lora_weights = True  # peft's recipe: saved as a plain LoRA initial state
    try:
        model.save_pretrained(str(directory), selected_adapters=[lora.adapter_name],
                              safe_serialization=True)
    finally:
        config.init_lora_weights = init
    _flatten(directory, lora.adapter_name)
    return str(directory)


def save_adapter(model, directory, adapter_name: str = "default",
                 base_repo: Optional[str] = None, base_commit: Optional[str] = None,
                 initial: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
    """save_pretrained of one adapter straight into `directory` (whatever its name),
    safetensors only; adapter_config.json names the base by Hub id and commit (not the
    local download folder), so the adapter can be continued or auto-loaded from the Hub.

    Args:
        initial: save_initial_adapter's directory (pissa / olora): the adapter is saved
            converted to plain LoRA.
        state_dict: the full state dict to take the weights from (FSDP's gathered one).
    """
    directory = Path(directory)
    config = model.peft_config[adapter_name]
    if base_repo is not None:
        config.base_model_name_or_path = base_repo
        config.revision = base_commit
    kwargs = {} if state_dict is None else {"state_dict": state_dict}
    # save_embedding_layers False: "auto" would ask the Hub for the base's config.json
    # (a network call while saving); loraflow never resizes the vocabulary.
    model.save_pretrained(str(directory), selected_adapters=[adapter_name],
                          safe_serialization=True, save_embedding_layers=False,
                          path_initial_model_for_weight_conversion=initial, **kwargs)
    _flatten(directory, adapter_name)


def load_named_adapters(base, adapters: dict[str, str]):
    """A PeftModel holding each saved adapter under its name (inference), the first
    active. Switch with model.set_adapter(name)."""
    from peft import PeftModel

    (first, path), *rest = adapters.items()
    model = PeftModel.from_pretrained(base, path, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    model.set_adapter(first)
    model.eval()
    return model


def adapter_method(directory) -> str:
    """lora.method of a saved adapter, from its adapter_config.json."""
    config = json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
    return PEFT_TYPES.get(config.get("peft_type"), str(config.get("peft_type")))


def load_mixed(base, adapters: dict[str, str]):
    """Adapters of different types (LoRA, LoHa, LoKr) active together on one base, with
    peft's mixed mode (PeftMixedModel): inference only — every parameter is frozen.

    Args:
        base: the base model, as the adapters were trained on it.
        adapters: name → directory of a saved adapter.
    Raises:
        ProfileError: an adapter type mixed mode cannot take (e.g. IA3).
    """
    from peft import PeftMixedModel

    methods = {name: adapter_method(path) for name, path in adapters.items()}
    bad = {n: m for n, m in methods.items() if m not in MIXABLE}
    if bad:
        raise errors.ProfileError(
            f"mixed adapters: {bad} cannot be mixed; peft's mixed mode takes "
            f"{', '.join(MIXABLE)} adapters. Fix: leave those out, or load them one at a "
            "time with load_named_adapters.")
    (first, path), *rest = adapters.items()
    model = PeftMixedModel.from_pretrained(base, path, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    model.set_adapter(list(adapters))
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


# ------------------------------------------------------------------ continuation

def continued_method(config: dict, repo_id: str = "the adapter") -> str:
    """loraflow's lora.method for a saved adapter_config.json; refused when loraflow does
    not train that peft type."""
    method = PEFT_TYPES.get(config.get("peft_type"))
    if method is None:
        raise errors.ProfileError(
            f"model.id: '{repo_id}' is a {config.get('peft_type')} adapter; loraflow continues "
            f"{', '.join(PEFT_TYPES)} adapters. Fix: pick one of those, or train a fresh "
            "adapter on its base.")
    return method


def section_from_adapter_config(config: dict) -> LoraSection:
    """The lora section that describes a saved adapter (adapter_config.json), for
    comparing with the profile's. Only the fields of its method are filled in."""
    method = continued_method(config)
    targets = config.get("target_modules")
    values = {
        "method": method,
        "target_modules": sorted(targets) if isinstance(targets, (list, set)) else targets,
        "exclude_modules": (sorted(config["exclude_modules"])
                            if isinstance(config.get("exclude_modules"), (list, set))
                            else config.get("exclude_modules")),
        "modules_to_save": config.get("modules_to_save"),
        "r": config.get("r"), "alpha": config.get("lora_alpha", config.get("alpha")),
        "bias": config.get("bias"), "use_rslora": config.get("use_rslora"),
        "use_dora": config.get("use_dora"),
        "rank_pattern": config.get("rank_pattern") or None,
        "alpha_pattern": config.get("alpha_pattern") or None,
        "feedforward_modules": config.get("feedforward_modules"),
        "layers_to_transform": config.get("layers_to_transform"),
    }
    if isinstance(values["layers_to_transform"], int):
        values["layers_to_transform"] = [values["layers_to_transform"]]
    if isinstance(values["feedforward_modules"], (list, set)):
        values["feedforward_modules"] = sorted(values["feedforward_modules"])
    allowed = METHOD_FIELDS[method]
    return LoraSection.model_construct(**{k: v for k, v in values.items()
                                          if v is not None and k in allowed})


def structure_mismatches(lora: LoraSection, config: dict, linears: list[str],
                         heads: Iterable[str] = ()) -> list[str]:
    """What the profile's lora section says differently from the adapter it continues:
    one line per field (field, profile value, adapter value). Compared: the method, the
    adapted modules (resolved on the base's linear modules), and the shape/scaling fields
    of the method; training-time settings (dropout, adapter_name, …) may differ."""
    saved = section_from_adapter_config(config)
    out = []
    if saved.method != lora.method:
        return [f"lora.method: {lora.method}, the adapter is {saved.method}"]
    ours = targeted_names(lora, linears, heads)
    theirs = targeted_names(saved, linears, heads)
    if ours != theirs:
        only_ours = sorted({leaf(n) for n in set(ours) - set(theirs)})
        only_theirs = sorted({leaf(n) for n in set(theirs) - set(ours)})
        out.append(f"lora.target_modules (with exclude_modules, layers_to_transform): adapts "
                   f"{len(ours)} modules, the adapter {len(theirs)} (only in the profile: "
                   f"{only_ours or '-'}; only in the adapter: {only_theirs or '-'}; the "
                   f"adapter's target_modules: {saved.target_modules})")
    for field in STRUCTURE:
        if field not in METHOD_FIELDS[lora.method]:
            continue
        mine, its = getattr(lora, field), getattr(saved, field)
        if (mine or None) != (its or None) and mine != its:
            out.append(f"lora.{field}: {mine!r}, the adapter has {its!r}")
    if lora.method == "ia3" and lora.feedforward_modules is not None and \
            sorted(lora.feedforward_modules) != (saved.feedforward_modules or []):
        out.append(f"lora.feedforward_modules: {lora.feedforward_modules}, the adapter has "
                   f"{saved.feedforward_modules}")
    missing = sorted(set(lora.modules_to_save or []) - set(saved.modules_to_save or []))
    if missing:
        out.append(f"lora.modules_to_save: {missing} are not saved with the adapter")
    return out


def name_base(model, adapter_name: str, repo_id: str, commit: str) -> None:
    """Name the base in the adapter's config by Hub id and commit, not the local download
    folder (what get_peft_model records), so the saved adapter can be continued or
    auto-loaded from the Hub. Call it after the last training checkpoint: with a Hub id
    there, peft's save asks the Hub for the base's config.json."""
    config = model.peft_config[adapter_name]
    config.base_model_name_or_path = repo_id
    config.revision = commit


def adapter_weights_path(directory) -> Optional[Path]:
    """adapter_model.safetensors in `directory`, or in its one sub-folder (peft saves an
    adapter not named "default" there: Trainer checkpoints of a named adapter)."""
    directory = Path(directory)
    if (directory / ADAPTER_WEIGHTS).is_file():
        return directory / ADAPTER_WEIGHTS
    found = sorted(directory.glob(f"*/{ADAPTER_WEIGHTS}"))
    return found[0] if len(found) == 1 else None


# LoRA factor pairs as peft names them: the update is B·A (lora_embedding_*: the same
# product for embeddings, where peft inits A, not B, with zeros).
LORA_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))


def _partner(name: str) -> str | None:
    """The other factor's tensor name (`….lora_A.weight` ↔ `….lora_B.weight`,
    `….lora_embedding_A` ↔ `….lora_embedding_B`), or None for a tensor of no pair."""
    import re

    swap = {x: y for a, b in LORA_PAIRS for x, y in ((a, b), (b, a))}
    match = re.search(r"\.(lora_(?:embedding_)?[AB])(?=\.|$)", name)
    if match is None:
        return None
    return name[:match.start(1)] + swap[match.group(1)] + name[match.end(1):]


def unchanged_tensors(current: dict, initial: dict, steps: int | None = None) -> list[str]:
    """Names of adapter tensors whose value equals their initial value.

    Args:
        current: tensor name → value after training.
        initial: tensor name → value before training.
        steps: optimizer steps taken. After exactly one, a LoRA factor whose partner
            started all zeros is not counted: the gradient of one factor of B·A is
            proportional to the other, so it was zero on that step.
    Returns:
        The names, in `initial`'s order.
    """
    import torch

    def exempt(name: str) -> bool:
        partner = _partner(name)
        return (steps == 1 and partner is not None and partner in initial
                and not bool(initial[partner].count_nonzero()))

    return [k for k, v in initial.items()
            if k in current and torch.equal(v, current[k].to(v.dtype)) and not exempt(k)]
