"""A transformers TrainerCallback that shows a training as it learns, where people look.

- The run's log (Prefect's, so the UI and the CLI's stderr): one line per logging step,
  rounded — `step 10/60 · loss 2.3412 · lr 1.8e-04 · grad_norm 0.913`; eval steps add
  `eval loss`. Outside a Prefect run (a torchrun rank, whose output the train step relays
  into its log line by line; a bench script) the lines go to stderr.
- A progress artifact (`training-progress-<key>`): the share of optimizer steps done, its
  description the latest metric line.
- A markdown artifact (`training-metrics-<key>`) updated in place as it trains: the table
  of logged figures. Text, not an image: it renders in the UI whatever the publication's
  privacy (an image on a private Hub repo cannot load there).

Written here rather than taken from transformers: its ProgressCallback / PrinterCallback
print raw dicts to stdout (or a tqdm bar), not to a Prefect log or artifact. An API error
never stops training: progress is a view, not part of the result.
"""
from __future__ import annotations

import re
import sys
import time
from typing import Optional
from uuid import UUID

from transformers import TrainerCallback

TABLE_ROWS = 30  # the artifact's table shows the latest rows; record.json keeps them all


def progress_key(train_key: str) -> str:
    """The artifact key of a training: by its cache key, not where it will be published
    (a training's outputs and views depend on its key alone). Prefect artifact keys:
    lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"training-progress-{train_key[:16]}".lower()).strip("-")


def metrics_key(train_key: str) -> str:
    """The key of a training's live metrics artifact (same rule as progress_key)."""
    return re.sub(r"[^a-z0-9-]+", "-", f"training-metrics-{train_key[:16]}".lower()).strip("-")


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return bool(TaskRunContext.get() or FlowRunContext.get())


def metric_line(step: int, max_steps: int, logs: dict) -> Optional[str]:
    """One rounded line for one Trainer log, or None for a log without figures.

    Args:
        step: the optimizer step the log belongs to.
        max_steps: the training's total steps.
        logs: what the Trainer logged (loss, learning_rate, grad_norm; eval_loss;
            train_loss and train_runtime at the end).
    Returns:
        `step 10/60 · loss 2.3412 · lr 1.8e-04 · grad_norm 0.913`, `step 10/60 · eval loss
        2.2871`, or `step 60/60 · done · mean loss 2.5012 · 37.9 s`.
    """
    parts = []
    if "train_runtime" in logs:
        parts.append("done")
        if "train_loss" in logs:
            parts.append(f"mean loss {logs['train_loss']:.4f}")
        parts.append(f"{logs['train_runtime']:.1f} s")
    else:
        if "loss" in logs:
            parts.append(f"loss {logs['loss']:.4f}")
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.1e}")
        if logs.get("grad_norm") is not None:
            parts.append(f"grad_norm {logs['grad_norm']:.3f}")
        if "eval_loss" in logs:
            parts.append(f"eval loss {logs['eval_loss']:.4f}")
    return f"step {step}/{max_steps} · " + " · ".join(parts) if parts else None


