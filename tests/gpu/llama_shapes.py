"""Llama shapes for the GPU tests, and random-weight checkpoints of them.

The configs are those of meta-llama/Llama-3.2-1B and meta-llama/Llama-3.1-8B (the
fields that decide tensor shapes); no weights can be downloaded on the GPU machine, and
the tests measure memory and code paths, not quality. The checkpoints carry localhub's
tiny-llama tokenizer files (word-level, 512 tokens: ids fit in any of these vocabularies).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

LLAMA_3_2_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                    vocab_size=128256, tie_word_embeddings=True,
                    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0)
LLAMA_3_1_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                    vocab_size=128256, tie_word_embeddings=False,
                    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0)
SHAPES = {
    "1b": LLAMA_3_2_1B,
    "8b": LLAMA_3_1_8B,
    # 1B widths, 2 layers, a 32k vocabulary: kernels at real widths in seconds.
    "1b-2layer": {**LLAMA_3_2_1B, "num_hidden_layers": 2, "vocab_size": 32000},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_random_checkpoint(shape: str, directory: Path, device: str = "cuda",
                           seed: int = 0) -> Path:
    """A LlamaForCausalLM of `shape`, random bf16 weights, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from localhub import seed_data

    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=3)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.config.dtype = "bfloat16"
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="5GB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    files = seed_data.model_files()
    for name in TOKENIZER_FILES:
        (Path(directory) / name).write_bytes(files[name])
    return Path(directory)


def config_of(directory: Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())


def record(name: str, **data) -> None:
    """Append one measurement to $LORAFLOW_GPU_RESULTS/results.jsonl (and print it)."""
    line = json.dumps({"test": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **data},
                      default=str)
    print(line, flush=True)
    out = os.environ.get("LORAFLOW_GPU_RESULTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "results.jsonl", "a") as fh:
            fh.write(line + "\n")
