"""Cache keys and hit checks: code versions follow imports, hits stay cheap, damaged
outputs are misses, stale records are expired under the lock."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import settings
from tasks.cache import manifest
from tasks.cache.keys import (
    cache_key,
    code_closure,
    code_version,
    stable_hash,
    step_of_key,
)
from tasks.cache.locks import OrphanBreakingLockManager
from tasks.cache.manifest import changed_files, outputs_intact, write_manifest
from tasks.cache.policy import cache_options, expire_if_damaged

REPO = Path(__file__).resolve().parents[2]


def test_code_version_covers_imported_loraflow_modules_lazy_ones_included():
    download = code_closure("tasks.download")
    assert "tasks.preflight" in download  # SNAPSHOT_PATTERNS and ModelRef come from there
    assert {"tasks", "tasks.caching", "profiles.schema"} <= set(download)
    train = code_closure("tasks.train")
    assert "tasks.training.modeling" in train  # imported inside run_train only
    assert {"tasks.dataset", "tasks.download"} <= set(train)
    # The card is rendered at publish time, not stored by training: editing it must not
    # retrain.
    assert "tasks.publication.modelcard" not in train
    assert all(m.split(".")[0] in ("tasks", "profiles", "flows") for m in train)
    assert len(code_version("tasks.train")) == 16
    with pytest.raises(ValueError, match="no source"):
        code_closure("tasks.no_such_module")


def _copy_tree(dst: Path) -> None:
    for pkg in ("tasks", "profiles", "flows"):
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))


def test_editing_a_helper_rekeys_exactly_the_steps_that_import_it(tmp_path):
    """A copy of the source tree first on sys.path; edit a module, see which keys move."""
    _copy_tree(tmp_path)
    script = """
import json, pathlib, sys
import tasks.cache.keys
from tasks.cache.keys import code_version
assert pathlib.Path(tasks.cache.keys.__file__).resolve().is_relative_to(pathlib.Path.cwd()), \
    tasks.cache.keys.__file__
steps = ("tasks.download", "tasks.dataset", "tasks.train")
versions = lambda: {m: code_version(m) for m in steps}
out = {"before": versions()}
p = pathlib.Path("tasks/dataset.py")
p.write_text(p.read_text().replace(
    "def format_example(", "def _strip(text):\\n    return text.strip()\\n\\n\\ndef format_example("))
out["dataset_helper"] = versions()
p = pathlib.Path("tasks/preflight.py")
p.write_text(p.read_text() + "\\nEXTRA_PATTERNS = []\\n")
out["preflight"] = versions()
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    before, helper, pre = out["before"], out["dataset_helper"], out["preflight"]
    # tasks.dataset's helper: dataset and train (which imports tasks.dataset) re-key.
    assert helper["tasks.download"] == before["tasks.download"]
    assert helper["tasks.dataset"] != before["tasks.dataset"]
    assert helper["tasks.train"] != before["tasks.train"]
    # tasks.preflight (SNAPSHOT_PATTERNS) is imported by every step: all re-key.
    assert all(pre[m] != helper[m] for m in pre)


def _fill(directory: Path) -> None:
    directory.mkdir(parents=True)
    (directory / "weights.bin").write_bytes(b"w" * 4096)
    (directory / "sub").mkdir()
    (directory / "sub" / "config.json").write_text('{"a": 1}')


