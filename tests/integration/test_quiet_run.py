"""Quiet by default: `loraflow run quickstart` as a new process on a fresh PREFECT_HOME
prints no warning, no raw terminal control bytes (progress bars, cursor moves), no
Trainer dicts and no traceback; apart from its metric lines its stderr is under 40 lines.
A process boundary is the point (what reaches the terminal), as in test_startup.py.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
METRIC = re.compile(rf"step \d+/{STEPS} · ")
# Cursor escapes and the carriage returns a bar redraws itself with; tqdm's bar shape.
CONTROL = re.compile(r"[\x1b\r\x08]")
BAR = re.compile(r"\d+%\|")


def test_a_plain_quickstart_run_is_quiet(tmp_path, hub):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "LORAFLOW_HOME": str(tmp_path / "loraflow"), "HF_HOME": str(tmp_path / "hf"),
           "HF_TOKEN": hub.token("demo"), "PYTHONUNBUFFERED": "1"}
    for name in ("LORAFLOW_DEBUG", "HF_HUB_DISABLE_PROGRESS_BARS",
                 "HF_DATASETS_DISABLE_PROGRESS_BARS", "PYTHONWARNINGS"):
        env.pop(name, None)  # the CLI's own defaults are what is tested
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "quickstart", "--set",
                           f"training.max_steps={STEPS}", "publish.repo_id=loraflow-demo/quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    err, out = done.stderr, done.stdout
    for text in (err, out):
        assert not CONTROL.search(text), repr(text[:3000])
        assert not BAR.search(text), text
        assert "warning" not in text.lower(), text
        assert "Traceback" not in text and "Logging error" not in text, text
        assert "{'loss'" not in text, text  # the Trainer's log dicts
    lines = err.splitlines()
    metric = [line for line in lines if METRIC.search(line)]
    # quickstart logs every 5 steps, and the first: 1, 5, 10, 12 (the last), then the
    # end-of-training summary and the final eval loss
    assert [re.search(r"step (\d+)/", m).group(1) for m in metric if " · loss " in m] == \
        ["1", "5", "10", "12"], metric
    assert any(" · eval loss " in m for m in metric), metric
    rest = [line for line in lines if not METRIC.search(line)]
    assert len(rest) < 40, "\n".join(rest)
    print(f"stderr: {len(rest)} lines besides {len(metric)} metric lines")


def test_prefects_drain_notice_is_dropped_and_its_failures_are_not(caplog):
    """Prefect's services warn "Still processing items" while they drain at exit (after
    nearly every worker run); the notice is dropped on the loggers Prefect uses for it,
    while a service's failure, logged elsewhere, still shows."""
    import inspect
    import logging

    from prefect._internal.concurrency import services

    from flows.prefect_runtime import DRAINING_SERVICES, install_log_filter

    source = inspect.getsource(services)
    assert 'logging.getLogger(f"{type(self).__name__}")' in source  # logger = class name
    assert 'f"Still processing items: {queue_size} items remaining..."' in source
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    assert {EventsWorker.__name__, APILogWorker.__name__} == set(DRAINING_SERVICES)
    install_log_filter()
    with caplog.at_level(logging.INFO):
        logging.getLogger("EventsWorker").warning("Still processing items: 3 items remaining...")
        logging.getLogger("EventsWorker").error("Service 'EventsWorker' failed to process item")
        services.logger.error("Service %r failed with %s pending items.", "EventsWorker", 3)
    messages = [r.getMessage() for r in caplog.records]
    assert not any(m.startswith("Still processing items") for m in messages), messages
    assert "Service 'EventsWorker' failed to process item" in messages
    assert "Service 'EventsWorker' failed with 3 pending items." in messages
