"""Cache keys and hit checks: a step's code key covers the code it runs (not what it
imports for a type), hits stay cheap, damaged outputs are misses, stale records are
expired under the lock."""
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
    describe_closures,
    stable_hash,
    step_of_key,
)
from tasks.cache.locks import OrphanBreakingLockManager
from tasks.cache.manifest import changed_files, outputs_intact, write_manifest
from tasks.cache.policy import cache_options, expire_if_damaged

REPO = Path(__file__).resolve().parents[2]


# The download step's code today, by keys.py's rule: its module, the helpers it runs (the
# cache's keys, manifests, policy and locks; the Hub client; retries; settings), and the two
# contract constants it names (the file patterns it fetches). Not the memory estimator,
# the Liger rules, the model card, the records' classes or the error messages.
DOWNLOAD_CLOSURE = {
    "tasks.download", "tasks.cache.keys", "tasks.cache.manifest", "tasks.hub", "tasks.settings",
    "tasks.contracts:SNAPSHOT_PATTERNS", "tasks.contracts:ADAPTER_PATTERNS",
}


def test_each_step_is_keyed_by_the_code_it_runs_not_what_it_imports_for_a_type():
    closures = {m: sorted(code_closure(m)) for m in ("tasks.download", "tasks.dataset",
                                                     "tasks.train")}
    for module, entries in closures.items():  # shown with -s; docs/caching.md pastes them
        print(f"{module} ({len(entries)}): {', '.join(entries)}")
    download, dataset, train = (set(c) for c in closures.values())
    assert download == DOWNLOAD_CLOSURE
    # Only-descriptive modules are never hashed whole: records' classes, profile sections
    # and errors shape no cached output; a contract constant a step names is hashed.
    for entries in (download, dataset, train):
        assert not entries & {"tasks.contracts", "profiles.schema", "tasks.errors",
                              "profiles.errors", "tasks", "profiles"}
    assert {"tasks.contracts:RECORD", "tasks.contracts:ADAPTER_FILES"} <= train
    # Lazy imports count (run_train imports the model loader inside the function), and so
    # does the torchrun worker, started by name (`-m tasks.training.worker`).
    assert {"tasks.training.modeling", "tasks.training.worker"} <= train
    # train consumes the dataset's key, never the dataset step's code; the card is
    # rendered at publish time; the memory estimate and plan are preflight's.
    assert not {m for m in train if m.startswith(("tasks.dataset", "tasks.data.reading",
                                                  "tasks.data.prompt_formats",
                                                  "tasks.publication", "tasks.memory.estimate",
                                                  "tasks.memory.fit", "tasks.preflight",
                                                  "tasks.download"))}
    assert "tasks.dataset" in dataset and "tasks.download" not in dataset
    assert all(m.split(".")[0] in ("tasks", "profiles", "flows") for m in train)
    assert len(code_version("tasks.train")) == 16
    with pytest.raises(ValueError, match="no source"):
        code_closure("tasks.no_such_module")


def _copy_tree(dst: Path) -> None:
    for pkg in ("tasks", "profiles", "flows"):
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))


# Each edit lands on the copy in turn; the versions after it are compared with those
# before it. (path, old text or None to append, new text)
_EDITS = [
    ("tasks/memory/estimate.py", None, "\n\n# a memory constant retuned\n"),
    ("tasks/training/speed.py", None, "\n\n# a Liger rule changed\n"),
    ("tasks/publication/modelcard.py", None, "\n\n# a card sentence reworded\n"),
    ("tasks/contracts.py", "CUDA_CONTEXT_BYTES = 1 * GiB", "CUDA_CONTEXT_BYTES = 2 * GiB"),
    ("tasks/contracts.py", '"""What was downloaded:', '"""The snapshot — what was downloaded:'),
    ("tasks/contracts.py", 'RECORD = "record.json"', 'RECORD = "run-record.json"'),
    ("tasks/errors.py", "RETRY_LATER = (\"run again later", "RETRY_LATER = (\"try again later"),
    ("tasks/__init__.py", None, '"""loraflow\'s steps and their helpers."""\n'),
    ("tasks/training/__init__.py", None, "\nDEFAULT_LAUNCHER = 'single'\n"),
    ("tasks/download.py", None, "\n\n# the download step itself edited\n"),
    ("tasks/dataset.py", "def transform_fingerprint(",
     "def _strip(text):\n    return text.strip()\n\n\ndef transform_fingerprint("),
    ("tasks/train.py", None, "\n\n# the train step itself edited\n"),
]

