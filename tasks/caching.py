"""Content-keyed caching for the pipeline's steps.

A step's cache key is `<step>-<sha256>` over what determines its output: commit shas,
file sha256s, the step's own config and the code version of the step (its module and
every loraflow module it imports, found by reading the import statements). Never a
path alone, never a moving ref, never the flow-run id.

Each cached step writes its outputs into a directory named by its key and lists them
in `manifest.json` (size, sha256, mtime_ns per file, plus the inputs that keyed it).
A cache hit is checked against that list: a file that is gone or changed size is a
miss; a file whose mtime changed is hashed again and is a miss if its bytes changed.
The check runs under the key's lock, so a run waiting on another run's computation
sees the finished outputs, never a half-written directory.

Locks (`OrphanBreakingLockManager`) record holder, host and pid; a lock whose holder
died is broken (same host: the pid is gone; another host: its heartbeat stopped).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from prefect.cache_policies import CachePolicy
from prefect.locking.filesystem import FileSystemLockManager
from pydantic import BaseModel

from tasks import settings

MANIFEST = "manifest.json"
STAT_CACHE = ".manifest-stat.json"  # re-verified stats of files touched but unchanged
LORAFLOW_PACKAGES = ("tasks", "profiles", "flows")
STEP_DIRS = {"download": "downloads", "dataset": "datasets", "train": "runs"}

log = logging.getLogger("loraflow.caching")


# --------------------------------------------------------------------------- keys

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


def cache_key(step: str, inputs: dict) -> str:
    """`<step>-<sha256 of the inputs>`: the Prefect cache key and the directory name.

    The step prefix makes `results/` and `locks/` readable and lets `loraflow cache`
    tell the steps apart without reading anything.
    """
    return f"{step}-{stable_hash(step, inputs)}"


def step_of_key(key: str) -> Optional[str]:
    step = key.split("-", 1)[0]
    return step if step in STEP_DIRS else None


def _package_root(top: str) -> Optional[Path]:
    """Directory that holds the top-level package `top`, as the import system finds it
    (so a copy of the tree earlier on sys.path is the one hashed)."""
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).parent


def _module_origin(name: str) -> Optional[Path]:
    """The source file of a loraflow module, found on disk without importing it."""
    parts = name.split(".")
    if parts[0] not in LORAFLOW_PACKAGES or not all(p.isidentifier() for p in parts):
        return None
    root = _roots.get(parts[0]) or _roots.setdefault(parts[0], _package_root(parts[0]))
    if root is None:
        return None
    base = root.joinpath(*parts)
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


_roots: dict[str, Optional[Path]] = {}
_parsed: dict[tuple, tuple[str, frozenset]] = {}


_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]*)"
                     r"|import[ \t]+([^\n#;]+))", re.M)


def _imported_names(source: str, package: str) -> set[str]:
    """Modules named by the import statements of `source`, function-local (lazy) ones
    included — tasks import torch and loraflow helpers inside functions. A text scan,
    not a parse (a parse of a step's closure costs ~0.1 s, too much for a cached run);
    an import-like line inside a docstring only adds a module: over-keying, never under."""
    found: set[str] = set()
    for m in _IMPORT.finditer(source):
        if m.group(3) is not None:
            found.update(part.split()[0] for part in m.group(3).split(",") if part.split())
            continue
        module, names = m.group(1), m.group(2).strip("() \t\n")
        dots = len(module) - len(module.lstrip("."))
        if dots:
            base = package.split(".")
            base = base[:len(base) - (dots - 1)]
            module = ".".join(base + ([module[dots:]] if module[dots:] else []))
        found.add(module)
        found.update(f"{module}.{part.split()[0]}" for part in names.split(",")
                     if part.split())
    return found


def _hash_and_imports(name: str, path: Path) -> tuple[str, frozenset]:
    """(sha256 of the file, loraflow modules it imports), memoized by (path, stat)."""
    st = path.stat()
    memo_key = (name, str(path), st.st_size, st.st_mtime_ns)
    if memo_key in _parsed:
        return _parsed[memo_key]
    source = path.read_bytes()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = _imported_names(source.decode("utf-8", errors="replace"), package)
    ours = frozenset(m for m in found
                     if m.split(".")[0] in LORAFLOW_PACKAGES and _module_origin(m))
    result = (hashlib.sha256(source).hexdigest(), ours)
    _parsed[memo_key] = result
    return result


def code_closure(*module_names: str) -> dict[str, str]:
    """module → sha256 of its source, for the modules and every loraflow module they
    import, directly or not (package `__init__` files included)."""
    seen: dict[str, str] = {}
    todo = list(module_names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_origin(name)
        if path is None:
            raise ValueError(f"no source for module {name}")
        digest, imports = _hash_and_imports(name, path)
        seen[name] = digest
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages
        todo.extend(imports)
    return dict(sorted(seen.items()))


def code_version(*module_names: str) -> str:
    """Hash of the source of the given modules and of the loraflow modules they import.

    Prefect's TASK_SOURCE only sees the task body; a step's helpers live in its module
    and in the modules it imports (e.g. tasks.download uses tasks.preflight's
    SNAPSHOT_PATTERNS), so any edit to one of those re-keys the step. The imports are
    read from the source (no import happens), function-local imports included.
    """
    return stable_hash(code_closure(*module_names))[:16]


def code_inputs(*module_names: str) -> dict:
    """The code part of a step's key inputs: the version and the modules it covers."""
    closure = code_closure(*module_names)
    return {"version": stable_hash(closure)[:16], "modules": sorted(closure)}


# ---------------------------------------------------------------------- manifests

def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)  # appears whole or not at all


