"""The fine-tuning flow: it only sequences the steps; each step is a task in tasks/.

    preflight ─► download ─┐
        └──────► dataset ──┴─► train ─► publish ─► verify

Caching is keyed on content (see tasks/cache/): preflight never; download,
dataset and train by their content keys, and a hit whose files are gone or changed is
treated as a miss; publish is idempotent against the repo; verify is keyed by
(Hub commit, adapter sha256).
"""
from __future__ import annotations

import time
from typing import Any, Callable

from prefect import flow
from prefect.runtime import flow_run

from flows.approval import hold_for_approval
from flows.artifacts import publish_run_artifacts
from flows.prefect_runtime import install_log_filter
from flows.ui import emit_published, failure_artifact
from profiles.schema import Profile
from tasks import settings
from tasks.cache.policy import cache_options
from tasks.dataset import dataset_is_cached_and_intact, dataset_key, prepare_dataset
from tasks.download import (
    download_is_cached_and_intact,
    download_key,
    download_snapshot,
)
from tasks.errors import LoraflowError, is_transient, unreachable_hub_error
from tasks.local_check import check_local_adapter, local_check_key
from tasks.merge import publish_merged
from tasks.preflight import preflight
from tasks.publish import publish_adapter
from tasks.train import train_adapter, train_is_cached_and_intact, train_key
from tasks.verify import verify_key, verify_publication

install_log_filter()

STEPS = ("preflight", "download", "dataset", "train", "publish", "verify")


class FlowFailed(Exception):
    """Carries the partial run report out of a failed flow run."""

    def __init__(self, error: BaseException, report: dict):
        super().__init__(f"{type(error).__name__}: {error}")  # the typed error, in the UI
        self.error = error
        self.report = report


def cached(task_obj, key_fn: Callable[..., str],
           intact_fn: Callable[..., bool] | None = None):
    """The task with a content-keyed cache (tasks/cache/); with `intact_fn` (called
    with the task's parameters, under the key's lock) a hit whose outputs are gone or
    changed is a miss."""
    return task_obj.with_options(**cache_options(key_fn, intact_fn))


class StepRecorder:
    """Runs each step, recording completed / cached / failed and its wall time."""

    def __init__(self, report: dict, progress: Callable[[str], None]):
        self.report, self.progress = report, progress

    def __call__(self, name: str, task_obj, **kwargs) -> Any:
        self.progress(f"▶ {name}")
        start = time.monotonic()
        state = task_obj(return_state=True, **kwargs)
        seconds = round(time.monotonic() - start, 3)
        if not state.is_completed():
            self.report["steps"][name] = {"state": "failed", "seconds": seconds}
            self.progress(f"✘ {name} failed after {seconds:.1f}s")
            raise state.result(raise_on_failure=False)
        kind = "cached" if state.name == "Cached" else "completed"
        self.report["steps"][name] = {"state": kind, "seconds": seconds}
        self.progress(f"✔ {name} {kind} in {seconds:.1f}s")
        return state.result()


def _empty_report(profile: Profile, profile_name: str) -> dict:
    return {"status": "running", "flow_run_id": str(flow_run.id), "profile": profile_name,
            "steps": {s: {"state": "skipped", "seconds": 0.0} for s in STEPS},
            "base_model": {"repo_id": profile.model.id, "commit": None},
            "adapter": None, "hub": None, "metrics": None, "error": None}


