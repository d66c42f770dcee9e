"""The Prefect process around a run: its temporary API server and its error logging.

- Ephemeral mode (no PREFECT_API_URL): Prefect starts a temporary API server as a child
  process (prefect/server/api/server.py `SubprocessASGIServer`, a plain `subprocess.Popen`
  of uvicorn, stopped by an atexit hook). A start-up that runs out of time raises a bare
  RuntimeError, and a CLI killed with SIGKILL runs no atexit hook, so the server lives on
  (ppid 1). `start_prefect_api` starts it up front, in the main thread, turns a start-up
  timeout into one line naming the setting, and leaves a watchdog beside it.
- Expected errors (loraflow's typed errors, and transport errors that the flow turns into
  one) are logged by Prefect's task engine with their traceback; `ExpectedErrorFilter`
  keeps the line and drops the traceback, unless LORAFLOW_DEBUG is set.
- Quiet by default (`quiet_libraries`): the libraries' progress bars (raw cursor escapes
  in a log) are turned off through their documented switches, and the few notices a user
  cannot act on are dropped by exact message; errors are never hidden. docs/observability.md
  lists each one.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

from tasks import settings
from tasks.errors import LoraflowError, SettingsError, is_transient

# Prefect has no option that ties its temporary server's life to the process that
# started it (it relies on atexit), and Popen gets no preexec_fn there, so a second tiny
# process watches both: when the CLI is gone (its parent pid changes), it stops the server.
_WATCHDOG = r"""
import os, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
while alive(server):
    if os.getppid() != parent:
        os.kill(server, signal.SIGTERM)
        for _ in range(50):
            if not alive(server):
                sys.exit(0)
            time.sleep(0.1)
        os.kill(server, signal.SIGKILL)
        sys.exit(0)
    time.sleep(0.5)
