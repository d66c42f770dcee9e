"""The retry policy shared by the steps: retry only what can heal.

HTTP 408/429/5xx, connection failures and timeouts (tasks/errors.py `is_transient`) are
retried with Prefect's own exponential backoff, 2 s, 4 s, 8 s, each delay jittered by
Prefect per retry (`retry_jitter_factor`, applied in prefect/task_engine.py). Bad input,
auth, gated access, not-found and OOM fail at once.
"""
from __future__ import annotations

from prefect.tasks import exponential_backoff

from tasks.errors import is_transient


def _retry_if_transient(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


TRANSIENT_RETRIES = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2),
                         retry_jitter_factor=0.25, retry_condition_fn=_retry_if_transient)