def _print_progress(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


TRAINING_LIMIT = "loraflow-training"  # a Prefect global concurrency limit, if one exists


def train_steps(profile: Profile, step: StepRecorder, report: dict):
    """preflight → download → dataset → train; returns (snapshot, trained).

    Training holds a slot of the `loraflow-training` global concurrency limit when it
    exists (the sweep creates it with one slot per GPU); without it, nothing waits.
    """
    from prefect.concurrency.sync import concurrency

    # The environment first (LORAFLOW_HOME writable, LORAFLOW_RESULT_STORAGE usable):
    # a bad setting is named before the Hub is asked anything or a byte is downloaded.
    settings.check_home_writable()
    download_task = cached(download_snapshot, download_key, download_is_cached_and_intact)
    dataset_task = cached(prepare_dataset, dataset_key, dataset_is_cached_and_intact)
    train_task = cached(train_adapter, train_key, train_is_cached_and_intact)
    pre = step("preflight", preflight, profile=profile)
    report["base_model"] = {"repo_id": pre.base_model.repo_id, "commit": pre.base_model.commit}
    if pre.adapter is not None:  # model.id is an adapter repo: training continues it
        report["continued_from"] = {"repo_id": pre.adapter.repo_id, "commit": pre.adapter.commit}
    snapshot = step("download", download_task, model=pre.base_model, adapter=pre.adapter)
    seed = profile.training.seed
    data = step("dataset", dataset_task, data=profile.data, source=pre.dataset,
                snapshot=snapshot, seed=seed)
    with concurrency(TRAINING_LIMIT, occupy=1):
        trained = step("train", train_task, profile=profile, preflight=pre, snapshot=snapshot,
                       dataset=data, flow_run_id=str(flow_run.id))
    report["adapter"] = {"path": trained.adapter_dir, "sha256": trained.adapter_sha256,
                         "trainable_params": trained.trainable_params,
                         "total_params": trained.total_params}
    report["metrics"] = trained.metrics
    return snapshot, trained


def fail(report: dict, exc: BaseException) -> FlowFailed:
    """Mark the report failed with the (typed) error; the exception to raise."""
    if not isinstance(exc, LoraflowError) and is_transient(exc):
        # A transport error that outlived the step's retries: say which Hub and the fix.
        exc = unreachable_hub_error(exc, settings.hub_endpoint())
    report["status"] = "failed"
    report["error"] = (exc.to_dict() if isinstance(exc, LoraflowError)
                       else {"type": type(exc).__name__, "message": str(exc)})
    return FlowFailed(exc, report)


def failed_state(failed: FlowFailed):
    """The flow's end state for an expected (typed) error: a Failed state whose message
    is the one-line error, returned rather than raised so that Prefect logs no
    traceback for it ("Encountered exception during execution"). Its data is the
    FlowFailed, so `state.result(raise_on_failure=False)` still returns the report and a
    parent flow calling this one still gets the exception raised.

    Args:
        failed: what `fail` returned.
    Returns:
        A Prefect Failed state.
    """
    from prefect.states import Failed

    error = failed.error
    return Failed(message=f"{type(error).__name__}: {getattr(error, 'message', error)}",
                  data=failed)


@flow(name="loraflow-finetune", log_prints=True)
def finetune(profile: Profile, profile_name: str = "custom") -> dict:
    """Profile → trained LoRA adapter published on the Hub. Returns the run report.

    Args:
        profile: the validated profile (model, quantization, lora, data, training, publish).
        profile_name: a label for reports (the preset or file name).
    Raises:
        FlowFailed: wrapping an unexpected step error, with the partial report. A typed
            error (and a transport error, turned into one) ends the run in a Failed state
            carrying the FlowFailed instead (`failed_state`); with LORAFLOW_DEBUG it is
            raised too.
    """
    install_log_filter()
    report = _empty_report(profile, profile_name)
    step = StepRecorder(report, _print_progress)
    try:
        snapshot, trained = train_steps(profile, step, report)
        if profile.publish.when == "on_approval":  # publish later: loraflow publish RUN_DIR
            step("local_check", cached(check_local_adapter, local_check_key), train=trained,
                 snapshot=snapshot, profile=profile)
            return hold_for_approval(report, trained, profile.publish)
        published = step("publish", publish_adapter, train=trained, publish=profile.publish)
        report["hub"] = {"endpoint": settings.hub_endpoint(), "repo_id": published.repo_id,
                         "commit": published.commit, "tag": published.tag,
                         "url": published.url, "new_commit": published.new_commit}
        step("verify", cached(verify_publication, verify_key), publication=published,
             train=trained, snapshot=snapshot, profile=profile)
        if profile.publish.merged:
            merged = step("publish_merged", publish_merged, train=trained, snapshot=snapshot,
                          profile=profile, adapter=published)
            report["hub"]["merged"] = merged.model_dump()
        publish_run_artifacts(report)
        emit_published(report["hub"], trained.adapter_sha256, report.get("profile"))
    except BaseException as exc:
        failed = fail(report, exc)
        failure_artifact(report)
        if isinstance(failed.error, LoraflowError) and not settings.debug_enabled():
            return failed_state(failed)
        raise failed from exc
    report["status"] = "completed"
    return report
