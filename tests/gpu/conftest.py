"""GPU tests: marked `gpu`, skipped without a CUDA GPU (`make test` on a CPU box skips
them in milliseconds; nvidia-smi is looked for before torch is imported).

Random-weight Llama checkpoints of the real shapes are built once per session on the GPU
and saved as safetensors, so the code under test reads weights exactly as it would
read a downloaded snapshot. With LORAFLOW_GPU_RESULTS=DIR, each test appends what it
measured to DIR/results.jsonl (docs/benchmarks.md is written from it).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

GPU_DIR = Path(__file__).parent


def _has_cuda() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - any failure means no usable GPU
        return False


def pytest_collection_modifyitems(config, items):
    ours = [i for i in items if GPU_DIR in Path(str(i.fspath)).parents]
    if not ours:
        return
    cuda = _has_cuda()
    for item in ours:
        item.add_marker(pytest.mark.gpu)
        if not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """shape name → directory of a random-weight bf16 checkpoint of that shape."""
    import llama_shapes as shapes

    made: dict[str, Path] = {}

    def get(shape: str) -> Path:
        if shape not in made:
            made[shape] = shapes.save_random_checkpoint(
                shape, tmp_path_factory.mktemp(f"ckpt-{shape}"))
        return made[shape]

    return get