def write_manifest(directory: Path, extra: dict | None = None,
                   include: Callable[[str], bool] = lambda rel: True,
                   known: dict[str, str] | None = None) -> dict:
    """List the files under `directory` (those `include` accepts, by relative path)
    with size, sha256 and mtime_ns in manifest.json; `known` maps relative paths to
    sha256s already computed (so a file is hashed once)."""
    files = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and p.name not in (MANIFEST, STAT_CACHE) and include(rel):
            st = p.stat()
            digest = (known or {}).get(rel) or sha256_file(p)
            files[rel] = {"size": st.st_size, "sha256": digest, "mtime_ns": st.st_mtime_ns}
    data = {"files": files, **(extra or {})}
    (directory / STAT_CACHE).unlink(missing_ok=True)
    _atomic_write_json(directory / MANIFEST, data)
    return data


def read_manifest(directory: Path) -> Optional[dict]:
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def changed_files(directory: Path, manifest: Optional[dict] = None) -> Optional[list[str]]:
    """Files the manifest lists that are gone or whose bytes changed; None: no manifest.

    Cheap: a file whose size and mtime_ns are as recorded is trusted; only a file whose
    stat changed is hashed again (and, if its bytes are unchanged, its new stat is
    remembered beside the manifest so the next check is cheap again).
    """
    manifest = manifest or read_manifest(directory)
    if manifest is None:
        return None
    try:
        reverified = json.loads((directory / STAT_CACHE).read_text())
    except (OSError, ValueError):
        reverified = {}
    changed, learned = [], {}
    for rel, meta in manifest["files"].items():
        p = directory / rel
        try:
            st = p.stat()
        except OSError:
            changed.append(rel)
            continue
        if st.st_size != meta["size"]:
            changed.append(rel)
            continue
        if st.st_mtime_ns in (meta.get("mtime_ns"), reverified.get(rel)):
            continue
        if sha256_file(p) == meta["sha256"]:
            learned[rel] = st.st_mtime_ns
        else:
            changed.append(rel)
    if learned and not changed:
        try:
            _atomic_write_json(directory / STAT_CACHE, {**reverified, **learned})
        except OSError:  # a read-only cache still answers correctly, only slower
            pass
    return changed


def outputs_intact(directory: Path) -> bool:
    """True when `directory` has a manifest and every file it lists is unchanged."""
    changed = changed_files(Path(directory))
    return changed == []


def dir_size(directory: Path) -> int:
    total = 0
    for root, _, names in os.walk(directory):
        for n in names:
            try:
                total += os.lstat(os.path.join(root, n)).st_size
            except OSError:
                pass
    return total


# --------------------------------------------------------------------------- policy

@dataclass
class ContentCachePolicy(CachePolicy):
    """A Prefect cache policy keyed by `key_fn(**task_parameters)`.

    With `intact_fn`, the cached outputs are checked while holding the key's lock: a
    record whose outputs are gone or changed is expired, so the task runs again and
    overwrites it. Checking under the lock matters when two runs share a key: the one
    that waits sees the other's finished outputs and reuses them. (Prefect's
    `refresh_cache` is decided before the lock is taken, so it cannot do this.)
    """

    key_fn: Optional[Callable[..., str]] = None
    intact_fn: Optional[Callable[..., bool]] = None

    def compute_key(self, task_ctx, inputs: dict, flow_parameters: dict,
                    **kwargs: Any) -> Optional[str]:
        key = self.key_fn(**inputs)
        if self.intact_fn is not None:
            store = getattr(task_ctx, "result_store", None)
            if store is not None and self.lock_manager is not None:
                expire_if_damaged(store, self.lock_manager, key,
                                  lambda: self.intact_fn(**inputs))
        return key


