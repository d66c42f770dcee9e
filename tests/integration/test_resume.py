"""Never lose work: a run killed (SIGKILL) or cancelled (SIGTERM) during training resumes
from its last checkpoint, executes only the steps after it, and ends with the adapter
an uninterrupted run makes; a corrupted cached shard is fetched again.

The interrupted runs are `python -m flows.cli run quickstart --json` processes; the
re-runs and the uninterrupted reference run in this process, each with its own
LORAFLOW_HOME.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import run_profile
from profiles.loader import load_profile
from tasks.training.checkpoints import read_step_log

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS, SAVE_STEPS = 40, 10
OVERRIDES = [f"training.max_steps={MAX_STEPS}", f"training.save_steps={SAVE_STEPS}",
             "training.save_total_limit=3", "publish.repo_id=loraflow-demo/resume-test"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "loraflow"
    monkeypatch.setenv("LORAFLOW_HOME", str(home))
    return home


def _run_here(as_user, overrides=OVERRIDES):
    with as_user("demo"):
        return run_profile("quickstart", load_profile("quickstart", list(overrides)))


@pytest.fixture(scope="module")
def reference(hub, as_user, tmp_path_factory):
    """The same profile and seed, trained without interruption."""
    home = tmp_path_factory.mktemp("reference")
    old = os.environ.get("LORAFLOW_HOME")
    os.environ["LORAFLOW_HOME"] = str(home)
    try:
        report = _run_here(as_user)
    finally:
        os.environ["LORAFLOW_HOME"] = old
    assert report["status"] == "completed", report["error"]
    return report


def _adapter(report_or_path) -> dict:
    from safetensors.torch import load_file

    path = (report_or_path["adapter"]["path"] if isinstance(report_or_path, dict)
            else report_or_path)
    return load_file(str(Path(path) / "adapter_model.safetensors"))


def _max_abs_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b) and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _start_cli(hub, home: Path, prefect_home: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token("demo"),
           "HF_HUB_DISABLE_XET": "1", "LORAFLOW_HOME": str(home),
           "PREFECT_HOME": str(prefect_home)}
    cmd = [sys.executable, "-m", "flows.cli", "run", "quickstart", "--json"]
    for o in OVERRIDES:
        cmd += ["--set", o]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, home: Path, step: int, timeout=240) -> Path:
    """The run directory, once the step log says checkpoint `step` was saved."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before its checkpoint"
        for log in (home / "runs").glob("*/train_log.jsonl"):
            if any(e["event"] == "checkpoint" and e["step"] == step
                   for e in read_step_log(log.parent)):
                return log.parent
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no checkpoint at step {step} within {timeout}s")


def _last_attempt(run_dir: Path) -> tuple[dict, list[int]]:
    events = read_step_log(run_dir)
    start = [e for e in events if e["event"] == "start"][-1]
    steps = [e["step"] for e in events if e["attempt"] == start["attempt"]
             and e["event"] == "step"]
    return start, steps


def _complete_checkpoints(run_dir: Path) -> list[int]:
    from tasks.training.checkpoints import checkpoint_complete

    ckpts = run_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*")
                  if checkpoint_complete(p, int(p.name.split("-")[1])))


def _assert_resumed(report, run_dir: Path, k: int, reference) -> None:
    assert report["status"] == "completed", report["error"]
    states = {s: v["state"] for s, v in report["steps"].items()}
    assert states["download"] == states["dataset"] == "cached", states
    assert states["train"] == "completed"
    start, steps = _last_attempt(run_dir)
    assert start["resume_from"] == k and start["pid"] == os.getpid()
    assert steps == list(range(k + 1, MAX_STEPS + 1)), steps  # only the steps after k
    assert report["metrics"]["resumed_from"] == f"checkpoint-{k}"
    assert report["metrics"]["steps"] == MAX_STEPS
    diff = _max_abs_diff(_adapter(report), _adapter(reference))
    print(f"resumed from step {k}: max abs diff vs the uninterrupted adapter {diff:.3e}")
    assert diff <= 1e-4, diff


def test_sigkill_after_a_checkpoint_resumes_from_it(hub, as_user, home, tmp_path, reference):
    proc = _start_cli(hub, home, tmp_path / "prefect")
    run_dir = _wait_for_checkpoint(proc, home, SAVE_STEPS)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    k = _complete_checkpoints(run_dir)[-1]
    assert SAVE_STEPS <= k < MAX_STEPS
    # The killed run still holds the train step's lock (its pid is gone): broken, not waited on.
    assert any((home / "locks").glob("train-*.lock"))
    report = _run_here(as_user)
    _assert_resumed(report, run_dir, k, reference)


