"""The sweep flow: variants of one profile (a grid over fields such as lora.r and
training.learning_rate), each trained in a flow run of its own that Prefect shows as a
child of the sweep's run (its "Subflow runs"), tagged `sweep:<sweep run id>` and
`variant:<name>`. Results are gathered into one table artifact with links to each
variant's run and Hub commit; every variant publishes to its own repo, or only the best
(lowest eval loss, else last loss) does, through the fine-tuning flow's own publish path
(publish, verify, the `loraflow.adapter.published` event, the run's artifacts).

Where variants run (`variant_deployment`):
- a deployment of the `loraflow-train-variant` flow (`sweep-variant` in
  deployments/prefect.yaml): each variant is `run_deployment(..., as_subflow=True)`, so
  the variants fan out over the workers of that deployment's work pool (several
  machines), at most `loraflow-training` trainings at once;
- in this process, one after the other, as plain subflows. A Trainer keeps process-wide
  state (accelerate's, RNGs) and each training takes every GPU it sees
  (training.launcher: auto), so trainings on one machine do not overlap.
"""
from __future__ import annotations

import itertools
import json
import time
from typing import Any, Literal, Optional

from prefect import flow, tags
from prefect.runtime import flow_run

from flows.finetune import (
    TRAINING_LIMIT,
    FlowFailed,
    end_failed,
    finetune,
    prepare_inputs,
    run_report,
    training_slot,
)
from flows.prefect_runtime import install_log_filter
from profiles.loader import apply_override
from profiles.schema import Profile, PublishSection
from tasks.errors import ProfileError
from tasks.memory import devices
from tasks.train import train_adapter

VARIANT_FLOW = "loraflow-train-variant"
# The deployment `variant_deployment="auto"` looks for (deployments/prefect.yaml).
VARIANT_DEPLOYMENT = f"{VARIANT_FLOW}/sweep-variant"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@flow(name=VARIANT_FLOW, log_prints=True, persist_result=True)
def train_variant(profile: Profile, variant: str, publish: bool = False) -> dict:
    """One variant of a sweep: preflight → download → dataset → train, and with
    `publish` the fine-tuning flow's publish path after it (publish, verify, the
    published event, the run's artifacts).

    Its result is persisted so that a sweep running it through a deployment (on another
    worker) reads the report from Prefect's result storage.

    Args:
        profile: the variant's profile (its publish section says where it would go).
        variant: the variant's name, e.g. r4-learningrate0.002.
        publish: publish it (inline) after training.
    Returns:
        The run report (see flows.finetune.run_report).
    """
    if publish:
        inline = profile.model_copy(update={"publish": profile.publish.model_copy(
            update={"when": "inline"})})
        # The fine-tuning flow's body, in this flow run: one publish path for both.
        return finetune.fn(inline, variant)
    install_log_filter()
    try:
        pre, snapshot, data = prepare_inputs(profile)
        with training_slot(profile, snapshot, data):
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


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak




def training_intervals(flow_run_ids: list[str]) -> list[tuple[float, float]]:
    """(start, end) of each variant's train task run that really trained (a cache hit
    is not a training), as Prefect recorded them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
    )

    if not flow_run_ids:
        return []
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=flow_run_ids)), task_run_filter=TaskRunFilter())
    return [(r.start_time.timestamp(), r.end_time.timestamp()) for r in runs
            if r.name.startswith("train") and r.start_time and r.end_time
            and not (r.state and r.state.name == "Cached")]


# ------------------------------------------------------------------ where variants run

def variant_target(variant_deployment: str) -> Optional[str]:
    """The deployment the variants run on, or None: in this process.

    Args:
        variant_deployment: "local"; "auto" (the `sweep-variant` deployment when the
            Prefect server has it and a worker of its pool is online, else local); or
            a `loraflow-train-variant/<name>` deployment.
    Returns:
        The deployment's "flow/name", or None.
    Raises:
        ProfileError: a named deployment that does not exist or runs another flow.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    if variant_deployment == "local":
        return None
    name = VARIANT_DEPLOYMENT if variant_deployment == "auto" else variant_deployment
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except (ObjectNotFound, ValueError):
            if variant_deployment == "auto":
                return None
            raise ProfileError(
                f"variant_deployment: no deployment {name!r} on this Prefect server. Fix: "
                f"`loraflow deploy`, name a {VARIANT_FLOW}/<deployment>, or give 'local' "
                "(or 'auto') to run the variants in the sweep's process.") from None
        if not name.startswith(f"{VARIANT_FLOW}/"):
            raise ProfileError(f"variant_deployment: {name!r} does not run the "
                               f"{VARIANT_FLOW} flow. Fix: name a {VARIANT_FLOW}/<deployment> "
                               "(e.g. the sweep-variant deployment).")
        if variant_deployment != "auto":
            return name
        pool = deployment.work_pool_name
        workers = client.read_workers_for_work_pool(pool) if pool else []
    # Without a worker the runs would wait in the pool's queue: run them here instead.
    return name if any(str(w.status).upper().endswith("ONLINE") for w in workers) else None