def expire_if_damaged(store, lock_manager, key: str, intact: Callable[[], bool]) -> bool:
    """Under the key's lock: if a record exists but `intact()` is False, overwrite the
    record with an expired one (a miss for every reader, whatever the storage block).
    Returns True when it expired a record."""
    holder = f"loraflow-check-{uuid.uuid4().hex}"
    lock_manager.acquire_lock(key, holder)
    try:
        if intact() or not store.exists(key):
            return False
        past = datetime.now(timezone.utc) - timedelta(days=1)
        store.write(None, key=key, expiration=past, holder=holder)
        log.info("cached outputs of %s are gone or changed: running the step again", key)
        return True
    finally:
        lock_manager.release_lock(key, holder)


def lock_dir() -> Path:
    return settings.loraflow_home() / "locks"


def content_cache_policy(key_fn: Callable[..., str], lock_dir: Path,
                         intact_fn: Optional[Callable[..., bool]] = None) -> ContentCachePolicy:
    """SERIALIZABLE isolation with a lock manager: two runs with the same key at the
    same time — one computes, the other waits and reuses the result."""
    return ContentCachePolicy(key_fn=key_fn, intact_fn=intact_fn,
                              isolation_level="SERIALIZABLE",
                              lock_manager=OrphanBreakingLockManager(lock_dir))


_blocks_seen: set[str] = set()


def _result_storage():
    """settings.result_storage(), checked: bad values fail before any step runs."""
    from tasks.errors import SettingsError

    try:
        storage = settings.result_storage()
        settings.lock_lease_seconds()
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    if isinstance(storage, str) and storage not in _blocks_seen:
        from prefect.blocks.core import Block

        try:
            Block.load(storage)
        except ValueError:
            raise SettingsError(
                f"LORAFLOW_RESULT_STORAGE={storage!r}: no saved Prefect block with that slug "
                "on this Prefect API. Fix: save one (e.g. LocalFileSystem(basepath="
                "'/mnt/shared/prefect-results').save('loraflow-results')), or unset it.") from None
        _blocks_seen.add(storage)
    return storage


def cache_options(key_fn: Callable[..., str],
                  intact_fn: Optional[Callable[..., bool]] = None) -> dict:
    """`Task.with_options` arguments for a content-cached step: the policy above,
    persisted results in the configured result storage (settings.result_storage).

    Raises:
        SettingsError: LORAFLOW_RESULT_STORAGE or LORAFLOW_LOCK_LEASE_S is unusable.
    """
    return dict(cache_policy=content_cache_policy(key_fn, lock_dir(), intact_fn),
                persist_result=True, result_storage=_result_storage())


# ---------------------------------------------------------------------------- locks

def _host_identity() -> dict:
    """Who holds a lock: host name, boot id and pid namespace (a pid is only
    meaningful inside one pid namespace of one boot of one host)."""
    def read(path: str) -> Optional[str]:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = None
    return {"host": socket.gethostname(), "boot_id": read("/proc/sys/kernel/random/boot_id"),
            "pidns": pidns}


def _process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (guards against pid reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Heartbeat:
    """Refreshes the mtime of the lock files this process holds, so waiters on other
    hosts (which cannot check our pid) can tell a live holder from a dead one."""

    def __init__(self):
        self.paths: set[str] = set()
        self.mutex = threading.Lock()
        self.thread: Optional[threading.Thread] = None

    def add(self, path: Path) -> None:
        with self.mutex:
            self.paths.add(str(path))
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="loraflow-lock-heartbeat",
                                               daemon=True)
                self.thread.start()

    def discard(self, path: Path) -> None:
        with self.mutex:
            self.paths.discard(str(path))

    def _run(self) -> None:
        while True:
            try:
                lease = settings.lock_lease_seconds()
            except ValueError:
                lease = 120.0
            time.sleep(max(lease / 4, 0.05))
            with self.mutex:
                paths = list(self.paths)
            for p in paths:
                try:
                    os.utime(p)
                except OSError:
                    pass


_HEARTBEAT = _Heartbeat()