def test_hit_check_rehashes_only_files_whose_stat_changed(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fill(out)
    write_manifest(out, {"inputs": {"x": 1}})
    hashed = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file",
                        lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    assert outputs_intact(out) and hashed == []  # size + mtime as recorded: no reads

    st = (out / "weights.bin").stat()
    os.utime(out / "weights.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched only
    assert outputs_intact(out) and hashed == ["weights.bin"]
    hashed.clear()
    assert outputs_intact(out) and hashed == []  # the new stat was remembered

    (out / "weights.bin").write_bytes(b"x" * 4096)  # same size, other bytes
    assert changed_files(out) == ["weights.bin"] and not outputs_intact(out)
    (out / "sub" / "config.json").unlink()
    assert changed_files(out) == ["sub/config.json", "weights.bin"]
    (out / "manifest.json").unlink()
    assert changed_files(out) is None and not outputs_intact(out)


def test_manifest_lists_size_sha256_mtime_and_inputs(tmp_path):
    out = tmp_path / "out"
    _fill(out)
    data = write_manifest(out, {"inputs": {"lr": 0.1}}, include=lambda rel: rel != "sub/config.json")
    assert set(data["files"]) == {"weights.bin"}
    meta = data["files"]["weights.bin"]
    assert meta["size"] == 4096 and len(meta["sha256"]) == 64 and meta["mtime_ns"] > 0
    assert json.loads((out / "manifest.json").read_text())["inputs"] == {"lr": 0.1}


def test_cache_key_names_the_step_and_paths_are_not_content():
    key = cache_key("train", {"a": 1})
    assert key.startswith("train-") and len(key) == len("train-") + 64
    assert step_of_key(key) == "train" and step_of_key("abc") is None
    assert key != cache_key("train", {"a": 2})
    with pytest.raises(TypeError, match="paths are not content"):
        stable_hash(Path("/tmp/x"))


def test_a_record_whose_outputs_are_damaged_is_expired_under_the_lock(tmp_path):
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    locks = OrphanBreakingLockManager(tmp_path / "locks")
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path / "results")),
                        lock_manager=locks)
    key = "train-" + "0" * 64
    store.write({"adapter": "x"}, key=key)
    assert store.exists(key)
    assert expire_if_damaged(store, locks, key, lambda: True) is False
    assert store.exists(key)
    seen_locked = []
    assert expire_if_damaged(store, locks, key,
                             lambda: seen_locked.append(locks.is_locked(key)) or False)
    assert seen_locked == [True]  # checked while holding the key's lock
    assert not store.exists(key) and not locks.is_locked(key)
    assert expire_if_damaged(store, locks, "train-" + "1" * 64, lambda: False) is False


def test_result_storage_setting(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAFLOW_RESULT_STORAGE", raising=False)
    assert settings.result_storage() == settings.loraflow_home() / "results"
    monkeypatch.setenv("LORAFLOW_RESULT_STORAGE", str(tmp_path / "shared"))
    assert settings.result_storage() == tmp_path / "shared"
    monkeypatch.setenv("LORAFLOW_RESULT_STORAGE", "local-file-system/loraflow-results")
    assert settings.result_storage() == "local-file-system/loraflow-results"
    monkeypatch.setenv("LORAFLOW_LOCK_LEASE_S", "soon")
    with pytest.raises(ValueError, match="LORAFLOW_LOCK_LEASE_S"):
        settings.lock_lease_seconds()


def test_unusable_storage_settings_fail_with_the_variable_named(monkeypatch, tmp_path):
    from tasks.errors import SettingsError

    monkeypatch.setenv("LORAFLOW_RESULT_STORAGE", "s3://bucket/results")
    with pytest.raises(SettingsError, match="LORAFLOW_RESULT_STORAGE.*a URL.*Fix"):
        cache_options(lambda **_: "k")
    monkeypatch.setenv("LORAFLOW_RESULT_STORAGE", "local-file-system/no-such-block-here")
    with pytest.raises(SettingsError, match="no saved Prefect block.*Fix"):
        cache_options(lambda **_: "k")
    monkeypatch.setenv("LORAFLOW_RESULT_STORAGE", str(tmp_path))
    monkeypatch.setenv("LORAFLOW_LOCK_LEASE_S", "-3")
    with pytest.raises(SettingsError, match="LORAFLOW_LOCK_LEASE_S"):
        cache_options(lambda **_: "k")
    monkeypatch.delenv("LORAFLOW_LOCK_LEASE_S")
    assert cache_options(lambda **_: "k")["result_storage"] == tmp_path
