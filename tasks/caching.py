"""Content-keyed caching for the pipeline's steps.

A step's cache key is a hash of what determines its output: commit shas, file
sha256s, the step's own config and the code version of the step. Never a path alone,
never a moving ref, never the flow-run id. Each cached step writes its outputs into a
directory named by its key and lists them in `manifest.json`; a cache hit whose
listed files are gone or changed size is treated as a miss by the flow.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable

from prefect.cache_policies import CacheKeyFnPolicy
from prefect.locking.filesystem import FileSystemLockManager
from pydantic import BaseModel

MANIFEST = "manifest.json"


def stable_hash(*parts: Any) -> str:
    """sha256 over the canonical JSON of the parts (pydantic models dumped first)."""
    def norm(obj: Any) -> Any:
        if isinstance(obj, BaseModel):
            return obj.model_dump(mode="json")
        if isinstance(obj, Path):
            raise TypeError("paths are not content: hash the file, not its name")
        return obj

    blob = json.dumps([norm(p) for p in parts], sort_keys=True, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def code_version(*module_names: str) -> str:
    """Hash of the source files of the given modules: a code change invalidates keys.

    Prefect's TASK_SOURCE only sees the task body; a step's helpers live in the module
    and in the loraflow modules it imports, which callers list explicitly.
    """
    h = hashlib.sha256()
    for name in sorted(module_names):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"no source for module {name}")
        h.update(name.encode())
        h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()[:16]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, extra: dict | None = None,
                   include: Callable[[str], bool] = lambda rel: True) -> dict:
    """List the files under `directory` (those `include` accepts, by relative path)
    with size and sha256 in manifest.json."""
    files = {}
    for p in sorted(directory.rglob("*")):
        rel = str(p.relative_to(directory))
        if p.is_file() and p.name != MANIFEST and include(rel):
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    data = {"files": files, **(extra or {})}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, directory / MANIFEST)  # the manifest appears whole or not at all
    return data


def outputs_intact(directory: Path) -> bool:
    """True when `directory` has a manifest and every file it lists has its size.

    Sizes, not hashes: a cache hit must stay cheap (a multi-GB shard would take a
    minute to hash); a changed size catches truncation and most replacements.
    """
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    for rel, meta in files.items():
        p = directory / rel
        if not p.is_file() or p.stat().st_size != meta["size"]:
            return False
    return True


def content_cache_policy(key_fn: Callable[..., str], lock_dir: Path):
    """A Prefect cache policy keyed by `key_fn(**task_parameters)`.

    SERIALIZABLE isolation with a lock manager: two runs with the same key at the same
    time — one computes, the other waits and reuses the result.
    """
    policy = CacheKeyFnPolicy(cache_key_fn=lambda ctx, params: key_fn(**params))
    return policy.configure(isolation_level="SERIALIZABLE",
                            lock_manager=OrphanBreakingLockManager(lock_dir))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OrphanBreakingLockManager(FileSystemLockManager):
    """FileSystemLockManager that breaks a lock whose holder process has died.

    Prefect's transactions take locks with no hold timeout, so a SIGKILLed run
    would otherwise block its own re-run forever. The holder's host and pid are
    written beside the lock; a lock held by a dead pid on this host is removed.
    """

    def _owner_path(self, key: str) -> Path:
        return self.lock_files_directory / f"{key}.owner"

    def acquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None):
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            self._owner_path(key).write_text(
                json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        return acquired

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        locked = super().is_locked(key, use_cache=use_cache)
        if locked and self._holder_died(key):
            self._lock_path_for_key(key).unlink(missing_ok=True)
            self._owner_path(key).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return locked

    def release_lock(self, key: str, holder: str) -> None:
        super().release_lock(key, holder)
        self._owner_path(key).unlink(missing_ok=True)

    def _holder_died(self, key: str) -> bool:
        try:
            owner = json.loads(self._owner_path(key).read_text())
        except (OSError, ValueError):
            return False  # just being written, or taken by a plain manager
        return owner.get("host") == socket.gethostname() and not _pid_alive(owner["pid"])

