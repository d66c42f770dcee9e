"""A model's tensors from its safetensors headers, and its linear modules (LoRA targets),
read without torch."""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tasks import errors

_BLOCK_RE = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<rest>.+)$")
TensorSpecs = dict[str, tuple[str, list[int]]]  # name → (safetensors dtype, shape)


def read_safetensors_headers(directory: str | Path) -> TensorSpecs:
    """Every tensor's dtype and shape from the headers of a local directory's shards."""
    specs: TensorSpecs = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                specs[name] = (info["dtype"], list(info["shape"]))
    return specs


def tensor_specs_from_hub(api, repo_id: str, commit: str) -> TensorSpecs:
    """The same from the Hub, reading only each shard's header (HTTP Range requests)."""
    meta = api.get_safetensors_metadata(repo_id, revision=commit)
    return {name: (t.dtype, list(t.shape))
            for f in meta.files_metadata.values() for name, t in f.tensors.items()}


@dataclass(frozen=True)
class Linear:
    name: str            # module path, e.g. model.layers.3.self_attn.q_proj
    in_features: int
    out_features: int
    in_block: bool       # inside the repeated decoder blocks
    tied_to: Optional[str] = None  # a head whose weight is this embedding's (not in the files)

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def _block_prefix(tensors: TensorSpecs) -> Optional[str]:
    """The prefix of the repeated decoder blocks (e.g. model.layers): the one with most
    distinct indices."""
    indices: dict[str, set] = {}
    for name in tensors:
        m = _BLOCK_RE.match(name)
        if m:
            indices.setdefault(m["prefix"], set()).add(m["index"])
    return max(indices, key=lambda p: len(indices[p])) if indices else None


def _block_stacks(tensors: TensorSpecs) -> dict[str, int]:
    """Every stack of repeated blocks and its length: one for a decoder (model.layers) or
    an encoder (encoder.layer), two for an encoder-decoder (encoder.block, decoder.block).
    A stack is a prefix with at least two indices, or the longest one."""
    indices: dict[str, set] = {}
    for name in tensors:
        m = _BLOCK_RE.match(name)
        if m:
            indices.setdefault(m["prefix"], set()).add(m["index"])
    primary = _block_prefix(tensors)
    return {p: len(i) for p, i in indices.items() if len(i) >= 2 or p == primary}


def _is_embedding(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return "embed" in leaf or leaf.endswith("_bias") or leaf in ("wte", "wpe", "shared")


def linear_modules(tensors: TensorSpecs, config: Optional[dict] = None,
                   task: str = "causal-lm") -> list[Linear]:
    """2-D `.weight` tensors as linear modules; embeddings (and T5's relative-position
    bias tables, also embeddings) are excluded.

    With the model's config.json (`config`) and `model.task`: transformers' Conv1D
    weights (GPT-2 family) are read as stored, [in, out], the others as nn.Linear's
    [out, in]; and an output head tied to an embedding, which the files do not hold, is
    listed with the embedding's shape (tasks.task_types.tied_weight_keys).
    """
    from tasks.model_tasks import conv1d_modules, tied_weight_keys

    conv1d = conv1d_modules(config.get("model_type") or "") if config else frozenset()
    stacks = _block_stacks(tensors)
    out = []
    for name, (_, shape) in tensors.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        if _is_embedding(module):
            continue
        in_block = any(module.startswith(p + ".") for p in stacks)
        inp, outp = (shape[0], shape[1]) if module.rsplit(".", 1)[-1] in conv1d \
            else (shape[1], shape[0])
        out.append(Linear(module, in_features=inp, out_features=outp, in_block=in_block))
    for head, source in (tied_weight_keys(task, config) if config else {}).items():
        module = head[: -len(".weight")] if head.endswith(".weight") else None
        if source not in tensors and "." in source:
            # A checkpoint of the bare base model (openai-community/gpt2: `wte.weight`)
            # has no base-model prefix; transformers adds it when loading.
            source = source.split(".", 1)[1]
        if module is None or head in tensors or source not in tensors \
                or _is_embedding(module) or len(tensors[source][1]) != 2:
            continue
        vocab, hidden = tensors[source][1]
        out.append(Linear(module, in_features=hidden, out_features=vocab, in_block=False,
                          tied_to=source[: -len(".weight")]))
    return out


def module_paths(tensors: TensorSpecs, linears: list[Linear]) -> list[str]:
    """Every module path the weights imply (each tensor's parents), with the tied heads."""
    modules = {n.rsplit(".", 1)[0] for n in tensors if "." in n}
    modules |= {lin.name for lin in linears}
    modules |= {m.rsplit(".", i)[0] for m in list(modules) for i in range(1, m.count(".") + 1)}
    return sorted(modules)


def targeted(lora_targets, linears: list[Linear]) -> list[Linear]:
    """The modules peft's LoraConfig(target_modules=...) would wrap.

    all-linear: every linear layer except the output head (peft leaves lm_head out);
    a list: modules whose name is an entry or ends with '.' + entry. Given the whole
    lora section: also a regex, exclude_modules, layers_to_transform
    (tasks.adapters.targeted_names).
    """
    if hasattr(lora_targets, "target_modules"):
        from tasks.training.adapters import targeted_names

        chosen = set(targeted_names(lora_targets, [m.name for m in linears],
                                    [m.name for m in linears if not m.in_block]))
        return [m for m in linears if m.name in chosen]
    if lora_targets == "all-linear":
        return [m for m in linears if m.in_block]
    return [m for m in linears
            if any(m.name == t or m.name.endswith("." + t) for t in lora_targets)]


def check_fp8_target_modules(names: Optional[list[str]], tensors: TensorSpecs,
                             config: Optional[dict] = None, task: str = "causal-lm") -> None:
    """training.fp8_target_modules are leaf names of this model's linear layers (headers
    only, before the download; that they are LoRA layers too is checked when the adapter is
    injected, tasks.training.fp8).

    Raises:
        ProfileError: a name is no linear layer's leaf name (listing those that are)."""
    if not names:
        return
    leaves = sorted({m.leaf for m in linear_modules(tensors, config, task)})
    unknown = [n for n in names if n not in leaves]
    if unknown:
        raise errors.ProfileError(
            f"training.fp8_target_modules: {unknown} name no linear layer of this model (the "
            f"field takes leaf names: {', '.join(leaves)}). Fix: use those names, or null for "
            "every LoRA layer.")


def check_target_modules(lora_targets, tensors: TensorSpecs, config: Optional[dict] = None,
                         task: str = "causal-lm") -> None:
    """Refuse target module names that match nothing, listing the names that exist.

    Given the whole lora section: regexes, exclude_modules, layers_to_transform,
    rank/alpha patterns and modules_to_save too (tasks.adapters.check_modules). With
    `config` (config.json) and `task`, Conv1D layers and tied heads count as well."""
    linears = linear_modules(tensors, config, task)
    if hasattr(lora_targets, "target_modules"):
        from tasks.training.adapters import check_modules

        check_modules(lora_targets, [m.name for m in linears],
                      [m.name for m in linears if not m.in_block],
                      module_paths(tensors, linears))
        return
    if lora_targets == "all-linear":
        return
    unknown = [t for t in lora_targets
               if not any(m.name == t or m.name.endswith("." + t) for m in linears)]
    if unknown:
        names = sorted({m.leaf for m in linears})
        raise errors.ProfileError(
            f"lora.target_modules: {unknown} match no linear module of this model. "
            f"Fix: use 'all-linear' or names from: {', '.join(names)}.")