def _cell(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def metrics_markdown(rows: list[dict], step: int, max_steps: int) -> str:
    """The live metrics artifact's markdown: where the training is and the latest logged
    rows. (The chart comes with the publication's loss-curve artifact, flows/artifacts.py:
    the training's code key does not cover the publication's rendering.)

    Args:
        rows: [{"step", "loss", "learning_rate", "grad_norm", "eval_loss"}] by step
            (absent figures None).
        step, max_steps: where the training is.
    Returns:
        The markdown.
    """
    percent = round(100.0 * step / max_steps) if max_steps else 0
    out = [f"### Training: step {step} of {max_steps} ({percent}%)", ""]
    shown = rows[-TABLE_ROWS:]
    out += ["| step | loss | eval loss | learning rate | grad norm |",
            "|---:|---:|---:|---:|---:|"]
    out += [f"| {r['step']} | {_cell(r.get('loss'), '.4f')} | {_cell(r.get('eval_loss'), '.4f')}"
            f" | {_cell(r.get('learning_rate'), '.2e')} | {_cell(r.get('grad_norm'), '.3f')} |"
            for r in shown]
    if len(rows) > len(shown):
        out += ["", f"({len(rows) - len(shown)} earlier rows: the run's record.json, "
                "loss_history)"]
    return "\n".join(out) + "\n"


class TrainingProgress(TrainerCallback):
    """Logs a metric line per Trainer log and keeps the run's progress and metrics
    artifacts up to date (rank 0 only).

    Args:
        train_key: the training's cache key, for the artifacts' stable keys (their history
            in the UI: every attempt of this training).
        min_interval_s: at most one artifact update per interval (plus eval logs and
            the end).
    """

    def __init__(self, train_key: str, min_interval_s: float = 1.0):
        self.key = progress_key(train_key)
        self.metrics_key = metrics_key(train_key)
        self.min_interval_s = min_interval_s
        self.artifact_id: Optional[UUID] = None
        self.metrics_id: Optional[UUID] = None
        self.rows: list[dict] = []
        self.line = ""  # the latest metric line, the progress artifact's description
        self._last = (-1.0, 0.0)  # (percent, monotonic time) of the last progress update
        self._last_metrics = 0.0

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 — never let the UI view break training
            print(f"loraflow: progress artifacts disabled ({type(exc).__name__}: {exc})",
                  file=sys.stderr)
            self.artifact_id = self.metrics_id = None
            return None

    def _description(self, state) -> str:
        return self.line or f"training: step {state.global_step} of {state.max_steps}"

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not _in_prefect_run():
            return
        from prefect.artifacts import create_markdown_artifact, create_progress_artifact

        percent = self._percent(state)
        self.artifact_id = self._call(create_progress_artifact, progress=percent, key=self.key,
                                      description=self._description(state))
        self._last = (percent, time.monotonic())
        if self.artifact_id is not None:
            self.metrics_id = self._call(
                create_markdown_artifact, key=self.metrics_key,
                markdown=metrics_markdown(self.rows, state.global_step, state.max_steps),
                description="training metrics, updated as it trains")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = metric_line(state.global_step, state.max_steps, logs)
        if line is None or self._repeated_eval(state.global_step, logs):
            return
        self._log(line)
        if "train_runtime" in logs:
            return
        self.line = line
        figures = {k: logs.get(k) for k in ("loss", "learning_rate", "grad_norm", "eval_loss")
                   if logs.get(k) is not None}
        if self.rows and self.rows[-1]["step"] == state.global_step:
            self.rows[-1].update(figures)
        else:
            self.rows.append({"step": state.global_step, **figures})
        evaluated = "eval_loss" in logs
        if evaluated:  # the eval after training comes after on_train_end
            self._update(state, final=state.global_step >= state.max_steps, force=True)
        self._update_metrics(state, force=evaluated)

    def on_step_end(self, args, state, control, **kwargs):
        self._update(state, final=False)

    def on_train_end(self, args, state, control, **kwargs):
        self._update(state, final=True)
        self._update_metrics(state, force=True)

    def _repeated_eval(self, step: int, logs: dict) -> bool:
        """The same evaluation again at the same step (run_train evaluates after training,
        which the last eval step may just have done): one line is enough."""
        last = self.rows[-1] if self.rows else {}
        return ("eval_loss" in logs and "loss" not in logs and last.get("step") == step
                and last.get("eval_loss") == logs["eval_loss"])

    @staticmethod
    def _log(line: str) -> None:
        log_line(line)

    @staticmethod
    def _percent(state) -> float:
        return round(100.0 * state.global_step / state.max_steps, 1) if state.max_steps else 0.0

    def _update(self, state, final: bool, force: bool = False) -> None:
        if self.artifact_id is None:
            return
        percent = 100.0 if final else self._percent(state)
        last_percent, last_time = self._last
        if not force and (percent == last_percent or (
                not final and time.monotonic() - last_time < self.min_interval_s)):
            return
        from prefect.artifacts import update_progress_artifact

        self._call(update_progress_artifact, artifact_id=self.artifact_id, progress=percent,
                   description=self._description(state))
        self._last = (percent, time.monotonic())

    def _update_metrics(self, state, force: bool) -> None:
        """Replace the metrics artifact's markdown in place (PATCH /artifacts/{id}: one
        artifact per attempt, not a new version per log)."""
        if self.metrics_id is None or (
                not force and time.monotonic() - self._last_metrics < self.min_interval_s):
            return
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactUpdate

        markdown = metrics_markdown(self.rows, state.global_step, state.max_steps)

        def patch():
            with get_client(sync_client=True) as client:
                client.update_artifact(artifact_id=self.metrics_id,
                                       artifact=ArtifactUpdate(data=markdown))

        self._call(patch)
        self._last_metrics = time.monotonic()


def log_line(line: str, warning: bool = False) -> None:
    """One line to the Prefect run's log (a training task), else to stderr (a torchrun
    worker, a bench)."""
    if _in_prefect_run():
        from prefect.logging import get_run_logger

        logger = get_run_logger()
        (logger.warning if warning else logger.info)(line)
    else:
        print(line, file=sys.stderr, flush=True)