class OrphanBreakingLockManager(FileSystemLockManager):
    """File locks for Prefect transactions that a dead holder cannot keep forever.

    Prefect's FileSystemLockManager, as transactions call it, sets no hold timeout, so
    a SIGKILLed run would block its own re-run forever. Here the lock file is created
    whole (written aside, then hard-linked into place: atomic, also on NFS) and holds
    the holder, host identity, pid and process start time. A lock is broken when:

    - its holder ran on this host (same boot, same pid namespace) and that process is
      gone (or the pid now belongs to another process);
    - its holder ran elsewhere and the lock file's mtime — refreshed by the holder's
      heartbeat every lease/4 seconds — has not moved for `lease` seconds, as timed
      by the waiter's own clock (no clock sync between hosts needed).

    The lease comes from LORAFLOW_LOCK_LEASE_S (default 120 s); with locks on storage
    that several hosts mount this is the multi-host lock manager.
    """

    def __init__(self, lock_files_directory: Path, lease_seconds: Optional[float] = None):
        super().__init__(Path(lock_files_directory))
        self.lease = lease_seconds
        self._observed: dict[str, tuple[tuple, float]] = {}

    def _lease(self) -> float:
        return self.lease if self.lease is not None else settings.lock_lease_seconds()

    def _lock_path_for_key(self, key: str) -> Path:
        return self.lock_files_directory / f"{key}.lock"

    # -- reading and judging

    def _read(self, key: str) -> Optional[dict]:
        """The lock's record, {} when unreadable (being written, foreign), None when free."""
        path = self._lock_path_for_key(key)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(raw) if raw else {}
        except ValueError:
            info = {}
        if not isinstance(info, dict):
            info = {}
        info["_stat"] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return info

    def _orphaned(self, key: str, info: dict) -> bool:
        me = _host_identity()
        expiration = info.get("expiration")
        if expiration:
            try:
                if datetime.fromisoformat(expiration) < datetime.now(timezone.utc):
                    return True
            except ValueError:
                pass
        if info.get("host") == me["host"]:
            if info.get("boot_id") and me["boot_id"] and info["boot_id"] != me["boot_id"]:
                return True  # this host rebooted since: every process of then is gone
            if info.get("pidns") == me["pidns"] and isinstance(info.get("pid"), int):
                if not _pid_alive(info["pid"]):
                    return True
                started = info.get("started")
                return bool(started and _process_start(info["pid"]) not in (None, started))
        # Another host (or an unreadable lock): alive while its heartbeat moves.
        seen = info["_stat"]
        now = time.monotonic()
        first = self._observed.get(key)
        if first is None or first[0] != seen:
            self._observed[key] = (seen, now)
            return False
        return now - first[1] > self._lease()

    def _break(self, key: str, info: dict) -> None:
        """Remove the orphaned lock — only if the file is still the one judged."""
        path = self._lock_path_for_key(key)
        aside = path.with_name(f"{path.name}.broken-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        try:
            if os.stat(aside).st_ino != info["_stat"][0]:
                # A new holder took the lock after our judgement: give it back.
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
            else:
                log.warning("broke the lock %s held by dead holder %s (host %s, pid %s)",
                            key, info.get("holder"), info.get("host"), info.get("pid"))
        finally:
            aside.unlink(missing_ok=True)
            self._observed.pop(key, None)

    # -- the LockManager protocol

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        info = self._read(key)
        if info is None:
            return False
        if self._orphaned(key, info):
            self._break(key, info)
            return self._read(key) is not None
        return True

    def is_lock_holder(self, key: str, holder: str) -> bool:
        info = self._read(key)
        return info is not None and info.get("holder") == holder

    def _try_create(self, key: str, holder: str, hold_timeout: Optional[float]) -> bool:
        self._ensure_lock_files_directory_exists()
        path = self._lock_path_for_key(key)
        me = _host_identity()
        expiration = (datetime.now(timezone.utc) + timedelta(seconds=hold_timeout)
                      if hold_timeout is not None else None)
        record = {"holder": holder, **me, "pid": os.getpid(),
                  "started": _process_start(os.getpid()),
                  "acquired": datetime.now(timezone.utc).isoformat(),
                  "expiration": expiration.isoformat() if expiration else None}
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(record))
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create instead
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record))
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def acquire_lock(self, key: str, holder: str, acquire_timeout: Optional[float] = None,
                     hold_timeout: Optional[float] = None) -> bool:
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            if self._try_create(key, holder, hold_timeout):
                _HEARTBEAT.add(self._lock_path_for_key(key))
                return True
            if self.is_lock_holder(key, holder):
                return True
            if self.is_locked(key):
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                time.sleep(0.1)

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: Optional[float] = None,
                            hold_timeout: Optional[float] = None) -> bool:
        import anyio

        return await anyio.to_thread.run_sync(
            lambda: self.acquire_lock(key, holder, acquire_timeout, hold_timeout))

    def release_lock(self, key: str, holder: str) -> None:
        path = self._lock_path_for_key(key)
        _HEARTBEAT.discard(path)
        info = self._read(key)
        if info is None or info.get("holder") != holder:
            # Broken while we held it (our heartbeat stalled past the lease): the result
            # is written already; say so rather than fail the finished step.
            log.warning("lock %s was no longer held by %s at release", key, holder)
            return
        path.unlink(missing_ok=True)

    def wait_for_lock(self, key: str, timeout: Optional[float] = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    async def await_for_lock(self, key: str, timeout: Optional[float] = None) -> bool:
        import anyio

        return await anyio.to_thread.run_sync(lambda: self.wait_for_lock(key, timeout))

    def holder_info(self, key: str) -> Optional[dict]:
        """The lock's record (holder, host, pid, acquired) or None when free."""
        info = self._read(key)
        if info is not None:
            info.pop("_stat", None)
        return info
