"""The CLI as a process: start-up on a busy machine, its temporary Prefect server's
life, an unreachable Hub. A process boundary is the point of each test here (start-up,
kill -9, what reaches the terminal), so each runs `python -m flows.cli` as a child.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STARTUP = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def _env(tmp_path: Path, **extra: str) -> dict:
    """The session's environment with a fresh PREFECT_HOME and LORAFLOW_HOME, and
    without the tests' own start-up timeout: the CLI's default is what is tested."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "LORAFLOW_HOME": str(tmp_path / "loraflow"), "PYTHONUNBUFFERED": "1"}
    env.pop(STARTUP, None)
    env.pop("LORAFLOW_DEBUG", None)
    env.update(extra)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_unreachable_hub_is_retried_then_named_in_one_line(tmp_path):
    """HF_ENDPOINT at a closed port: Prefect's retries show in the log, then the run fails
    with one line naming the endpoint and HF_ENDPOINT, and stderr holds no traceback."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    done = subprocess.run(_cli("run", "quickstart", "--set", "training.max_steps=2"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=_env(tmp_path, HF_ENDPOINT=endpoint, HF_TOKEN="hf_" + "x" * 34,
                                   **{STARTUP: "120"}))
    seconds = time.monotonic() - start
    assert done.returncode == 1, (done.stdout, done.stderr)
    retries = [line for line in done.stderr.splitlines() if "Retry " in line
               and "will start" in line]
    assert len(retries) == 3, done.stderr  # tasks/retry.py: 3 retries
    assert "Retries are exhausted" in done.stderr
    final = [line for line in done.stderr.splitlines() if line.startswith("loraflow:")]
    assert len(final) == 1 and "loraflow:" not in done.stdout, (done.stdout, done.stderr)
    assert f"could not reach the Hub at {endpoint}" in final[0] and "HF_ENDPOINT" in final[0]
    assert "Fix:" in final[0]
    for text in (done.stdout, done.stderr):
        assert "Traceback" not in text and 'File "' not in text, text
    print(f"unreachable Hub: failed after {seconds:.1f} s (retries 2+4+8 s jittered)")


def test_a_startup_timeout_is_one_line_naming_the_setting(tmp_path, hub):
    """A temporary server that cannot answer in time (1 s here, on a fresh PREFECT_HOME)
    ends the CLI with exit 2 and one line naming the setting; no server is left."""
    proc = subprocess.Popen(_cli("run", "quickstart"), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(tmp_path, HF_TOKEN=hub.token("demo"), **{STARTUP: "1"}))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (out, err)
    lines = [line for line in err.splitlines() if line.startswith("loraflow:")]
    assert len(lines) == 1 and f"{STARTUP}=1" in lines[0] and "Fix:" in lines[0], err
    assert "Traceback" not in err and "Traceback" not in out, err


def test_kill_9_leaves_no_prefect_server_behind(tmp_path, hub):
    """SIGKILL runs no exit hook: the watchdog stops the temporary server instead."""
    proc = subprocess.Popen(_cli("run", "quickstart", "--set", "training.max_steps=2",
                                 "publish.repo_id=loraflow-demo/killed-before-publish"),
                            cwd=ROOT, text=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE,
                            env=_env(tmp_path, HF_TOKEN=hub.token("demo"), **{STARTUP: "120"}))
    try:
        # The flow has begun once "▶ preflight" is logged: the server is up by then.
        _wait_for(lambda: "▶ preflight" in (proc.stderr.readline() or "x▶ preflight"), 240,
                  "the flow to start", interval=0)
        assert proc.poll() is None, "the run ended before it could be killed"
        servers = [pid for pid in _children(proc.pid) if "uvicorn" in _cmdline(pid)]
        assert len(servers) == 1, [_cmdline(p) for p in _children(proc.pid)]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        _wait_for(lambda: not _alive(servers[0]), 30, "the orphaned server to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


@pytest.fixture
def cpu_burner():
    """One process per core spinning for at most 10 minutes (stopped after the test)."""
    spin = "import time\nend = time.time() + 600\nwhile time.time() < end:\n    pass\n"
    burners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 2)]
    try:
        yield burners
    finally:
        for b in burners:
            b.kill()
            b.wait()


def test_the_demo_runs_on_a_fresh_prefect_home_beside_a_cpu_burner(tmp_path, cpu_burner):
    """`loraflow demo` (`make demo`'s command: it starts and seeds a localhub of its own)
    as a new process on a fresh PREFECT_HOME, every core busy, with the CLI's own start-up
    timeout (the tests' 120 s is removed from its env). `loraflow run` starts up through
    the same code (test_quiet_run.py runs it as a new process on a fresh PREFECT_HOME)."""
    env = _env(tmp_path)
    for name in ("HF_ENDPOINT", "HF_TOKEN"):  # the demo brings its own Hub and token
        env.pop(name, None)
    start = time.monotonic()
    done = subprocess.run(_cli("demo", "--json", "--set", "training.max_steps=4",
                               "data.eval_split=0"), cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    seconds = time.monotonic() - start
    assert all(b.poll() is None for b in cpu_burner), "the burner stopped before the run ended"
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    import json

    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"] == "completed" and report["hub"]["commit"]
    print(f"demo beside a CPU burner: {seconds:.1f} s")
