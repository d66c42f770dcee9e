"""One real Prefect stack for the deployment and browser tests, shared by their modules.

`prefect server start` (SQLite, loopback, its own PREFECT_HOME), a webhook receiver on
loopback, `loraflow deploy` of deployments/ exactly as a user runs it (plus the test
deployments derived from it), and a process worker for the loraflow-local pool whose
runs talk to the session's localhub. A server start costs ≈11 s on the CI machine, so
the first module that asks starts it and the session's end stops it.

The worker's environment has HF_ENDPOINT but no HF_TOKEN: the token reaches each run
through the deployments' pull step, from the Secret block that `loraflow deploy
--store-token` saved.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

import httpx
import yaml

PROJECT_DIR = Path(__file__).resolve().parent.parent
PREFECT_FILE = PROJECT_DIR / "deployments" / "prefect.yaml"
VENV_BIN = Path(sys.executable).parent
# Every wait below polls for its event; its limit only tells a hang from a slow machine.
# CI's two loaded cores run a scheduled run several times slower than a workstation, so
# the limits stretch there (LORAFLOW_TEST_PATIENCE: the factor; 2 with CI=true, else 1).
PATIENCE = float(os.environ.get("LORAFLOW_TEST_PATIENCE",
                                "2" if os.environ.get("CI") == "true" else "1"))
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

_STACK: Optional["Stack"] = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Webhook:
    """A loopback HTTP server that records every JSON body POSTed to it."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 — http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    received.append(json.loads(body))
                except ValueError:
                    received.append({"raw": body.decode(errors="replace")})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def matching(self, text: str) -> list[dict]:
        return [m for m in list(self.received) if text in json.dumps(m)]

    def stop(self):
        self.server.shutdown()


class _RetryingClient(httpx.Client):
    """Prefect's own client retries 503s (SQLite busy on a loaded 2-core box); so do we."""

    def request(self, *args, **kwargs):
        for attempt in range(6):
            response = super().request(*args, **kwargs)
            if response.status_code not in (429, 503):
                return response
            time.sleep(0.5 * 2 ** attempt)
        return response


