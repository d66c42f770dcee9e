"""Deterministic content for the seeded adapter repo `tinylabs/tiny-llama-lora`: a LoRA adapter
(peft's file layout) for `tinylabs/tiny-llama`, so that a profile can point `model.id` at an adapter
repo and continue training it.

Like seed_data, a pure function of constants: the weights come from numpy's legacy RandomState and
are serialised by seed_data.safetensors_bytes, adapter_config.json is written by us with fixed key
order. Its `revision` is the seeded base commit, passed in by localhub.seed (it is derived from the
base's bytes, so it never moves either). lora_B is non-zero, unlike a fresh adapter's, so a test can
tell whether training started from these weights.
"""

from __future__ import annotations

import json

import numpy as np

from localhub.seed_data import (
    HEAD_DIM,
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    KV_HEADS,
    LAYERS,
    safetensors_bytes,
)

ADAPTER_REPO = "tinylabs/tiny-llama-lora"
BASE_REPO = "tinylabs/tiny-llama"
R, ALPHA = 8, 16
# Every linear layer of the blocks (what "all-linear" adapts), with (in, out) features.
MODULES = {
    "self_attn.q_proj": (HIDDEN, HEADS * HEAD_DIM),
    "self_attn.k_proj": (HIDDEN, KV_HEADS * HEAD_DIM),
    "self_attn.v_proj": (HIDDEN, KV_HEADS * HEAD_DIM),
    "self_attn.o_proj": (HEADS * HEAD_DIM, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTERMEDIATE),
    "mlp.up_proj": (HIDDEN, INTERMEDIATE),
    "mlp.down_proj": (INTERMEDIATE, HIDDEN),
}


def adapter_tensors() -> dict[str, np.ndarray]:
    """lora_A ~ N(0, 1/in) and lora_B ~ N(0, 0.02), named as peft saves a LoRA adapter of a
    LlamaForCausalLM, drawn in a fixed order from a fixed RandomState."""
    rs = np.random.RandomState(4321)
    t: dict[str, np.ndarray] = {}
    for i in range(LAYERS):
        for module, (n_in, n_out) in MODULES.items():
            p = f"base_model.model.model.layers.{i}.{module}"
            t[p + ".lora_A.weight"] = (rs.standard_normal((R, n_in)) / np.sqrt(n_in)).astype(np.float32)
            t[p + ".lora_B.weight"] = (rs.standard_normal((n_out, R)) * 0.02).astype(np.float32)
    return t


def adapter_config_json(base_commit: str) -> bytes:
    """adapter_config.json of a LoRA (r 8, alpha 16) on every block linear of the pinned base."""
    return (json.dumps({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": BASE_REPO,
        "revision": base_commit,
        "r": R,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": sorted(m.rsplit(".", 1)[1] for m in MODULES),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }, indent=2) + "\n").encode()


ADAPTER_README = f"""---
license: apache-2.0
library_name: peft
base_model: {BASE_REPO}
pipeline_tag: text-generation
tags:
- lora
- localhub
---

# tiny-llama-lora

A LoRA adapter (r {R}, alpha {ALPHA}, every linear layer of the blocks) for `{BASE_REPO}`, with
random weights. Seeded by localhub so that pipelines can rehearse continuing an adapter: point
`model.id` at this repo and training resumes from these weights on the base that
`adapter_config.json` names (repo and commit).
"""


def adapter_files(base_commit: str) -> dict[str, bytes]:
    """All files of tinylabs/tiny-llama-lora, by path."""
    return {
        "README.md": ADAPTER_README.encode(),
        "adapter_config.json": adapter_config_json(base_commit),
        "adapter_model.safetensors": safetensors_bytes(adapter_tensors(), {"format": "pt"}),
    }
