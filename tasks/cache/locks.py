"""Cross-process, cross-host cache locks that break when their holder died."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

from prefect.locking.filesystem import FileSystemLockManager

from tasks import settings

log = logging.getLogger("loraflow.caching")


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

    def __init__(self, lock_files_directory: Optional[Path] = None,
                 lease_seconds: Optional[float] = None):
        """
        Args:
            lock_files_directory: where the lock files live; None: LORAFLOW_HOME/locks,
                resolved at each use (a step's policy is built at import, while
                LORAFLOW_HOME may be set later, or change between runs of one process).
            lease_seconds: the cross-host lease; None: LORAFLOW_LOCK_LEASE_S at each use.
        """
        self._directory = (None if lock_files_directory is None
                           else Path(lock_files_directory).expanduser().resolve())
        self._locks = {}  # FileSystemLockManager's own bookkeeping (its __init__ is not run)
        self.lease = lease_seconds
        self._observed: dict[str, tuple[tuple, float]] = {}

    @property
    def lock_files_directory(self) -> Path:
        """The directory given, or LORAFLOW_HOME/locks as it is now."""
        return self._directory if self._directory is not None else settings.lock_dir()

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
