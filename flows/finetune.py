"""The fine-tuning flow: plain calls of the steps, each a task in tasks/ that declares
its own cache policy, retries and report hooks where it is defined.

    preflight ─► download ─┐
        └──────► dataset ──┴─► train ─► samples ─► publish ─► verify

With `publish.when: on_approval` the run checks the local adapter, takes the samples and
waits for approval: on its own page (a deployment run suspends with a Resume form) or,
elsewhere, until `loraflow publish RUN_DIR` (flows/approval.py).

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
from typing import Any, NamedTuple, Optional

from prefect import flow
from prefect.runtime import flow_run

from flows.approval import (
    approval_gate,
    approved_section,
    can_suspend,
    hold_for_approval,
    lineage_entry,
)
from flows.artifacts import publish_run_artifacts
from flows.prefect_runtime import install_log_filter
from flows.ui import (
    decision_artifact,
    emit_published,
    failure_artifact,
    samples_artifact,
)
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
from tasks.samples import generate_samples
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


def training_is_cached(profile: Profile, snapshot, dataset) -> bool:
    """Whether the train task would be a cache hit: its result record exists (and has not
    expired) in the store the task reads, and the run directory of its key holds its
    finished outputs, unchanged. Asked before taking a `loraflow-training` slot, so a
    cached training never waits for one.

    Prefect decides a hit inside the task run (its transaction), after a slot would have
    been taken around the call; asking the same store first is the only way to know
    beforehand. Should the answer turn stale in between (a record expired a moment
    later), the training runs without a slot: it is never refused.

    Args:
        profile: the variant's profile.
        snapshot, dataset: the manifests prepare_inputs returned.
    Returns:
        True when the training is a cache hit.
    """
    from prefect.results import ResultStore

    from tasks.cache.policy import current_result_storage
    from tasks.train import train_is_cached_and_intact, train_key

    store = ResultStore(result_storage=current_result_storage())
    return (store.exists(train_key(profile, snapshot, dataset))
            and train_is_cached_and_intact(profile, snapshot, dataset))


@contextmanager
def training_slot(profile: Profile, snapshot, dataset):
    """Hold a slot of the `loraflow-training` global concurrency limit while training,
    when the limit exists (the sweep creates it with one slot per GPU) and the training is
    not a cache hit (training_is_cached). Without the limit nothing waits, and nothing is
    asked for (Prefect would warn that it does not exist)."""
    if not _limit_exists(TRAINING_LIMIT):
        yield
        return
    if training_is_cached(profile, snapshot, dataset):
        print(f"training is cached: no {TRAINING_LIMIT} slot taken")
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(TRAINING_LIMIT, occupy=1):
        yield


def apply_overrides(profile: Profile, overrides: dict[str, Any]) -> Profile:
    """`overrides` ({"lora.r": 4}) on top of the profile, by `loraflow run --set`'s rules
    (profiles/loader.py apply_override): dotted section.key names, a text value read as
    YAML ("1e-4", "[q_proj, v_proj]"), any other JSON value taken as it is; then the
    whole profile is validated again.

    Args:
        profile: the validated profile.
        overrides: dotted field → value; {}: the profile unchanged.
    Returns:
        The profile with the overrides applied.
    Raises:
        ProfileError: a name that is not section.key, or a value the schema refuses,
            named as the dotted field with the fix.
    """
    if not overrides:
        return profile
    import json

    from pydantic import ValidationError

    from profiles.loader import (
        _booleans_taken_as_numbers,
        apply_override,
        describe_validation_error,
    )
    from tasks.errors import ProfileError

    data = profile.model_dump(mode="json", exclude_unset=True)
    for dotted, value in overrides.items():
        raw = value if isinstance(value, str) else json.dumps(value)  # JSON is YAML
        apply_override(data, f"{dotted}={raw}")
    try:
        updated = Profile.model_validate(data)
    except ValidationError as err:
        raise ProfileError(describe_validation_error(
            err, heading="overrides: invalid value")) from None
    if booleans := _booleans_taken_as_numbers(data, updated):
        raise ProfileError("overrides: " + "; ".join(
            f"{loc}: {str(v).lower()} is a boolean where a number is expected. Fix: give "
            "a number" for loc, v in booleans))
    return updated


@flow(name="loraflow-finetune", log_prints=True)
def finetune(profile: Profile, profile_name: str = "custom",
             overrides: dict[str, Any] = {}) -> dict:  # noqa: B006 — Prefect's form default
    """Profile → trained LoRA adapter published on the Hub. Returns the run report.

    Args:
        profile: the validated profile (model, quantization, lora, data, training, publish).
        profile_name: a label for reports (the preset or file name).
        overrides: a few fields to change without restating the profile, by dotted name,
            as `loraflow run --set` takes them: {"lora.r": 4, "training.max_steps": 10}
            (`prefect deployment run … --param overrides='{"lora.r": 4}'`).
    Raises:
        FlowFailed: wrapping an unexpected step error, with the partial report. A typed
            error (and a transport error, turned into one) ends the run in a Failed state
            carrying the FlowFailed instead (`failed_state`); with LORAFLOW_DEBUG it is
            raised too.
    """
    from prefect.exceptions import Pause

    install_log_filter()
    try:
        profile = apply_overrides(profile, overrides)
        pre, snapshot, data = prepare_inputs(profile)
        with training_slot(profile, snapshot, data):
            trained = train_adapter(profile=profile, preflight=pre, snapshot=snapshot,
                                    dataset=data, flow_run_id=str(flow_run.id))
        gated = profile.publish.when == "on_approval"
        if gated:  # nothing is published: the local copy is what gets approved
            check_local_adapter(train=trained, snapshot=snapshot, profile=profile)
        samples = None
        if profile.model.task == "causal-lm":  # what a person can read side by side
            samples = generate_samples(train=trained, snapshot=snapshot, dataset=data,
                                       profile=profile).model_dump(mode="json")
            samples_artifact(samples, profile.publish.repo_id)
        publish, approval = profile.publish, None
        if gated:
            if not can_suspend():  # publish later: loraflow publish RUN_DIR
                return hold_for_approval(run_report(profile, profile_name), trained,
                                         profile.publish, samples)
            # Suspends here (the process exits); a resumed run comes back with the answer.
            decision = approval_gate(run_report(profile, profile_name), samples,
                                     profile.publish)
            if decision["decision"] == "reject":
                report = run_report(profile, profile_name)
                report.update(status="rejected", approval=decision)
                decision_artifact(report)
                return report
            publish, approval = approved_section(profile.publish, decision), decision
        published = publish_adapter(train=trained, publish=publish, samples=samples,
                                    approval=approval and lineage_entry(approval))
        verify_publication(publication=published, train=trained, snapshot=snapshot,
                           profile=profile)
        if profile.publish.merged:  # beside the adapter: where the approver said
            publish_merged(train=trained, snapshot=snapshot,
                           profile=profile.model_copy(update={"publish": publish}),
                           adapter=published)
        report = run_report(profile, profile_name)
        if approval is not None:
            report["approval"] = approval
            decision_artifact(report)
        publish_run_artifacts(report)
        emit_published(report["hub"], trained.adapter_sha256, profile_name)
    except Pause:
        raise  # suspended for approval: Prefect's engine ends this process
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
        training continued an adapter, + samples when they were taken); a step of
        STEPS that never ran is "skipped" (local_check and samples appear when they ran).
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
    if samples := results.get("samples"):
        report["samples"] = samples.model_dump(mode="json")
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
