"""The sweep flow: variants of one profile (a grid over fields such as lora.r and
training.learning_rate), each trained in its own flow run and process, with at most
as many trainings at once as the `loraflow-training` global concurrency limit allows
(one per GPU by default). Results are gathered into one table artifact; every variant
publishes to its own repo, or only the best (lowest eval loss, else last loss) does.

Variants run as separate processes, not threads: a Trainer keeps process-wide state
(accelerate's, RNGs), and on GPUs each process owns its device.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal, Optional

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from flows.finetune import (
    TRAINING_LIMIT,
    end_failed,
    prepare_inputs,
    run_report,
    training_slot,
)
from profiles.loader import apply_override
from profiles.schema import Profile, PublishSection
from tasks.errors import ProfileError
from tasks.memory import devices
from tasks.train import train_adapter


@flow(name="loraflow-train-variant", log_prints=True)
def train_variant(profile: Profile, variant: str) -> dict:
    """preflight → download → dataset → train for one variant (no publishing)."""
    try:
        pre, snapshot, data = prepare_inputs(profile)
        with training_slot():
            train_adapter(profile=profile, preflight=pre, snapshot=snapshot, dataset=data,
                          flow_run_id=str(flow_run.id))
        return run_report(profile, variant)
    except BaseException as exc:
        return end_failed(profile, variant, exc)  # one line, no traceback for typed errors


def expand_grid(grid: dict[str, list]) -> list[dict[str, Any]]:
    """{"lora.r": [4, 8], "training.learning_rate": [1e-3]} → one dict per combination."""
    if not grid or any(not isinstance(v, list) or not v for v in grid.values()):
        raise ProfileError("sweep grid: give each field a non-empty list of values, e.g. "
                           "--grid lora.r=4,8")
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def variant_name(overrides: dict[str, Any]) -> str:
    return "-".join(f"{k.split('.')[-1]}{v}" for k, v in overrides.items()).replace("_", "")


def variant_profile(profile: Profile, overrides: dict[str, Any]) -> Profile:
    """The profile with one variant's overrides, validated.

    Raises:
        ProfileError: a value the schema refuses, naming the field.
    """
    from pydantic import ValidationError

    from profiles.loader import describe_validation_error

    data = profile.model_dump(mode="json")
    for key, value in overrides.items():
        apply_override(data, f"{key}={json.dumps(value)}")
    try:
        return Profile.model_validate(data)
    except ValidationError as err:
        raise ProfileError(f"sweep variant {variant_name(overrides)}: "
                           f"{describe_validation_error(err)}") from None


def variant_publish(profile: Profile, name: str, publish: str) -> PublishSection:
    """Where a variant publishes: `<publish.repo_id>-<variant>` with publish all, else
    publish.repo_id. Validated like any publish.repo_id (model_copy would skip that).

    Raises:
        ProfileError: the derived id is not one the Hub accepts (publish.repo_id named).
    """
    from pydantic import ValidationError

    from profiles.loader import describe_validation_error

    section = profile.publish
    if publish != "all":
        return section
    data = {**section.model_dump(mode="json"), "repo_id": f"{section.repo_id}-{name}"}
    try:
        return PublishSection.model_validate(data)
    except ValidationError as err:
        raise ProfileError(f"sweep --publish all names variant {name}'s repo "
                           f"<publish.repo_id>-<variant>: "
                           f"{describe_validation_error(err, 'publish')}") from None


def plan_variants(profile: Profile, grid: dict[str, list], publish: str
                  ) -> dict[str, tuple[dict, Profile, PublishSection]]:
    """Every variant's overrides, profile and publish section, all validated before
    anything runs.

    Raises:
        ProfileError: a bad grid, variant value or derived repo id.
    """
    planned = {}
    for overrides in expand_grid(grid):
        name = variant_name(overrides)
        variant = variant_profile(profile, overrides)
        planned[name] = (overrides, variant, variant_publish(variant, name, publish))
    return planned


def ensure_training_limit(slots: int) -> None:
    """Create or resize the `loraflow-training` global concurrency limit."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(TRAINING_LIMIT)
            client.update_global_concurrency_limit(
                TRAINING_LIMIT, GlobalConcurrencyLimitUpdate(limit=slots, active=True))
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=TRAINING_LIMIT, limit=slots, active=True))


