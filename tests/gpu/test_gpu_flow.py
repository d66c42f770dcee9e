"""On a CUDA GPU: the llama-3.2-1b-lora and llama-3.1-8b-qlora presets through the whole
flow (preflight with the real nvidia-smi and memory estimate, download, dataset, train,
samples, publish, verify) against localhub, with random weights of Llama-3.2-1B's shape
seeded as a model repo."""
from __future__ import annotations

import pytest
from llama_shapes import record

from flows.cli import run_profile
from profiles.loader import load_profile

pytestmark = pytest.mark.gpu

REPO = "tinylabs/llama-3.2-1b-random"
TARGET = "loraflow-demo/llama-3.2-1b-gpu-test"
README = b"---\nlicense: llama3.2\nlibrary_name: transformers\n---\n# random Llama-3.2-1B shape\n"


def seed_model_repo(root, checkpoint) -> str:
    """Add `checkpoint` as REPO to the localhub store at `root`; return its commit."""
    from localhub.store import Operation, RepoMeta, Store

    store = Store(root)
    meta = RepoMeta("model", REPO, private=False, gated=False)
    if store.get_repo("model", REPO) is None:
        initial = store.create_repo(meta, author="owner")
        ops = [Operation("add", "README.md", content=README)]
        for f in sorted(checkpoint.iterdir()):
            data = f.read_bytes()
            if f.suffix == ".safetensors":
                ops.append(Operation("add", f.name, lfs_sha256=store.put_blob(data),
                                     lfs_size=len(data)))
            else:
                ops.append(Operation("add", f.name, content=data))
        store.commit(meta, "main", ops, title="Random weights of Llama-3.2-1B's shape",
                     author="owner", parent_commit=initial)
    return store.resolve(store.get_repo("model", REPO), "main")


@pytest.mark.parametrize("preset, target, expected", [
    ("llama-3.2-1b-lora", TARGET, {"quantization": "none", "checkpointing": False}),
    # The 8B preset's settings (nf4 + double quant, checkpointing, its batch) on the 1B
    # shape: an 8B checkpoint would put three 16 GB copies (saved, localhub, download) on
    # the GPU machine's 64 GB disk.
    ("llama-3.1-8b-qlora", "loraflow-demo/llama-3.1-8b-qlora-gpu-test",
     {"quantization": "nf4", "checkpointing": True}),
])
def test_preset_through_the_whole_flow(hub, as_user, checkpoints, preset, target, expected):
    commit = seed_model_repo(hub.root, checkpoints("1b"))
    profile = load_profile(preset, [
        f"model.id={REPO}", "data.dataset=tinylabs/tiny-instruct", f"publish.repo_id={target}",
        "training.max_steps=20", "training.eval_steps=10", "training.save_steps=10",
        "training.learning_rate=1e-3"])
    assert profile.quantization.mode == expected["quantization"]
    assert profile.training.gradient_checkpointing is expected["checkpointing"]
    with as_user("demo"):
        report = run_profile(preset, profile)
    record(f"flow_{preset}", status=report["status"], error=report["error"],
           steps=report["steps"], metrics=report["metrics"], hub=report["hub"],
           adapter=report["adapter"])
    assert report["status"] == "completed", report["error"]
    assert report["base_model"]["commit"] == commit
    assert {s: v["state"] for s, v in report["steps"].items()} == dict.fromkeys(
        ["preflight", "download", "dataset", "train", "samples", "publish", "verify"],
        "completed")
    m = report["metrics"]
    assert m["last_loss"] < m["first_loss"], m
    assert report["adapter"]["trainable_params"] == 11_272_192      # r=16, all-linear
    assert len(report["hub"]["commit"]) == 40