_SCRIPT = r"""
import json, pathlib, sys
import tasks.cache.keys
from tasks.cache.keys import code_version
assert pathlib.Path(tasks.cache.keys.__file__).resolve().is_relative_to(pathlib.Path.cwd()), \
    tasks.cache.keys.__file__
from profiles.loader import load_profile
from tasks.contracts import DatasetManifest, DatasetRef, SnapshotManifest
from tasks.dataset import dataset_key
from tasks.train import train_inputs, train_key

profile = load_profile("quickstart")
snapshot = SnapshotManifest(repo_id="tinylabs/tiny-llama", commit="a" * 40, local_dir="/x",
                            files={"model.safetensors": {"size": 1, "sha256": "b" * 64},
                                   "tokenizer.json": {"size": 1, "sha256": "d" * 64}})
source = DatasetRef(source="hub", id="tinylabs/tiny-instruct", revision="main",
                    commit="c" * 40)

def state():
    dkey = dataset_key(profile.data, source, snapshot, profile.training.seed)
    prepared = DatasetManifest(path="/x", key=dkey, num_train=1, num_eval=0, train_tokens=1)
    inputs = train_inputs(profile, snapshot, prepared)
    return {"download": code_version("tasks.download"),
            "dataset": code_version("tasks.dataset"), "train": code_version("tasks.train"),
            "dataset_key": dkey, "train_key": train_key(profile, snapshot, prepared),
            "train_inputs_dataset": inputs["dataset"],
            "train_code_modules": inputs["code"]["modules"]}

out = [state()]
for rel, old, new in json.loads(sys.argv[1]):
    p = pathlib.Path(rel)
    text = p.read_text()
    if old is None:
        text += new
    else:
        assert text.count(old) == 1, (rel, old)
        text = text.replace(old, new)
    p.write_text(text)
    out.append(state())
print(json.dumps(out))
"""


