"""Cold run, fully cached re-run and orchestration overhead of the quickstart profile.

Starts localhub (seeded) in a temporary directory, then, each as a new process with the
same environment (one PREFECT_HOME, ephemeral Prefect unless PREFECT_API_URL is set):

1. warm-up: one empty Prefect flow run (creates the Prefect database);
2. cold: `loraflow run quickstart --json` into an empty LORAFLOW_HOME;
3. side by side, alternating, --repeats times: an empty Prefect flow run
   (bench/empty_flow.py) and the fully cached re-run of step 2 (bench/run_cli.py, which
   also reports whether torch & co. were imported);
4. bench/task_overhead.py: per-task overhead of plain and content-cached tasks.

Prints a markdown summary and, with --json PATH, writes every figure there.

    .venv/bin/python bench/cache_overhead.py --repeats 5 --json bench/results.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _timed(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed, proc


def _report(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _heavy(proc: subprocess.CompletedProcess) -> list[str]:
    line = next(x for x in reversed(proc.stderr.splitlines()) if x.startswith("HEAVY_IMPORTS "))
    return json.loads(line[len("HEAVY_IMPORTS "):])


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines()
                          if x.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration):
        mem_kb = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg(),
            "versions": {p: version(p) for p in ("prefect", "torch", "transformers", "peft",
                                                 "datasets", "huggingface_hub")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=40, help="tasks per flow in the overhead run")
    ap.add_argument("--json", type=Path, help="write all figures here")
    args = ap.parse_args()

    from localhub.seed import seed
    from localhub.server import LocalHub

    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-"))
    hub = LocalHub(work / "hub").start(port=0)
    seeded = seed(work / "hub")
    token = next(u["token"] for u in seeded["users"] if u["name"] == "demo")
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1",
           "HF_HOME": str(work / "hf-home"), "PREFECT_HOME": str(work / "prefect"),
           "LORAFLOW_HOME": str(work / "loraflow"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "TOKENIZERS_PARALLELISM": "false",
           # A busy machine can take longer than the default 20 s to start it.
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    py = sys.executable
    empty_cmd = [py, str(REPO / "bench" / "empty_flow.py")]
    run_cmd = [py, str(REPO / "bench" / "run_cli.py"), "run", "quickstart", "--json"]
    out: dict = {"machine": machine(), "commands": {
        "empty": "python bench/empty_flow.py",
        "cold": "loraflow run quickstart --json  (empty LORAFLOW_HOME)",
        "cached": "loraflow run quickstart --json  (same LORAFLOW_HOME again)"}}
    try:
        _timed(empty_cmd, env)  # warm-up: the Prefect database is created once
        t_cold, cold = _timed(run_cmd, env)
        cold_report = _report(cold)
        assert cold_report["status"] == "completed", cold_report["error"]
        out["cold"] = {"wall_s": round(t_cold, 2), "steps": cold_report["steps"]}
        empties, cacheds, steps, heavy = [], [], [], set()
        for _ in range(args.repeats):
            t, _ = _timed(empty_cmd, env)
            empties.append(t)
            t, proc = _timed(run_cmd, env)
            report = _report(proc)
            states = {s: report["steps"][s]["state"] for s in ("download", "dataset", "train")}
            assert set(states.values()) == {"cached"}, states
            cacheds.append(t)
            steps.append(report["steps"])
            heavy.update(_heavy(proc))
        ratio = statistics.median(cacheds) / statistics.median(empties)
        out["side_by_side"] = {
            "empty_flow_s": [round(x, 2) for x in empties],
            "cached_run_s": [round(x, 2) for x in cacheds],
            "median_empty_s": round(statistics.median(empties), 2),
            "median_cached_s": round(statistics.median(cacheds), 2),
            "ratio_cached_over_empty": round(ratio, 3),
            "cached_step_seconds_median": {
                s: round(statistics.median(r[s]["seconds"] for r in steps), 3)
                for s in steps[0]},
            "heavy_imports_in_cached_run": sorted(heavy)}
        t_ovh, ovh = _timed([py, str(REPO / "bench" / "task_overhead.py"),
                             "--tasks", str(args.tasks)],
                            {**env, "LORAFLOW_HOME": str(work / "overhead")})
        out["task_overhead"] = json.loads(ovh.stdout.strip().splitlines()[-1])
    finally:
        hub.stop()
    out["machine"]["load_avg_at_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    s, o = out["side_by_side"], out["task_overhead"]
    print(f"""| measure | value |
|---|---|
| cold run (new process) | {out['cold']['wall_s']} s |
| empty Prefect flow run (new process), median of {args.repeats} | {s['median_empty_s']} s |
| fully cached re-run (new process), median of {args.repeats} | {s['median_cached_s']} s |
| ratio cached / empty | {s['ratio_cached_over_empty']} |
| heavy imports in the cached run | {s['heavy_imports_in_cached_run'] or 'none'} |
| cached step seconds (download, dataset, train) | {s['cached_step_seconds_median']['download']}, {s['cached_step_seconds_median']['dataset']}, {s['cached_step_seconds_median']['train']} |
| per-task overhead: plain / cached miss / cached hit (median ms) | {o['plain_task_ms']['median']} / {o['cached_miss_task_ms']['median']} / {o['cached_hit_task_ms']['median']} |""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
