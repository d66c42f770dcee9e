"""The task options a step declares where it is defined (`@task(name="download",
**cache_options(download_key, download_is_cached_and_intact), **TRANSIENT_RETRIES)`):
its content-keyed cache, and the hooks that hand its final state to the run report.

Built at import, used at run time: the lock directory (LORAFLOW_HOME/locks) and the
result storage (LORAFLOW_RESULT_STORAGE, default LORAFLOW_HOME/results) are read when a
task run computes its key, so a process may set or change them after the steps were
imported (the CLI's --set, tests that give each module its own home).
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from prefect.cache_policies import CachePolicy

from tasks import settings
from tasks.cache.locks import OrphanBreakingLockManager

log = logging.getLogger("loraflow.caching")


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
        store = getattr(task_ctx, "result_store", None)
        if store is not None:
            # The storage is read now, not when the task was defined. Prefect's task
            # engine computes the key first and then opens the transaction on this same
            # store (prefect/task_engine.py `transaction_context`); the store is this
            # task run's own copy (`ResultStore.update_for_task`).
            store.result_storage = current_result_storage()
            if self.intact_fn is not None and self.lock_manager is not None:
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
    """LORAFLOW_HOME/locks as it is now (settings.lock_dir)."""
    return settings.lock_dir()


def content_cache_policy(key_fn: Callable[..., str],
                         intact_fn: Optional[Callable[..., bool]] = None) -> ContentCachePolicy:
    """SERIALIZABLE isolation with a lock manager: two runs with the same key at the
    same time — one computes, the other waits and reuses the result. The lock manager
    finds LORAFLOW_HOME/locks when it is used."""
    return ContentCachePolicy(key_fn=key_fn, intact_fn=intact_fn,
                              isolation_level="SERIALIZABLE",
                              lock_manager=OrphanBreakingLockManager())


# ------------------------------------------------------------------ result storage

_blocks: dict[str, Any] = {}


def current_result_storage():
    """The storage block for cached steps' result records, from LORAFLOW_RESULT_STORAGE
    as it is now: a LocalFileSystem on the path (default LORAFLOW_HOME/results), or the
    saved Prefect block the slug names (loaded once per process).

    Prefect's own result settings (PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK,
    PREFECT_LOCAL_STORAGE_PATH) are read once, when prefect is imported, and a `@task`
    takes only a saved block or a slug: neither can follow a LORAFLOW_HOME set later, so
    the policy resolves the storage when a run uses it.

    Raises:
        SettingsError: LORAFLOW_RESULT_STORAGE is unusable (see check_storage_settings).
    """
    from prefect.filesystems import LocalFileSystem

    from tasks.errors import SettingsError

    try:
        storage = settings.result_storage()
    except ValueError as exc:
        raise SettingsError(str(exc), variable="LORAFLOW_RESULT_STORAGE") from None
    if isinstance(storage, Path):
        return LocalFileSystem(basepath=str(storage))
    if storage not in _blocks:
        from prefect.blocks.core import Block

        try:
            _blocks[storage] = Block.load(storage)
        except ValueError:
            raise SettingsError(
                f"LORAFLOW_RESULT_STORAGE={storage!r}: no saved Prefect block with that slug "
                "on this Prefect API. Fix: save one (e.g. LocalFileSystem(basepath="
                "'/mnt/shared/prefect-results').save('loraflow-results')), or unset it.",
                variable="LORAFLOW_RESULT_STORAGE") from None
    return _blocks[storage]


def check_storage_settings() -> None:
    """LORAFLOW_RESULT_STORAGE and LORAFLOW_LOCK_LEASE_S checked, for a flow to call
    before its first step: inside a task run a bad value would only make Prefect skip
    the cache (it logs an unusable key and runs the step uncached).

    Raises:
        SettingsError: naming the variable, its value and the fix.
    """
    from tasks.errors import SettingsError

    current_result_storage()
    try:
        settings.lock_lease_seconds()
    except ValueError as exc:
        raise SettingsError(str(exc), variable="LORAFLOW_LOCK_LEASE_S") from None


# ------------------------------------------------------------------ run report hooks

# flow run id → step name → (Prefect's final state of the step's task run, its task run),
# for the last _KEEP_RUNS flow runs of this process.
_finished: dict[str, dict[str, tuple]] = {}
_KEEP_RUNS = 64


def record_step(task, task_run, state) -> None:
    """Task state hook (on_running, on_completion, on_failure): keep the step's final
    state and task run for its flow run's report, and say on stderr where the run is.
    Prefect calls it in the flow's process before the task call returns, so the report
    needs no round trip to the API (where task-run states arrive asynchronously)."""
    import sys

    name = task.name.replace("-", "_")
    if state.is_running():
        if task_run.run_count <= 1:
            print(f"▶ {name}", file=sys.stderr, flush=True)
        return
    if task_run.flow_run_id is not None:
        run = str(task_run.flow_run_id)
        if run not in _finished and len(_finished) >= _KEEP_RUNS:
            _finished.pop(next(iter(_finished)))  # the oldest run's report is long built
        _finished.setdefault(run, {})[name] = (state, task_run)
    seconds = step_seconds(state, task_run)
    if state.is_completed():
        kind = "cached" if state.name == "Cached" else "completed"
        print(f"✔ {name} {kind} in {seconds:.1f}s", file=sys.stderr, flush=True)
    else:
        print(f"✘ {name} failed after {seconds:.1f}s", file=sys.stderr, flush=True)


def step_seconds(state, task_run) -> float:
    """From the task run's creation to its final state: a cache hit's wait for the key's
    lock counts, as do retries."""
    started = task_run.expected_start_time or task_run.created
    return round((state.timestamp - started).total_seconds(), 3) if started else 0.0


def finished_steps(flow_run_id) -> dict[str, tuple]:
    """The steps of a flow run of this process that reached a final state, in the order
    they did: name → (Prefect's final state, the task run).

    Args:
        flow_run_id: the flow run.
    """
    return dict(_finished.get(str(flow_run_id), {}))


REPORT_HOOKS = dict(on_running=[record_step], on_completion=[record_step],
                    on_failure=[record_step])


def cache_options(key_fn: Callable[..., str],
                  intact_fn: Optional[Callable[..., bool]] = None) -> dict:
    """`@task` arguments for a content-cached step: the policy above, persisted results
    (in the storage `current_result_storage` finds when the step runs), and the report
    hooks. Safe at import: nothing is read from the environment here.

    Args:
        key_fn: the step's key, called with the task's parameters.
        intact_fn: whether a hit's outputs are still there and unchanged (same call).
    Returns:
        Keyword arguments for `prefect.task`.
    """
    return dict(cache_policy=content_cache_policy(key_fn, intact_fn), persist_result=True,
                **REPORT_HOOKS)
