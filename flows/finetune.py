"""The fine-tuning flow: plain calls of the steps, each a task in tasks/ that declares
its own cache policy, retries and report hooks where it is defined.

    preflight ─► download ─┐
        └──────► dataset ──┴─► train ─► publish ─► verify

Caching is keyed on content (see tasks/cache/): preflight never; download,
dataset and train by their content keys, and a hit whose files are gone or changed is
treated as a miss; publish is idempotent against the repo; verify is keyed by
(Hub commit, adapter sha256).

The run report (what `loraflow run` prints) is built from Prefect's final state of each
step's task run, handed over in-process by the steps' hooks (tasks/cache/policy.py
`record_step`): completed, cached or failed, and how long it took.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple, Optional

from prefect import flow
from prefect.runtime import flow_run

from flows.approval import hold_for_approval
from flows.artifacts import publish_run_artifacts
from flows.prefect_runtime import install_log_filter
from flows.ui import emit_published, failure_artifact
from profiles.schema import Profile
from tasks import settings
from tasks.cache.policy import check_storage_settings, finished_steps, step_seconds
from tasks.contracts import DatasetManifest, PreflightReport, SnapshotManifest
from tasks.dataset import prepare_dataset
from tasks.download import download_snapshot
from tasks.errors import LoraflowError, is_transient, unreachable_hub_error
from tasks.local_check import check_local_adapter
from tasks.merge import publish_merged
from tasks.preflight import preflight
from tasks.publish import publish_adapter
from tasks.train import train_adapter
from tasks.verify import verify_publication

install_log_filter()

STEPS = ("preflight", "download", "dataset", "train", "publish", "verify")
TRAINING_LIMIT = "loraflow-training"  # a Prefect global concurrency limit, if one exists


class Prepared(NamedTuple):
    """What training needs from the steps before it."""
    preflight: PreflightReport
    snapshot: SnapshotManifest
    dataset: DatasetManifest


def prepare_inputs(profile: Profile) -> Prepared:
    """preflight → download → dataset: the steps before training, one implementation for
    the fine-tuning flow, the sweep's variants and the multi-node launch
    (deployments/k8s/prepare_launch.py). Call it inside a flow.

    The environment is checked first (LORAFLOW_HOME writable, LORAFLOW_RESULT_STORAGE
    and LORAFLOW_LOCK_LEASE_S usable): a bad setting is named before the Hub is asked
    anything or a byte is downloaded.

    Args:
        profile: the validated profile.
    Returns:
        The preflight report, the snapshot manifest and the dataset manifest.
    Raises:
        SettingsError: an unusable LORAFLOW_* setting.
        LoraflowError: what a step refused (the step's own typed error).
    """
    settings.check_home_writable()
    check_storage_settings()
    pre = preflight(profile)
    # model.id may name an adapter repo: the download fetches it beside its base, and
    # training continues it.
    snapshot = download_snapshot(model=pre.base_model, adapter=pre.adapter)
    data = prepare_dataset(data=profile.data, source=pre.dataset, snapshot=snapshot,
                           seed=profile.training.seed)
    return Prepared(pre, snapshot, data)


def _limit_exists(name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True


@contextmanager
def training_slot():
    """Hold a slot of the `loraflow-training` global concurrency limit while training,
    when the limit exists (the sweep creates it with one slot per GPU). Without it
    nothing waits, and nothing is asked for (Prefect would warn that it does not exist)."""
    if not _limit_exists(TRAINING_LIMIT):
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(TRAINING_LIMIT, occupy=1):
        yield


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
    try:
        pre, snapshot, data = prepare_inputs(profile)
        with training_slot():
            trained = train_adapter(profile=profile, preflight=pre, snapshot=snapshot,
                                    dataset=data, flow_run_id=str(flow_run.id))
        if profile.publish.when == "on_approval":  # publish later: loraflow publish RUN_DIR
            check_local_adapter(train=trained, snapshot=snapshot, profile=profile)
            return hold_for_approval(run_report(profile, profile_name), trained,
                                     profile.publish)
        published = publish_adapter(train=trained, publish=profile.publish)
        verify_publication(publication=published, train=trained, snapshot=snapshot,
                           profile=profile)
        if profile.publish.merged:
            publish_merged(train=trained, snapshot=snapshot, profile=profile,
                           adapter=published)
        report = run_report(profile, profile_name)
        publish_run_artifacts(report)
        emit_published(report["hub"], trained.adapter_sha256, profile_name)
    except BaseException as exc:
        return end_failed(profile, profile_name, exc)
    return report


# ------------------------------------------------------------------ the run report

def run_report(profile: Profile, profile_name: str,
               error: Optional[BaseException] = None) -> dict:
    """The run report of the current flow run, from Prefect's final state of each step's
    task run (recorded in-process by the steps' hooks) and what the steps returned.

    Args:
        profile: the run's profile (the base model's name before preflight answered).
        profile_name: the report's label.
        error: the error that ended the run; None: it completed.
    Returns:
        {status, flow_run_id, profile, steps: {name: {state, seconds[, started,
        finished]}}, base_model, adapter, hub, metrics, error} (+ continued_from when
        training continued an adapter); a step that never ran is "skipped".
    """
    steps = {name: {"state": "skipped", "seconds": 0.0} for name in STEPS}
    results = {}
    for name, (state, task_run) in finished_steps(flow_run.id).items():
        kind = ("failed" if not state.is_completed()
                else "cached" if state.name == "Cached" else "completed")
        started = task_run.expected_start_time or task_run.created
        steps[name] = {"state": kind, "seconds": step_seconds(state, task_run),
                       "started": started.isoformat() if started else None,
                       "finished": state.timestamp.isoformat()}
        if state.is_completed():
            results[name] = state.result()
    report = {"status": "failed" if error else "completed", "flow_run_id": str(flow_run.id),
              "profile": profile_name, "steps": steps,
              "base_model": {"repo_id": profile.model.id, "commit": None},
              "adapter": None, "hub": None, "metrics": None,
              "error": None if error is None else error_dict(error)}
    if pre := results.get("preflight"):
        report["base_model"] = {"repo_id": pre.base_model.repo_id,
                                "commit": pre.base_model.commit}
        if pre.adapter is not None:  # model.id is an adapter repo: training continued it
            report["continued_from"] = {"repo_id": pre.adapter.repo_id,
                                        "commit": pre.adapter.commit}
    if trained := results.get("train"):
        report["adapter"] = {"path": trained.adapter_dir, "sha256": trained.adapter_sha256,
                             "trainable_params": trained.trainable_params,
                             "total_params": trained.total_params}
        report["metrics"] = trained.metrics
    if published := results.get("publish"):
        report["hub"] = {"endpoint": settings.hub_endpoint(), "repo_id": published.repo_id,
                         "commit": published.commit, "tag": published.tag,
                         "url": published.url, "new_commit": published.new_commit}
        if merged := results.get("publish_merged"):
            report["hub"]["merged"] = merged.model_dump()
    return report


def error_dict(error: BaseException) -> dict:
    return (error.to_dict() if isinstance(error, LoraflowError)
            else {"type": type(error).__name__, "message": str(error)})


class FlowFailed(Exception):
    """Carries the partial run report out of a failed flow run."""

    def __init__(self, error: BaseException, report: dict):
        super().__init__(f"{type(error).__name__}: {error}")  # the typed error, in the UI
        self.error = error
        self.report = report


def end_failed(profile: Profile, profile_name: str, exc: BaseException):
    """End the current flow run on `exc`: the partial report, an error artifact, and for
    an expected (typed) error a Failed state returned rather than raised (`failed_state`).

    Args:
        profile: the run's profile.
        profile_name: the report's label.
        exc: what ended the run.
    Returns:
        A Failed state carrying a FlowFailed (typed error, LORAFLOW_DEBUG unset).
    Raises:
        FlowFailed: for any other error, or with LORAFLOW_DEBUG, from `exc`.
    """
    error = exc
    if not isinstance(exc, LoraflowError) and is_transient(exc):
        # A transport error that outlived the step's retries: say which Hub and the fix.
        error = unreachable_hub_error(exc, settings.hub_endpoint())
    failed = FlowFailed(error, run_report(profile, profile_name, error))
    failure_artifact(failed.report)
    if isinstance(error, LoraflowError) and not settings.debug_enabled():
        return failed_state(failed)
    raise failed from exc


def failed_state(failed: FlowFailed):
    """The flow's end state for an expected (typed) error: a Failed state whose message
    is the one-line error, returned rather than raised so that Prefect logs no
    traceback for it ("Encountered exception during execution"). Its data is the
    FlowFailed, so `state.result(raise_on_failure=False)` still returns the report and a
    parent flow calling this one still gets the exception raised.

    Args:
        failed: the FlowFailed with the error and the partial report.
    Returns:
        A Prefect Failed state.
    """
    from prefect.states import Failed

    error = failed.error
    return Failed(message=f"{type(error).__name__}: {getattr(error, 'message', error)}",
                  data=failed)