def _api_url() -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def launch_variant(profile: Profile, name: str, workdir: Path, api_url: str):
    """Start one variant's flow run in its own process, against this run's API server."""
    path = workdir / f"{name}.json"
    path.write_text(profile.model_dump_json())
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return subprocess.Popen([sys.executable, "-m", "flows.sweep", str(path), name],
                            stdout=subprocess.PIPE, stderr=sys.stderr, text=True, env=env)


def training_intervals(flow_run_ids: list[str]) -> list[tuple[float, float]]:
    """(start, end) of each variant's train task run, as Prefect recorded them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
    )

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=flow_run_ids)), task_run_filter=TaskRunFilter())
    return [(r.start_time.timestamp(), r.end_time.timestamp()) for r in runs
            if r.name.startswith("train") and r.start_time and r.end_time]


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def _parse_report(stdout: str, name: str) -> dict:
    """The child's last stdout line; a crashed child becomes a failed report."""
    try:
        return json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"status": "failed", "profile": name, "flow_run_id": None, "metrics": None,
                "steps": {"train": {"state": "failed", "seconds": 0.0}},
                "error": {"type": "VariantCrashed", "message": "the variant's process "
                          "exited without a report; see its log above"}}


def _score(report: dict) -> float:
    m = report["metrics"]
    return m["eval_loss"] if m.get("eval_loss") is not None else m["last_loss"]


@flow(name="loraflow-sweep", log_prints=True)
def sweep(profile: Profile, grid: dict[str, list], publish: Literal["all", "best", "none"] = "best",
          max_concurrent_trainings: Optional[int] = None) -> dict:
    """Train every grid variant of `profile`; publish all of them or only the best.

    Args:
        grid: dotted profile field → list of values; the variants are their product.
        publish: all (each to <publish.repo_id>-<variant>), best (to publish.repo_id), none.
        max_concurrent_trainings: trainings at once; default one per visible GPU (1 on CPU).
    """
    from flows.publish import load_run
    from tasks.publish import run_publish

    slots = max_concurrent_trainings or len(devices.visible_gpus()) or 1
    ensure_training_limit(slots)
    variants = plan_variants(profile, grid, publish)
    with tempfile.TemporaryDirectory() as workdir:
        api_url = _api_url()
        procs = {name: launch_variant(p, name, Path(workdir), api_url)
                 for name, (_, p, _) in variants.items()}
        reports = {}
        for name, proc in procs.items():
            out, _ = proc.communicate()
            reports[name] = _parse_report(out, name)
    done = {n: r for n, r in reports.items() if r["status"] == "completed"}
    published = {}
    if done and publish != "none":
        chosen = done if publish == "all" else {min(done, key=lambda n: _score(done[n])): None}
        for name in chosen:
            section = variants[name][2]
            result = run_publish(load_run(str(Path(done[name]["adapter"]["path"]).parent)),
                                 section)
            published[name] = result.model_dump()
    rows = [{"variant": n, **{k: v for k, v in variants[n][0].items()}, "status": r["status"],
             "eval_loss": (r["metrics"] or {}).get("eval_loss"),
             "last_loss": (r["metrics"] or {}).get("last_loss"),
             "train_seconds": r["steps"]["train"]["seconds"],
             "published": (published.get(n) or {}).get("repo_id")} for n, r in reports.items()]
    create_table_artifact(key="loraflow-sweep", table=rows, description="sweep variants")
    peak = max_overlap(training_intervals([r["flow_run_id"] for r in reports.values()
                                           if r.get("flow_run_id")]))
    return {"variants": rows, "limit": slots, "max_concurrent_trainings": peak,
            "published": published, "reports": reports}


def _variant_main(profile_path: str, name: str) -> int:
    """Child process: run one variant, print its report as the last stdout line."""
    from flows.finetune import FlowFailed

    profile = Profile.model_validate_json(Path(profile_path).read_text())
    state = train_variant(profile, name, return_state=True)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, FlowFailed):
        report = outcome.report
    elif isinstance(outcome, BaseException):
        report = {**_parse_report("", name), "error": {"type": type(outcome).__name__,
                                                       "message": str(outcome)}}
    else:
        report = outcome
    print(json.dumps(report, default=str))
    return 0 if report["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(_variant_main(*sys.argv[1:3]))