"""


def _ephemeral() -> bool:
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return not PREFECT_API_URL.value() and bool(PREFECT_SERVER_EPHEMERAL_ENABLED.value())


def start_prefect_api() -> None:
    """Start Prefect's temporary API server now (ephemeral mode only), with a watchdog
    that stops it if this process dies without its atexit hooks (kill -9).

    Prefect keeps one server per process (`SubprocessASGIServer()` is a singleton), so
    the flow run that follows uses this one. With PREFECT_API_URL set, or a server
    already running, nothing happens.

    Raises:
        SettingsError: the server did not answer within
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (named, with the fix).
    """
    if not _ephemeral():
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    server = SubprocessASGIServer()
    if server.running and server.server_process is not None:
        return
    try:
        server.start()
    except RuntimeError as exc:
        timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        process = server.server_process
        exited = (f"; the server exited with code {process.returncode}"
                  if process is not None and process.poll() is not None else "")
        raise SettingsError(
            f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS={timeout}: Prefect's temporary "
            f"API server did not answer within {timeout} s{exited} ({type(exc).__name__}; "
            "the machine may be busy). Fix: raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_"
            "SECONDS (e.g. 300), or run `prefect server start` once and set PREFECT_API_URL="
            "http://127.0.0.1:4200/api.", variable="PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_"
            "SECONDS") from None
    if server.server_process is not None:
        watch_server(server.server_process.pid)


def watch_server(server_pid: int) -> subprocess.Popen:
    """Start the watchdog that stops `server_pid` once this process is gone.

    It runs in its own session (a Ctrl-C meant for the CLI does not kill it first) with
    no inherited streams (a caller reading the CLI's output to its end is not held open).

    Args:
        server_pid: the temporary API server's process id.
    Returns:
        The watchdog process; it exits by itself when the server has exited.
    """
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(server_pid)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def is_expected(exc: BaseException | None) -> bool:
    """True for an error the user is told about in one line: a loraflow typed error, a
    failed flow wrapping one, or a transport error (the flow turns it into the
    unreachable-Hub error once its retries are spent)."""
    if exc is None:
        return False
    if isinstance(exc, LoraflowError):
        return True
    inner = getattr(exc, "error", None)  # flows.finetune.FlowFailed
    if isinstance(inner, LoraflowError):
        return True
    return is_transient(exc)


class ExpectedErrorFilter(logging.Filter):
    """Drops the traceback from Prefect's task/flow run log records of expected errors.

    Prefect logs a failed task run ("Task run failed with exception: … - Retries are
    exhausted") with `exc_info=True` whatever the exception; a logger filter is the one
    place that covers every handler at once: the console (CLI, worker log) and the API
    handler that sends logs to the UI. The record's line stays, so the error is still
    seen once per run state; LORAFLOW_DEBUG=1 keeps the tracebacks.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not settings.debug_enabled() and is_expected(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
        return True


class ReportHookFilter(logging.Filter):
    """Drops Prefect's two lines per hook call ("Running hook 'record_step' in response
    to entering state …", "Hook 'record_step' finished running successfully") for the
    steps' report hook (tasks/cache/policy.py), which runs on every state of every step;
    a failing hook is still logged (as an error)."""

    NOISE = ("Running hook 'record_step'", "Hook 'record_step' finished")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and isinstance(record.msg, str)
                    and record.msg.startswith(self.NOISE))


class DrainNoticeFilter(logging.Filter):
    """Drops Prefect's "Still processing items: N items remaining..." notice: its
    services (EventsWorker, APILogWorker) log it as a warning whenever events are still
    queued when the process ends and they drain, i.e. after nearly every run. The items
    are still sent; a service that fails logs an error through another logger
    (prefect._internal.concurrency), which stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str)
                    and record.msg.startswith("Still processing items"))


_FILTERS = (ExpectedErrorFilter(), ReportHookFilter())
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")
# Prefect's services log under their class name (prefect/_internal/concurrency/services.py).
DRAINING_SERVICES = ("EventsWorker", "APILogWorker")
_DRAIN_FILTER = DrainNoticeFilter()

# Progress bars off unless the user chose otherwise: each library's documented switch,
# read at import (transformers follows huggingface_hub's). In a log (a Prefect worker, the
# UI, CI) a bar is a stream of carriage returns; the training reports its own metric
# lines instead (tasks.training.progress).
PROGRESS_BAR_SWITCHES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
# Notices nobody running loraflow can act on, dropped by their exact start:
# - peft's PeftModel reads transformers' deprecated `is_gradient_checkpointing`
#   (peft/peft_model.py); the fix is theirs, not a setting of ours.
FOREIGN_DEPRECATIONS = (r"`is_gradient_checkpointing` is deprecated",)
# - bitsandbytes' CPU backend looks for an optional kernels package at import and logs a
#   warning when it is absent (its pure-PyTorch path runs instead).
QUIET_LOGGERS = {"bitsandbytes.backends.cpu.ops": logging.ERROR}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def quiet_libraries() -> None:
    """Turn off the libraries' progress bars and drop the foreign notices listed above
    (idempotent; cheap: it imports nothing heavy).

    A user's own setting wins: HF_HUB_DISABLE_PROGRESS_BARS=0 (or
    HF_DATASETS_DISABLE_PROGRESS_BARS=0) in the environment keeps those bars. Libraries
    already imported are switched off through their runtime calls
    (huggingface_hub.utils.disable_progress_bars, datasets.disable_progress_bars,
    transformers.utils.logging.disable_progress_bar); the others read the environment
    when they are imported.
    """
    for name in PROGRESS_BAR_SWITCHES:
        os.environ.setdefault(name, "1")
    if _truthy(os.environ["HF_HUB_DISABLE_PROGRESS_BARS"]):
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    if _truthy(os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"]) and "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
    for message in FOREIGN_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        if logger.level < level:
            logger.setLevel(level)
    for name in DRAINING_SERVICES:
        logger = logging.getLogger(name)
        if _DRAIN_FILTER not in logger.filters:
            logger.addFilter(_DRAIN_FILTER)


def install_log_filter() -> None:
    """Attach the filters above to Prefect's run loggers, and quiet the libraries
    (quiet_libraries) — idempotent; Prefect's logging set-up may replace handlers, so it
    is called at every flow start, which also covers a flow run a worker starts (no CLI
    runs there)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        for log_filter in _FILTERS:
            if log_filter not in logger.filters:
                logger.addFilter(log_filter)
    quiet_libraries()
