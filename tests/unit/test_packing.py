"""Padding-free packing (training.packing): packed rows give the loss of the same
examples unpacked — attention never crosses examples and no example learns the next
one's first token — and the rows hold every example once, within the row length."""
from __future__ import annotations

import random

import pytest

from tasks.training.packing import PackingCollator, pack_rows


def test_rows_hold_every_example_once_within_the_row_length():
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(50)]
    rows = pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(50))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= 1.3 * sum(lengths) / 64 + 1      # first-fit wastes little


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_the_unpacked_loss(tiny_llama_dir, attn):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    rng = random.Random(1)
    examples = [[rng.randint(4, 500) for _ in range(n)] for n in (7, 20, 13, 30, 3, 16)]
    with torch.no_grad():
        total = count = 0.0
        for ids in examples:   # one example per forward: no padding, nothing shared
            t = torch.tensor([ids])
            total += model(input_ids=t, labels=t).loss.item() * (len(ids) - 1)
            count += len(ids) - 1
        batch = PackingCollator(row_length=40, pad_token_id=0)(
            [{"input_ids": ids, "labels": ids} for ids in examples])
        assert batch["input_ids"].shape[0] < len(examples)          # really packed
        packed = model(**batch).loss.item()
    assert packed == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("sets, field", [
    (["training.packing=true", "model.task=seq-classification", "data.format=text-label"],
     "training.packing"),
    (["training.checkpoint_layers=4"], "training.checkpoint_layers"),
    (["training.offload_activations=true"], "training.offload_activations"),
    (["training.fp8=true", "quantization.mode=nf4"], "training.fp8"),
    (["training.fp8=true", "lora.use_dora=true"], "training.fp8"),
    (["training.fp8=true", "lora.method=ia3"], "training.fp8"),
    (["training.fp8_backward=dequantized"], "training.fp8_backward"),
    (["training.fp8=true", "training.fp8_target_modules=[]"], "training.fp8_target_modules"),
    (["training.fp8=true", "lora.target_modules=[q_proj,v_proj]",
      "training.fp8_target_modules=[gate_proj]"], "training.fp8_target_modules"),
    (["training.activation_memory_budget=0"], "training.activation_memory_budget"),
    (["training.offload_activations=true", "training.gradient_checkpointing=true",
      "training.launcher=torchrun"], "training.offload_activations"),
])
def test_speed_options_that_do_not_fit_are_refused(sets, field):
    from profiles.loader import ProfileError, load_profile

    with pytest.raises(ProfileError) as err:
        load_profile("quickstart", sets)
    assert field in str(err.value) and "Fix:" in str(err.value)


def test_module_globals_a_kernel_patch_changed_are_put_back():
    """What apply_liger records (it needs a GPU), undone as after training: a later
    model of the same type in this process runs transformers' own functions."""
    from transformers.models.llama import modeling_llama

    from tasks.training import speed

    original = modeling_llama.apply_rotary_pos_emb
    speed._PATCHED.append((modeling_llama, dict(vars(modeling_llama))))
    modeling_llama.apply_rotary_pos_emb = lambda *a, **k: None   # as Liger's RoPE patch does
    assert speed.undo_module_patches() == 1
    assert modeling_llama.apply_rotary_pos_emb is original and speed._PATCHED == []
