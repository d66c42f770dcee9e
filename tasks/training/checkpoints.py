"""Never lose work: checkpoints a run can resume from, the stop on SIGTERM/SIGINT, and
the per-attempt step log.

A checkpoint is saved every `training.save_steps` by transformers' Trainer; a retry, or a
re-run after the process was killed, resumes from the last *complete* one (weights,
optimizer, scheduler, RNG and data position, through `resume_from_checkpoint`; one cut
short by the kill is skipped and pruned). SIGTERM — a cancel from the Prefect UI, a pod
eviction — or Ctrl-C finishes the current step, saves a checkpoint and stops; a second
signal acts at once. Each attempt appends what it did to `train_log.jsonl` in the run
directory (start, steps, losses, checkpoints, stop).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from tasks.training.adapters import adapter_weights_path

STEP_LOG = "train_log.jsonl"
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def checkpoint_step(checkpoint: Optional[str]) -> int:
    """The optimizer step a checkpoint directory (`checkpoint-<step>`) was saved at; 0 for
    none."""
    return int(Path(checkpoint).name.split("-")[1]) if checkpoint else 0


def checkpoint_complete(path: Path, step: int) -> bool:
    """Trainer writes trainer_state.json last: a checkpoint is complete when it parses
    and names this step, and the weights, optimizer and scheduler are there."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    has_weights = any((path / n).is_file() for n in ("adapter_model.safetensors",
                                                     "model.safetensors")) \
        or adapter_weights_path(path) is not None  # a named adapter: in its sub-folder
    return (state.get("global_step") == step and has_weights
            and all((path / n).is_file() for n in CHECKPOINT_FILES))


def last_checkpoint(run_dir: Path, prune: bool = True) -> Optional[str]:
    """The newest complete checkpoint under RUN_DIR/checkpoints.

    Not transformers' `get_last_checkpoint`: it returns the newest checkpoint whether or
    not it is complete, and a kill in the middle of a save leaves an incomplete one; this
    walks back to the newest complete one. Imports no torch (`loraflow cache ls` uses it).

    Args:
        run_dir: the run directory.
        prune: remove newer checkpoints cut short by a kill (the run saves under those
            names again). Only one process of a run may prune.

    Returns:
        The checkpoint's path, or None when there is none to resume from.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return None
    found = []
    for p in ckpt_dir.iterdir():
        name, _, step = p.name.partition("-")
        if p.is_dir() and name == "checkpoint" and step.isdigit():
            found.append((int(step), p))
    for step, path in sorted(found, reverse=True):
        if checkpoint_complete(path, step):
            return str(path)
        if prune:
            shutil.rmtree(path, ignore_errors=True)
    return None


def finished_checkpoint(resume: Optional[str]) -> Optional[dict]:
    """The checkpoint's trainer state when it is the last step of the run, else None."""
    if resume is None:
        return None
    state = json.loads((Path(resume) / "trainer_state.json").read_text())
    done = state.get("max_steps") and state["global_step"] >= state["max_steps"]
    return state if done else None


def restore_finished(trainer, model, resume: str):
    """Load a final checkpoint's adapter weights and trainer state, for a run killed after
    its last checkpoint and before its adapter was saved (Trainer would train one step too
    many from there).

    Returns:
        A transformers TrainOutput whose training_loss is the step-weighted mean of the
        logged losses.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    set_peft_model_state_dict(model, load_file(str(adapter_weights_path(Path(resume)))),
                              adapter_name=model.active_adapter)
    trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
    total, last = 0.0, 0
    for h in trainer.state.log_history:
        if "loss" in h:
            total, last = total + h["loss"] * (h["step"] - last), h["step"]
    return TrainOutput(trainer.state.global_step, total / last if last else 0.0, {})


class StepLog:
    """Appends one JSON line per event of this attempt to a run's step log.

    Args:
        path: RUN_DIR/train_log.jsonl (rank 0) or train_log.rank<N>.jsonl.
        resume_from: the step this attempt starts from (0: from scratch).
    """

    def __init__(self, path: Path, resume_from: int):
        self.path, self.attempt = path, uuid.uuid4().hex[:12]
        self.file = open(path, "a", buffering=1)
        self.write("start", resume_from, resume_from=resume_from)

    def write(self, event: str, step: int, **extra) -> None:
        self.file.write(json.dumps({"event": event, "step": step, "attempt": self.attempt,
                                    "pid": os.getpid(), "time": round(time.time(), 3),
                                    **extra}) + "\n")

    def close(self) -> None:
        self.file.close()


def read_step_log(run_dir: Path) -> list[dict]:
    """The events of every attempt (rank 0), oldest first (see StepLog)."""
    path = Path(run_dir) / STEP_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class StopRequest:
    """The signal that asked training to stop, once one arrived (None until then)."""
    signum: Optional[int] = None


@contextmanager
def stop_on_signals(stop: StopRequest):
    """While training: SIGTERM or SIGINT asks for a checkpoint and a stop at the end of
    the current step (see save_and_stop_callback). The previous handlers — Prefect's
    SIGTERM bridge, Python's KeyboardInterrupt — come back at once, so a second signal
    acts as it would have without us. Signals can only be caught on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        stop.signum = signum
        signal.signal(signum, previous.get(signum) or signal.SIG_DFL)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, old if old is not None else signal.SIG_DFL)


def save_and_stop_callback(stop: StopRequest, steps: StepLog):
    """A TrainerCallback that logs each step, loss and checkpoint to `steps`, and saves
    and stops at the end of the step in which a stop was requested."""
    from transformers import TrainerCallback

    class SaveAndStop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.write("step", state.global_step)
            if stop.signum is not None:
                control.should_save = True
                control.should_training_stop = True
            if control.should_save:
                # Log at every checkpoint: the checkpoint's log history then accounts for
                # every step's loss up to it, so a resumed run can report the mean loss
                # over all steps (record.mean_train_loss), not only those after the resume.
                control.should_log = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                steps.write("loss", state.global_step, loss=logs["loss"])

        def on_save(self, args, state, control, **kwargs):
            steps.write("checkpoint", state.global_step)

    return SaveAndStop()
