"""The retry policy shared by the steps: retry only what can heal.

HTTP 408/429/5xx, connection resets and timeouts are retried with exponential backoff
and jitter (Prefect does not apply its jitter factor to task retries, so the jitter is
in the delays). Bad input, auth, gated access, not-found and OOM fail at once.
"""
from __future__ import annotations

import random

from tasks.errors import is_transient


def _backoff(base: float = 2.0, tries: int = 3) -> list[float]:
    return [round(base * 2**i * random.uniform(0.75, 1.25), 2) for i in range(tries)]


def _retry_if_transient(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


TRANSIENT_RETRIES = dict(retries=3, retry_delay_seconds=_backoff(),
                         retry_condition_fn=_retry_if_transient)
