"""Preflight against localhub: the memory estimate reads only the safetensors headers
(ranged reads), bad target modules and runs that cannot fit fail before any download."""
from __future__ import annotations

import pytest

from profiles.loader import load_profile
from tasks.contracts import GiB, Gpu
from tasks.errors import ProfileError
from tasks.memory import devices
from tasks.memory.fit import InsufficientMemoryError
from tasks.preflight import run_preflight

BASE = "tinylabs/tiny-llama"
TINY_PARAMS = 139_584   # 2 layers, hidden 64, vocab 512, untied lm_head


def _weight_requests(hub, since: int) -> list[dict]:
    return [r for r in hub.requests()[since:]
            if r["path"].endswith("/model.safetensors") and r["method"] == "GET"]


def test_estimate_comes_from_a_ranged_read_of_the_headers(hub, as_user, monkeypatch):
    monkeypatch.setattr(devices, "visible_gpus", lambda: [])
    before = len(hub.requests())
    with as_user("demo"):
        report = run_preflight(load_profile("quickstart"))
    est = report.memory.estimate
    assert est.parameters == TINY_PARAMS and est.layers == 2
    assert est.loaded_weights_bytes == 4 * TINY_PARAMS            # float32 profile
    # r=8 on the 7 linear layers of each block.
    assert est.adapter_parameters == 2 * 8 * (
        (64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert report.memory.placement == "cpu" and report.memory.fits is None
    gets = _weight_requests(hub, before)
    assert gets and all(r["status"] == 206 for r in gets), gets   # headers only


def test_a_run_too_big_for_the_gpu_fails_in_preflight_with_fixes(hub, as_user, monkeypatch):
    small = Gpu(index=0, name="small", total_bytes=3 * GiB, free_bytes=3 * GiB)
    monkeypatch.setattr(devices, "visible_gpus", lambda: [small])
    profile = load_profile("quickstart", ["training.per_device_batch_size=512",
                                          "data.max_length=512"])
    before = len(hub.requests())
    with as_user("demo"), pytest.raises(InsufficientMemoryError) as err:
        run_preflight(profile)
    msg = str(err.value)
    assert "training.per_device_batch_size" in msg and "gpu:0" in msg
    assert "Fix, any of: --set training.per_device_batch_size=" in msg
    assert err.value.to_dict()["type"] == "InsufficientMemoryError"
    assert all(r["status"] == 206 for r in _weight_requests(hub, before))
    # The suggested batch does fit.
    bs = int(msg.split("per_device_batch_size=")[1].split()[0])
    accum = int(msg.split("gradient_accumulation_steps=")[1].split()[0])
    assert bs * accum == 512
    with as_user("demo"):
        ok = run_preflight(load_profile("quickstart", [
            f"training.per_device_batch_size={bs}", f"training.gradient_accumulation_steps={accum}",
            "data.max_length=512"]))
    assert ok.memory.fits is True and ok.memory.placement == "gpu:0"


def test_target_modules_that_do_not_exist_fail_before_download(hub, as_user, monkeypatch):
    monkeypatch.setattr(devices, "visible_gpus", lambda: [])
    before = len(hub.requests())
    with as_user("demo"), pytest.raises(ProfileError) as err:
        run_preflight(load_profile("quickstart", ["lora.target_modules=[q_proj, qkv]"]))
    assert "lora.target_modules: ['qkv']" in str(err.value) and "gate_proj" in str(err.value)
    assert all(r["status"] == 206 for r in _weight_requests(hub, before))
