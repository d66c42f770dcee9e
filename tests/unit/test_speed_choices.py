"""Which of Liger's layer kernels `training.liger_kernel` applies (tasks.training.speed):
under `auto`, only where the decoder layers run eager — compiled, Liger's kernels break
the layer's graph (measured slower, docs/benchmarks.md, issue #14). The compilation
choice itself: tests/unit/test_loading_options.py."""
from __future__ import annotations

import pytest

from profiles.loader import load_profile
from tasks.training.speed import liger_layer_kernels

ALL = {"rope": True, "rms_norm": True, "swiglu": True}
NONE = {"rope": False, "rms_norm": False, "swiglu": False}


@pytest.mark.parametrize("choice, compiled, kernels", [
    ("auto", False, ALL), ("auto", True, NONE), ("true", True, ALL), ("loss", False, NONE),
])
def test_liger_layer_kernels_follow_the_choice_and_compilation(choice, compiled, kernels):
    profile = load_profile("quickstart", [f"training.liger_kernel={choice}"])
    assert liger_layer_kernels(profile, compiled) == kernels


def test_offloading_takes_effect_where_checkpointing_runs_outside_compiled_code():
    """transformers ≥ 5.23 checkpoints inside the layer's forward: with compiled layers
    the offload falls back to torch's checkpoint, and the memory plan must not count it."""
    from tasks.training.speed import checkpoints_inside_forward, offloads_activations

    sets = ["training.offload_activations=true", "training.gradient_checkpointing=true",
            "training.packing=true"]                       # packing: compiled on a GPU
    compiled = load_profile("quickstart", sets)
    eager = load_profile("quickstart", [*sets, "training.torch_compile=false"])
    assert offloads_activations(eager, cuda=True, processes=1)
    assert offloads_activations(compiled, cuda=True, processes=1) \
        is not checkpoints_inside_forward()
    assert not offloads_activations(load_profile("quickstart"), cuda=True, processes=1)