class Stack:
    """The running server, worker and webhook, and helpers over the server's REST API."""

    def __init__(self, hub, root: Path):
        self.hub, self.root = hub, root
        self.port = _free_port()
        self.ui = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.ui}/api"
        self.loraflow_home = root / "loraflow"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.webhook = Webhook()
        self.api = _RetryingClient(base_url=self.api_url, timeout=90)
        self.deploy_result: Optional[subprocess.CompletedProcess] = None
        self.timings: dict[str, float] = {}

    # -- processes -------------------------------------------------------------------
    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
        env.update(
            PREFECT_HOME=str(self.root / "prefect-home"),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
            # A 40 s interval would otherwise queue 100 runs ahead on a 2-core SQLite box.
            PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS="3",
            PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS="2",
            PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="3",
            PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_WORKER_HEARTBEAT_SECONDS="5",
            PREFECT_CLI_PROMPT="false",
            HF_ENDPOINT=self.hub.url, HF_HUB_DISABLE_XET="1",
            LORAFLOW_HOME=str(self.loraflow_home))
        env.update(extra)
        return env

    def _spawn(self, name: str, cmd: list[str], **extra: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, cwd=PROJECT_DIR, env=self.env(**extra),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> "Stack":
        t0 = time.monotonic()
        server = self._spawn("server", [str(VENV_BIN / "prefect"), "server", "start",
                                        "--host", "127.0.0.1", "--port", str(self.port)])
        self._wait(lambda: self._healthy(), 90, "prefect server health", server)
        self.timings["server_start_s"] = round(time.monotonic() - t0, 1)

        t0 = time.monotonic()
        self.deploy_result = self.loraflow("deploy", "--webhook-url", self.webhook.url,
                                           "--store-token", "--json",
                                           HF_TOKEN=self.hub.token("demo"))
        self.timings["deploy_s"] = round(time.monotonic() - t0, 1)
        self.pause_scheduled_deployments()

        t0 = time.monotonic()
        self.worker = self._spawn("worker", [str(VENV_BIN / "prefect"), "worker", "start",
                                             "--pool", "loraflow-local", "--type", "process"])
        self._wait(lambda: any(w["status"] == "ONLINE" for w in self.api.post(
            "/work_pools/loraflow-local/workers/filter", json={}).json()), 60,
            "worker online", self.worker)
        self.timings["worker_s"] = round(time.monotonic() - t0, 1)
        print(f"deploy stack up: {self.timings}", file=sys.stderr)
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        self.webhook.stop()
        self.api.close()

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_for(self, pred, timeout: float, what: str):
        self._wait(pred, timeout, what, every=2.0)

    @staticmethod
    def _wait(pred, timeout: float, what: str, proc: Optional[subprocess.Popen] = None,
              every: float = 0.5):
        deadline = time.monotonic() + timeout * PATIENCE
        while time.monotonic() < deadline:
            if pred():
                return
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what}: process exited with {proc.returncode}")
            time.sleep(every)
        raise TimeoutError(f"{what}: not within {timeout * PATIENCE:.0f}s")

    def loraflow(self, *args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "loraflow"), *args], cwd=PROJECT_DIR,
                              env=self.env(**extra), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=300)

    def run_prefect(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "prefect"), *args], cwd=PROJECT_DIR,
                              env=self.env(), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=300)

    def pause_scheduled_deployments(self) -> None:
        """The project's nightly would fire at 03:00 UTC on the test worker's pool."""
        for d in self.deployments():
            if d["schedules"] and not d["paused"]:
                self.api.patch(f"/deployments/{d['id']}", json={"paused": True})

    # -- test deployments derived from the project's prefect.yaml ----------------------
    def deploy_variant(self, name: str, base: str = "quickstart", profile: dict | None = None,
                       **fields: Any) -> dict:
        """Deploy `base` from deployments/prefect.yaml under `name`, with `profile`
        merged into its profile parameter and other deployment fields replaced."""
        config = yaml.safe_load(PREFECT_FILE.read_text())
        entry = copy.deepcopy(next(d for d in config["deployments"] if d["name"] == base))
        entry["name"] = name
        entry["parameters"]["profile"] = _merge(entry["parameters"]["profile"], profile or {})
        entry.update(fields)
        config["deployments"] = [entry]
        path = self.root / f"{name}.prefect.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        result = self.loraflow("deploy", "--prefect-file", str(path), "--name", name, "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        return self.deployment(entry["entrypoint"], name)

    # -- REST helpers ----------------------------------------------------------------
    def deployments(self) -> list[dict]:
        return self.api.post("/deployments/filter", json={}).json()

    def deployment(self, entrypoint: str, name: str) -> dict:
        flow = {"flows/finetune.py:finetune": "loraflow-finetune",
                "flows/publish.py:publish_run": "loraflow-publish",
                "flows/sweep.py:sweep": "loraflow-sweep",
                "flows/sweep.py:train_variant": "loraflow-train-variant"}[entrypoint]
        r = self.api.get(f"/deployments/name/{flow}/{name}")
        r.raise_for_status()
        return r.json()

    def create_run(self, deployment_id: str, parameters: dict) -> httpx.Response:
        return self.api.post(f"/deployments/{deployment_id}/create_flow_run",
                             json={"parameters": parameters})

    def flow_run(self, run_id: str) -> dict:
        return self.api.get(f"/flow_runs/{run_id}").json()

    def runs_of(self, deployment_id: str) -> list[dict]:
        return self.api.post("/flow_runs/filter", json={
            "deployments": {"id": {"any_": [deployment_id]}},
            "sort": "EXPECTED_START_TIME_ASC"}).json()

    def wait_run(self, run_id: str, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout * PATIENCE
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state_type"] in TERMINAL:
                return run
            if self.worker.poll() is not None:
                raise RuntimeError(f"the worker exited ({self.worker.returncode}); see "
                                   f"{self.logs / 'worker.log'}")
            time.sleep(1)
        raise TimeoutError(f"flow run {run_id} still {run['state_type']} after "
                           f"{timeout * PATIENCE:.0f}s")

    def task_states(self, run_id: str) -> dict[str, str]:
        """{task name: state name} of a flow run's task runs (Completed, Cached, Failed)."""
        rows = self.api.post("/task_runs/filter", json={
            "task_runs": {"flow_run_id": {"any_": [run_id]}}}).json()
        return {r["name"].rsplit("-", 1)[0]: r["state"]["name"] for r in rows}

    def children(self, run_id: str) -> list[dict]:
        """The flow runs Prefect links to `run_id` as its subflows (its "Subflow runs"
        tab): those whose parent task run is one of its task runs."""
        return self.api.post("/flow_runs/filter", json={
            "flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}}).json()

    def artifacts(self, run_id: str) -> list[dict]:
        return self.api.post("/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()

    def logs_of(self, run_id: str) -> str:
        rows = self.api.post("/logs/filter", json={
            "logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}).json()
        return "\n".join(r["message"] for r in rows)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def anchor_in(seconds: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat()


def get_stack(request, hub) -> Stack:
    """The session's stack, started by the first module that asks for it."""
    global _STACK
    if _STACK is None:
        root = Path(tempfile.mkdtemp(prefix="loraflow-deploy-tests-"))
        stack = Stack(hub, root)
        request.config.add_cleanup(stack.stop)
        try:
            _STACK = stack.start()
        except BaseException:
            print(_tail(stack.logs / "server.log"), _tail(stack.logs / "worker.log"))
            raise
    return _STACK


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""