def test_sigterm_saves_a_checkpoint_and_exits_then_a_rerun_resumes(hub, as_user, home,
                                                                   tmp_path, reference):
    proc = _start_cli(hub, home, tmp_path / "prefect")
    run_dir = _wait_for_checkpoint(proc, home, SAVE_STEPS)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    report = json.loads(out.strip().splitlines()[-1])
    assert report["status"] == "failed" and report["steps"]["train"]["state"] == "failed"
    assert report["error"]["type"] == "TrainingInterrupted", report["error"]
    assert "resumes" in report["error"]["message"]
    stopped = [e for e in read_step_log(run_dir) if e["event"] == "interrupted"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM"
    k = stopped[0]["step"]
    assert SAVE_STEPS <= k < MAX_STEPS
    assert _complete_checkpoints(run_dir)[-1] == k  # saved on the way out, at step k
    assert not list((home / "locks").glob("*.lock"))  # released on a clean exit

    rerun = _run_here(as_user)
    _assert_resumed(rerun, run_dir, k, reference)


def _drop_from_shared_hf_cache(repo_id: str) -> None:
    """huggingface_hub fills a local_dir from its shared cache (HF_HOME) when the file is
    there — an earlier test may have loaded the base with plain clients — so the repo is
    dropped from it: the repair must then fetch from the Hub, which these tests count."""
    from huggingface_hub import constants

    shutil.rmtree(Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}",
                  ignore_errors=True)


def test_damaged_outputs_are_repaired_not_redone(hub, as_user, home):
    """A cached shard whose bytes changed is fetched again (and nothing downstream moves);
    a run killed after its last checkpoint, before the adapter was saved, finishes from
    that checkpoint without training a step more."""
    small = ["training.max_steps=4", "training.save_steps=2",
             "publish.repo_id=loraflow-demo/resume-test"]
    first = _run_here(as_user, small)
    assert first["status"] == "completed", first["error"]
    shard = next((home / "downloads").glob("*/files/model.safetensors"))
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # same size, other bytes
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    _drop_from_shared_hf_cache("tinylabs/tiny-llama")
    before = len(hub.requests())
    second = _run_here(as_user, small)
    assert second["status"] == "completed", second["error"]
    states = {s: v["state"] for s, v in second["steps"].items()}
    assert states["download"] == "completed", states  # the damaged hit was a miss
    assert states["dataset"] == states["train"] == "cached", states  # same bytes again
    fetched = [r for r in hub.requests()[before:] if r["method"] == "GET"
               and r["path"].endswith("/model.safetensors") and r["status"] == 200]
    assert len(fetched) == 1
    from tasks.cache.manifest import sha256_file

    manifest = json.loads((shard.parent.parent / "manifest.json").read_text())
    assert sha256_file(shard) == manifest["files"]["files/model.safetensors"]["sha256"]

    run_dir = Path(first["adapter"]["path"]).parent
    (run_dir / "manifest.json").unlink()  # as if killed between checkpoint-4 and the end
    shutil.rmtree(run_dir / "adapter")
    third = _run_here(as_user, small)
    assert third["steps"]["train"]["state"] == "completed", third["steps"]
    start, steps = _last_attempt(run_dir)
    assert start["resume_from"] == 4 and steps == []
    assert third["adapter"]["sha256"] == first["adapter"]["sha256"]
    assert third["metrics"]["steps"] == 4


def test_an_interrupted_download_keeps_what_completed_and_fetches_the_rest(hub, as_user, home):
    """What a process killed mid-download leaves — no manifest, one file missing, an orphan
    temporary file, a small file with other bytes — is repaired: only the missing and the
    bad files are fetched; the dataset step's half-written output is dropped the same way."""
    from tasks.cache.manifest import read_manifest, sha256_file
    from tasks.contracts import DatasetRef, ModelRef
    from tasks.dataset import run_prepare_dataset
    from tasks.download import run_download

    model = ModelRef(repo_id="tinylabs/tiny-llama", revision="main",
                     commit=hub.commit("tinylabs/tiny-llama"), gated=True)
    with as_user("demo"):
        first = run_download(model)
        target = Path(first.local_dir).parent
        (target / "manifest.json").unlink()
        files = Path(first.local_dir)
        (files / "model.safetensors").unlink()
        meta = files / ".cache" / "huggingface" / "download"
        (meta / "model.safetensors.metadata").unlink(missing_ok=True)
        orphan = meta / "model.safetensors.0123abcd.incomplete"
        orphan.write_bytes(b"partial")
        tok = files / "tokenizer.json"
        tok.write_bytes(tok.read_bytes().replace(b'"', b"'", 1))  # same size, other bytes
        _drop_from_shared_hf_cache("tinylabs/tiny-llama")
        before = len(hub.requests())
        second = run_download(model)
        gets = sorted(r["path"].rsplit("/", 1)[1] for r in hub.requests()[before:]
                      if r["method"] == "GET" and "/resolve/" in r["path"])
        assert gets == ["model.safetensors", "tokenizer.json"]
        assert not orphan.exists()
        assert second.files == first.files  # the same bytes as the first download
        assert read_manifest(target) is not None
        assert sha256_file(tok) == first.files["tokenizer.json"]["sha256"]

        data = load_profile("quickstart").data
        source = DatasetRef(source="hub", id="tinylabs/tiny-instruct", revision="main",
                            commit=hub.commit("tinylabs/tiny-instruct"))
        out_dir = home / "datasets"
        out_dir.mkdir(parents=True)
        from tasks.dataset import dataset_key

        key = dataset_key(data, source, second, 42)
        half = out_dir / f"{key}.partial-deadbeef"
        (half / "train").mkdir(parents=True)
        (half / "train" / "data-00000-of-00001.arrow").write_bytes(b"cut short")
        prepared = run_prepare_dataset(data, source, second, 42)
        assert Path(prepared.path).name == key and not half.exists()
        assert read_manifest(Path(prepared.path))["num_train"] == prepared.num_train > 0
