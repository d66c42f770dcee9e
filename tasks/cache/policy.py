"""The Prefect cache policy of a content-keyed step and the task options that use it."""
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