def run_url(flow_run_id: Optional[str]) -> Optional[str]:
    """The run's page in the Prefect UI (None in ephemeral mode: no UI to link to)."""
    from tasks.training.record import flow_run_url

    return flow_run_url(flow_run_id)


def _failed_report(name: str, flow_run_id: Optional[str], error_type: str,
                   message: str) -> dict:
    return {"status": "failed", "profile": name, "flow_run_id": flow_run_id,
            "metrics": None, "hub": None, "adapter": None,
            "steps": {"train": {"state": "failed", "seconds": 0.0}},
            "error": {"type": error_type, "message": message}}


def state_report(state, name: str, flow_run_id: Optional[str]) -> dict:
    """A variant run's report from its final state: the flow's returned report, the
    partial report of a FlowFailed, or a failed report naming what ended it."""
    if state.is_completed() or state.is_failed():
        try:
            outcome = state.result(raise_on_failure=False)
        except Exception as exc:  # noqa: BLE001 — e.g. the result lives on another machine
            outcome = exc
    else:
        outcome = None
    if isinstance(outcome, FlowFailed):
        return outcome.report
    if isinstance(outcome, dict):
        return outcome
    if state.is_completed():
        return {**_failed_report(name, flow_run_id, "MissingResult", str(outcome)),
                "status": "completed"}  # it ran; its report is out of reach from here
    # Crashed, cancelled, or a failure whose report could not be read back here: the
    # state's message is the one line the run ended with.
    return _failed_report(name, flow_run_id, state.name, state.message or str(outcome))


def variant_tags(sweep_id: str, name: str, publish: bool) -> list[str]:
    """The tags of a variant's run: the sweep it belongs to and its variant name."""
    return ["loraflow", f"sweep:{sweep_id}", f"variant:{name}"] + (["publish"] if publish
                                                                    else [])


def run_variants(jobs: dict[str, tuple[Profile, bool]], target: Optional[str],
                 sweep_id: str, suffix: str = "") -> dict[str, dict]:
    """Run each (profile, publish) job as a child run of this sweep; return the reports.

    Args:
        jobs: variant name → (its profile, publish after training).
        target: a deployment ("flow/name"): every job at once through
            `run_deployment(as_subflow=True)`, its pool's workers share them out; None:
            one after the other, subflows in this process.
        sweep_id: the sweep's flow run id, for the tags.
        suffix: appended to the runs' names (e.g. "-publish").
    Returns:
        Variant name → report (with flow_run_id and run_url).
    """
    reports: dict[str, dict] = {}
    if target is None:
        for name, (profile, publish) in jobs.items():
            with tags(*variant_tags(sweep_id, name, publish)):
                state = train_variant.with_options(flow_run_name=f"{name}{suffix}")(
                    profile, name, publish, return_state=True)
            run_id = str(state.state_details.flow_run_id)
            reports[name] = {**state_report(state, name, run_id), "flow_run_id": run_id}
    else:
        reports = _run_on_deployment(jobs, target, sweep_id, suffix)
    for report in reports.values():
        report["run_url"] = run_url(report.get("flow_run_id"))
    return reports


def _run_on_deployment(jobs: dict[str, tuple[Profile, bool]], target: str, sweep_id: str,
                       suffix: str) -> dict[str, dict]:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    runs = {}
    for name, (profile, publish) in jobs.items():
        # timeout=0: create every run now (the workers pick them up side by side) and
        # wait for all of them below.
        runs[name] = run_deployment(
            target, parameters={"profile": profile.model_dump(mode="json"),
                                "variant": name, "publish": publish},
            timeout=0, as_subflow=True, flow_run_name=f"{name}{suffix}",
            tags=variant_tags(sweep_id, name, publish))
        print(f"variant {name}: flow run {runs[name].id} on {target}")
    pending = dict(runs)
    with get_client(sync_client=True) as client:
        while pending:
            for name, run in list(pending.items()):
                run = client.read_flow_run(run.id)
                if run.state and run.state.type.value in TERMINAL:
                    runs[name] = run
                    del pending[name]
            if pending:
                time.sleep(2)
    return {name: {**state_report(run.state, name, str(run.id)), "flow_run_id": str(run.id)}
            for name, run in runs.items()}


# ------------------------------------------------------------------ the sweep

def _score(report: dict) -> float:
    m = report["metrics"]
    return m["eval_loss"] if m.get("eval_loss") is not None else m["last_loss"]


def _round(value) -> Optional[float]:
    return round(value, 4) if isinstance(value, float) else value


