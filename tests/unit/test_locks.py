"""OrphanBreakingLockManager: mutual exclusion, and a dead holder never blocks forever —
on this host by pid, from another host by its stopped heartbeat."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tasks.cache import locks
from tasks.cache.locks import OrphanBreakingLockManager, _host_identity

REPO = Path(__file__).resolve().parents[2]
KEY = "train-" + "a" * 64

HOLDER = """
import sys, time
from pathlib import Path
from tasks.cache.locks import OrphanBreakingLockManager
m = OrphanBreakingLockManager(Path(sys.argv[1]))
assert m.acquire_lock(sys.argv[2], "holder-process", acquire_timeout=10)
print("held", flush=True)
time.sleep(600)
"""


def _start_holder(lock_dir: Path, lease: str) -> subprocess.Popen:
    env = {**os.environ, "LORAFLOW_LOCK_LEASE_S": lease}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir), KEY], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_threads_take_turns(tmp_path):
    manager = OrphanBreakingLockManager(tmp_path / "locks")
    counter = tmp_path / "counter"
    counter.write_text("0")
    inside = []

    def work(i):
        for _ in range(20):
            assert manager.acquire_lock(KEY, f"holder-{i}", acquire_timeout=30)
            inside.append(i)
            assert len(inside) == 1, inside  # nobody else is inside
            counter.write_text(str(int(counter.read_text()) + 1))
            inside.remove(i)
            manager.release_lock(KEY, f"holder-{i}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.read_text() == "80"
    assert not manager.is_locked(KEY)


def test_a_lock_whose_holder_was_killed_is_broken(tmp_path):
    lock_dir = tmp_path / "locks"
    holder = _start_holder(lock_dir, lease="120")
    manager = OrphanBreakingLockManager(lock_dir)
    try:
        info = manager.holder_info(KEY)
        assert info["pid"] == holder.pid and info["host"] and info["holder"] == "holder-process"
        assert manager.is_locked(KEY)
        assert manager.acquire_lock(KEY, "me", acquire_timeout=0.5) is False  # alive: wait
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    start = time.monotonic()
    assert manager.acquire_lock(KEY, "me", acquire_timeout=10)
    assert time.monotonic() - start < 2
    assert manager.holder_info(KEY)["pid"] == os.getpid()
    manager.release_lock(KEY, "me")
    assert not (lock_dir / f"{KEY}.lock").exists()


def test_a_holder_on_another_host_is_alive_while_its_heartbeat_moves(tmp_path, monkeypatch):
    """Seen from 'another host' (faked identity), a live holder heartbeats its lock file
    every lease/4 s and keeps it; once killed, its lock is broken after one lease."""
    lock_dir = tmp_path / "locks"
    holder = _start_holder(lock_dir, lease="1.0")  # heartbeat every 0.25 s
    monkeypatch.setattr(locks, "_host_identity",
                        lambda: {"host": "elsewhere", "boot_id": None, "pidns": None})
    manager = OrphanBreakingLockManager(lock_dir, lease_seconds=1.0)
    try:
        assert manager.acquire_lock(KEY, "me", acquire_timeout=3.5) is False  # > 3 leases
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    start = time.monotonic()
    assert manager.acquire_lock(KEY, "me", acquire_timeout=20)
    assert 0.9 < time.monotonic() - start < 10


def test_a_foreign_lock_without_heartbeat_expires_and_a_half_written_one_waits(tmp_path):
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    path = lock_dir / f"{KEY}.lock"
    path.write_text(json.dumps({"holder": "h", "host": "other-host", "pid": 1}))
    manager = OrphanBreakingLockManager(lock_dir, lease_seconds=2.0)
    assert manager.is_locked(KEY)
    time.sleep(1.2)
    os.utime(path, ns=(time.time_ns(), time.time_ns()))  # a heartbeat
    assert manager.is_locked(KEY)
    time.sleep(1.2)
    assert manager.is_locked(KEY)  # 2.4 s since the first look, 1.2 s since the heartbeat
    time.sleep(1.0)
    assert not manager.is_locked(KEY) and not path.exists()

    path.write_text("")  # created, content not written yet (another manager's fallback)
    assert manager.is_locked(KEY)


def test_a_lock_from_a_previous_boot_of_this_host_is_broken(tmp_path):
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    me = _host_identity()
    (lock_dir / f"{KEY}.lock").write_text(json.dumps(
        {"holder": "h", **me, "boot_id": "another-boot", "pid": os.getpid()}))
    manager = OrphanBreakingLockManager(lock_dir)
    if me["boot_id"]:
        assert not manager.is_locked(KEY)
