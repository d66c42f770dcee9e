"""A transformers TrainerCallback that keeps a Prefect progress artifact up to date.

While a run trains, its page in the Prefect UI shows the share of optimizer steps done.
Outside a Prefect run (a bench script, a plain `run_train` call) it does nothing, and an
API error never stops training: progress is a view, not part of the result.
"""
from __future__ import annotations

import re
import sys
import time
from typing import Optional
from uuid import UUID

from transformers import TrainerCallback


def progress_key(train_key: str) -> str:
    """The artifact key of a training: by its cache key, not where it will be published
    (a training's outputs and views depend on its key alone). Prefect artifact keys:
    lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"training-progress-{train_key[:16]}".lower()).strip("-")


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return bool(TaskRunContext.get() or FlowRunContext.get())


class TrainingProgress(TrainerCallback):
    """Creates the artifact when training begins and updates it as steps complete.

    Args:
        train_key: the training's cache key, for the artifact's stable key (its history
            in the UI: every attempt of this training).
        min_interval_s: at most one update per interval (plus the final 100%).
    """

    def __init__(self, train_key: str, min_interval_s: float = 1.0):
        self.key = progress_key(train_key)
        self.min_interval_s = min_interval_s
        self.artifact_id: Optional[UUID] = None
        self._last = (-1.0, 0.0)  # (percent, monotonic time) of the last update

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 — never let the UI view break training
            print(f"loraflow: progress artifact disabled ({type(exc).__name__}: {exc})",
                  file=sys.stderr)
            self.artifact_id = None
            return None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not _in_prefect_run():
            return
        from prefect.artifacts import create_progress_artifact

        percent = self._percent(state)
        artifact_id = self._call(create_progress_artifact, progress=percent, key=self.key,
                                 description=f"training: step {state.global_step} of "
                                             f"{state.max_steps}")
        self.artifact_id = artifact_id
        self._last = (percent, time.monotonic())

    def on_step_end(self, args, state, control, **kwargs):
        self._update(state, final=False)

    def on_train_end(self, args, state, control, **kwargs):
        self._update(state, final=True)

    @staticmethod
    def _percent(state) -> float:
        return round(100.0 * state.global_step / state.max_steps, 1) if state.max_steps else 0.0

    def _update(self, state, final: bool) -> None:
        if self.artifact_id is None:
            return
        percent = 100.0 if final else self._percent(state)
        last_percent, last_time = self._last
        if percent == last_percent or (
                not final and time.monotonic() - last_time < self.min_interval_s):
            return
        from prefect.artifacts import update_progress_artifact

        self._call(update_progress_artifact, artifact_id=self.artifact_id, progress=percent,
                   description=f"training: step {state.global_step} of {state.max_steps}")
        self._last = (percent, time.monotonic())