def result_rows(variants: dict, reports: dict[str, dict],
                published: dict[str, dict]) -> list[dict]:
    """One row per variant: its grid values, outcome, losses, and links to its run and,
    when published, its Hub commit."""
    rows = []
    for name, report in reports.items():
        hub = (published.get(name) or {}).get("hub") or {}
        metrics = report.get("metrics") or {}
        train = (report.get("steps") or {}).get("train") or {}
        rows.append({"variant": name, **variants[name][0], "status": report["status"],
                     "train": train.get("state"), "eval_loss": _round(metrics.get("eval_loss")),
                     "last_loss": _round(metrics.get("last_loss")),
                     "train_seconds": _round(train.get("seconds")),
                     "run": report.get("run_url") or report.get("flow_run_id"),
                     "published": hub.get("repo_id"), "tag": hub.get("tag"),
                     "commit": hub.get("commit"),
                     "commit_url": f"{hub['url']}/commit/{hub['commit']}" if hub else None,
                     "publish_run": (published.get(name) or {}).get("run_url")})
    return rows


def rows_markdown(rows: list[dict], grid_keys: list[str]) -> str:
    """The results as a markdown table whose runs and commits are links (a table
    artifact's cells are plain text in the UI)."""
    def link(text, url):
        return f"[{text}]({url})" if url and str(url).startswith("http") else (text or "-")

    head = ["variant", *grid_keys, "status", "train", "eval loss", "last loss", "run",
            "published"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        commit = (link(f"{r['published']}@{r['tag']} `{r['commit'][:12]}`", r["commit_url"])
                  if r["commit"] else "-")
        cells = [r["variant"], *(str(r[k]) for k in grid_keys), r["status"],
                 str(r["train"]), str(r["eval_loss"]), str(r["last_loss"]),
                 link("run", r["run"]), commit]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@flow(name="loraflow-sweep", log_prints=True)
def sweep(profile: Profile, grid: dict[str, list],
          publish: Literal["all", "best", "none"] = "best",
          max_concurrent_trainings: Optional[int] = None,
          variant_deployment: str = "auto") -> dict:
    """Train every grid variant of `profile`; publish all of them or only the best.

    Args:
        profile: the profile the variants start from.
        grid: dotted profile field → list of values, e.g. {"lora.r": [4, 8],
            "training.learning_rate": [0.001, 0.002]}; the variants are their product.
        publish: all (each to <publish.repo_id>-<variant>), best (the lowest eval loss,
            else last loss, to publish.repo_id), none.
        max_concurrent_trainings: trainings at once (the `loraflow-training` global
            concurrency limit); default one per GPU this process sees (1 on CPU).
        variant_deployment: where the variants run: "auto" (the sweep-variant
            deployment when a worker serves its pool, else here), "local" (here, one
            after the other), or a loraflow-train-variant/<name> deployment.
    Returns:
        {variants: rows, limit, max_concurrent_trainings (seen), published, reports,
        ran_on}.
    Raises:
        ProfileError: a bad grid, variant value, derived repo id or variant_deployment,
            before anything runs.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    variants = plan_variants(profile, grid, publish)
    target = variant_target(variant_deployment)
    slots = max_concurrent_trainings or len(devices.visible_gpus()) or 1
    ensure_training_limit(slots)
    sweep_id = str(flow_run.id)
    jobs = {name: (p.model_copy(update={"publish": section}), publish == "all")
            for name, (_, p, section) in variants.items()}
    print(f"sweep {sweep_id}: {len(jobs)} variants on {target or 'this process'}")
    reports = run_variants(jobs, target, sweep_id)
    done = {n: r for n, r in reports.items()
            if r["status"] == "completed" and r.get("metrics")}
    published: dict[str, dict] = {}
    if publish == "all":
        published = {n: r for n, r in done.items() if r.get("hub")}  # each published itself
    elif publish == "best" and done:
        best = min(done, key=lambda n: _score(done[n]))
        # The best variant's training again, now cached, and the flow's publish path.
        published = run_variants({best: (jobs[best][0], True)}, target, sweep_id,
                                 suffix="-publish")
        published = {n: r for n, r in published.items() if r.get("hub")}
        if not published:
            print(f"publishing the best variant {best} failed; see its run")
    rows = result_rows(variants, reports, published)
    create_table_artifact(key="loraflow-sweep", table=rows, description="sweep variants")
    create_markdown_artifact(key="loraflow-sweep-runs",
                             markdown=f"# Sweep {flow_run.name}\n\n"
                                      + rows_markdown(rows, sorted(grid)),
                             description="sweep variants, with links to runs and commits")
    runs = [r["flow_run_id"] for r in reports.values() if r.get("flow_run_id")]
    peak = max_overlap(training_intervals(runs))
    return {"variants": rows, "limit": slots, "max_concurrent_trainings": peak,
            "published": {n: r.get("hub") for n, r in published.items()},
            "reports": reports, "ran_on": target or "local"}