def test_an_edit_rekeys_exactly_the_steps_that_run_the_edited_code(tmp_path):
    """A copy of the source tree first on sys.path; edit a module, see which keys move.
    The real key functions are used: a later step re-keys only through the key it
    consumes (dataset → train), never by the code of a step it does not run."""
    _copy_tree(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(_EDITS)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    states = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(states) == len(_EDITS) + 1

    def moved(path, old_text=None):
        i = next(n for n, (rel, old, _) in enumerate(_EDITS)
                 if rel == path and (old_text is None or old == old_text))
        before, after = states[i], states[i + 1]
        return {k for k in ("download", "dataset", "train", "dataset_key", "train_key")
                if before[k] != after[k]}

    # Helpers download never runs: the memory estimator, the Liger rules, the card writer.
    assert "download" not in moved("tasks/memory/estimate.py")
    assert "download" not in moved("tasks/training/speed.py")
    assert "download" not in moved("tasks/publication/modelcard.py")
    # The card is rendered at publish time: rewording it must not retrain. The estimate is
    # preflight's: no cached step runs it.
    assert not moved("tasks/publication/modelcard.py") & {"train", "train_key"}
    assert moved("tasks/publication/modelcard.py") == set()
    assert moved("tasks/memory/estimate.py") == set()
    # The Liger rules are code training runs: an edit there does re-key training.
    assert moved("tasks/training/speed.py") == {"train", "train_key"}
    # Records and errors describe; a step is keyed by the constants it names from them.
    assert moved("tasks/contracts.py", "CUDA_CONTEXT_BYTES = 1 * GiB") == set()
    assert moved("tasks/contracts.py", '"""What was downloaded:') == set()
    assert moved("tasks/contracts.py", 'RECORD = "record.json"') == {"train", "train_key"}
    assert moved("tasks/errors.py") == set()
    # A docstring-only package __init__ runs nothing; one with code runs on import.
    assert moved("tasks/__init__.py") == set()
    assert moved("tasks/training/__init__.py") >= {"train", "train_key"}
    assert "download" not in moved("tasks/training/__init__.py")
    # A step's own module re-keys that step.
    assert moved("tasks/download.py") == {"download"}
    assert moved("tasks/train.py") == {"train", "train_key"}
    # tasks/dataset.py: the dataset re-keys; train's code key does not move, its key does —
    # through the dataset key it consumes, and nothing of the dataset step's code is in it.
    assert moved("tasks/dataset.py") == {"dataset", "dataset_key", "train_key"}
    i = next(n for n, (rel, *_) in enumerate(_EDITS) if rel == "tasks/dataset.py")
    before, after = states[i], states[i + 1]
    assert before["train_inputs_dataset"] == before["dataset_key"]
    assert after["train_inputs_dataset"] == after["dataset_key"] != before["dataset_key"]
    for s in states:
        assert not [m for m in s["train_code_modules"]
                    if m == "tasks.dataset" or m.startswith("tasks.data.reading")]


def test_docs_list_what_each_code_key_covers_today():
    """docs/caching.md pastes `python -m tasks.cache.keys`; it must say what the code does."""
    doc = (REPO / "docs" / "caching.md").read_text()
    marker = "<!-- code closures: python -m tasks.cache.keys -->\n```text\n"
    assert marker in doc
    pasted = doc.split(marker, 1)[1].split("```", 1)[0]
    assert pasted == describe_closures(), (
        "docs/caching.md's list of what each code key covers is out of date: paste the "
        "output of `python -m tasks.cache.keys` there.\n" + describe_closures())


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


def test_cache_options_read_the_environment_when_used_and_bad_settings_are_named(
        monkeypatch, tmp_path):
    """Built at import (in a step's @task line), so building reads nothing; the lock
    directory and the result storage follow LORAFLOW_HOME / LORAFLOW_RESULT_STORAGE as
    they are when a run uses them; the flow's up-front check names a bad value."""
    from prefect.filesystems import LocalFileSystem

    from tasks.cache.policy import check_storage_settings, current_result_storage
    from tasks.errors import SettingsError

    monkeypatch.setenv("LORAFLOW_RESULT_STORAGE", "s3://bucket/results")
    monkeypatch.setenv("LORAFLOW_LOCK_LEASE_S", "-3")
    options = cache_options(lambda **_: "k")  # nothing read yet: no error
    assert options["persist_result"] is True and "result_storage" not in options
    with pytest.raises(SettingsError, match="LORAFLOW_RESULT_STORAGE.*a URL.*Fix"):
        check_storage_settings()
    monkeypatch.setenv("LORAFLOW_RESULT_STORAGE", "local-file-system/no-such-block-here")
    with pytest.raises(SettingsError, match="no saved Prefect block.*Fix"):
        check_storage_settings()
    monkeypatch.setenv("LORAFLOW_RESULT_STORAGE", str(tmp_path / "shared"))
    with pytest.raises(SettingsError, match="LORAFLOW_LOCK_LEASE_S"):
        check_storage_settings()
    monkeypatch.delenv("LORAFLOW_LOCK_LEASE_S")
    check_storage_settings()
    storage = current_result_storage()
    assert isinstance(storage, LocalFileSystem) and storage.basepath == str(tmp_path / "shared")

    monkeypatch.delenv("LORAFLOW_RESULT_STORAGE")
    locks = options["cache_policy"].lock_manager
    for home in (tmp_path / "home-a", tmp_path / "home-b"):
        monkeypatch.setenv("LORAFLOW_HOME", str(home))
        assert current_result_storage().basepath == str(home / "results")
        assert locks.lock_files_directory == home / "locks"
        assert locks.acquire_lock("k", "me")
        assert (home / "locks" / "k.lock").is_file()
        locks.release_lock("k", "me")
