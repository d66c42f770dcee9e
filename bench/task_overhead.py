"""Per-task orchestration overhead of loraflow's cached steps, in one process.

Runs flows of N no-op tasks and times each task call from inside the flow (what the
flow's step report shows as a step's seconds): plain Prefect tasks, then tasks
configured exactly as loraflow's cached steps (tasks.cache.policy.cache_options: a content
key, SERIALIZABLE isolation with the orphan-breaking file lock, persisted results, and
the intact check of a small manifest under the key's lock) — first as misses (compute
+ persist), then as hits. The task bodies do nothing, so each call's time is the
orchestration overhead. Prints one JSON object (medians over all calls).

    LORAFLOW_HOME=/tmp/x PREFECT_HOME=/tmp/y python bench/task_overhead.py --tasks 40
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow, task  # noqa: E402

from tasks import settings  # noqa: E402
from tasks.cache.keys import cache_key
from tasks.cache.manifest import changed_files, write_manifest
from tasks.cache.policy import cache_options


@task(name="noop")
def noop(i: int, salt: str) -> dict:
    return {"i": i}


def _manifest_dir() -> Path:
    d = settings.loraflow_home() / "bench-outputs"
    d.mkdir(parents=True, exist_ok=True)
    for n in range(8):  # about what a download manifest lists
        (d / f"file{n}.bin").write_bytes(bytes(1024))
    write_manifest(d, {"step": "bench"})
    return d


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    outputs = _manifest_dir()
    key_fn = lambda i, salt, **_: cache_key("bench", {"i": i, "salt": salt})  # noqa: E731
    intact_fn = lambda **_: changed_files(outputs) == []  # noqa: E731
    cached_noop = noop.with_options(**cache_options(key_fn, intact_fn))

    def calls(fn, n, salt):
        times, states = [], []
        for i in range(n):
            start = time.perf_counter()
            states.append(fn(i=i, salt=salt, return_state=True).name)
            times.append(time.perf_counter() - start)
        return times, states

    @flow(name="bench-plain")
    def plain(n: int, salt: str):
        return calls(noop, n, salt)

    @flow(name="bench-cached")
    def cached(n: int, salt: str):
        return calls(cached_noop, n, salt)

    plain(2, "warm-up")  # database, API client, first task-run creation
    n, out = args.tasks, {"plain": [], "cached_miss": [], "cached_hit": []}
    for _ in range(args.repeats):
        salt = uuid.uuid4().hex
        t_plain, s_plain = plain(n, salt)
        t_miss, s_miss = cached(n, salt)
        t_hit, s_hit = cached(n, salt)
        assert set(s_plain) == set(s_miss) == {"Completed"} and set(s_hit) == {"Cached"}, \
            (set(s_miss), set(s_hit))
        out["plain"] += t_plain
        out["cached_miss"] += t_miss
        out["cached_hit"] += t_hit
    ms = {f"{k}_task_ms": {"median": round(1000 * statistics.median(v), 2),
                           "p90": round(1000 * statistics.quantiles(v, n=10)[-1], 2)}
          for k, v in out.items()}
    print(json.dumps({"tasks_per_flow": n, "repeats": args.repeats, **ms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
