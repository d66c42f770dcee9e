"""Publishing on approval (`publish.when: on_approval`).

Two ways, by where the run runs:

- A deployment run (top level, not a subflow) is gated on its own page: after the local
  check and the samples it suspends itself with `suspend_flow_run(wait_for_input=…)`,
  and the Prefect UI shows a Resume form (`Approval`: approve or reject, the approver's
  name, a note, the repo id and tag, pre-filled from the profile) whose description
  holds the metrics and the samples. While it waits no process and no GPU is held. The
  server resumes it by running the flow again from the top: every step before the gate
  is then a cache hit, and `suspend_flow_run` returns the submitted input (the
  orchestrator refuses a second suspension with the same key). See `approval_gate`.
- Elsewhere — `loraflow run`, sweep variants (subflows), ephemeral runs — the server
  refuses suspension, so the run ends as below and `loraflow publish RUN_DIR`
  publishes it later (`hold_for_approval`).

The finetune flow stops after training and a check of the local adapter. The training's
run directory holds only what its cache key determines (tasks/train.py), so where the
adapter should go is kept apart from it: the request is written to
LORAFLOW_HOME/approvals/<train key>.json, and the approval note names the repo in full.
`loraflow publish RUN_DIR` (the loraflow-publish flow, also the `on-approval`
deployment) publishes where the latest request for that run said, unless told otherwise.
"""
from __future__ import annotations

import json
import os
import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Optional

from prefect.input import RunInput
from pydantic import Field, ValidationError, create_model

from flows.ui import (
    approval_page_artifact,
    approval_summary,
    awaiting_approval_artifact,
)
from profiles.schema import PublishSection
from tasks import errors, settings

PUBLISH_DEPLOYMENT = "loraflow-publish/on-approval"
GATE_KEY = "loraflow-approval"  # the suspension's key: one gate per run, found on resume


class Approval(RunInput):
    """The Resume form of a run waiting for approval (its fields, in the UI's order)."""

    decision: Literal["approve", "reject"] = Field(
        "approve", description="approve: publish to the repo and tag below, verify the Hub "
        "copy and announce it. reject: publish nothing; the run ends Completed.")
    approver: str = Field(min_length=1, description="Your name: kept in the published "
                          "lineage (loraflow.json) with the time and the note.")
    note: str = Field("", description="Why (optional): kept in the lineage.")
    repo_id: str = Field(description="Hub repo to publish to, namespace/name.")
    # Text, not Optional: an empty box reads as "next vN" (the UI renders Optional as a
    # str/None switch with a "Property is type None" note).
    tag: str = Field("", description="Version tag; empty: the next free vN.")


def approval_form(publish: PublishSection, description: str) -> type[Approval]:
    """`Approval` with the repo id and tag of this run's profile as the form's defaults
    and `description` shown above it. (RunInput.with_initial_data would drop the
    fields' descriptions, so the subclass is made here with them kept.)

    Args:
        publish: the run's publish section.
        description: markdown for the form (what is being approved).
    Returns:
        The RunInput subclass to suspend with.
    """
    fields = {"repo_id": (str, Field(publish.repo_id,
                                     description=Approval.model_fields["repo_id"].description)),
              "tag": (str, Field(publish.tag or "",
                                 description=Approval.model_fields["tag"].description))}
    form = create_model("Approval", __base__=Approval, **fields)
    form._description = description
    return form


def can_suspend() -> bool:
    """Whether the current flow run can wait on its own page: the server suspends only
    runs of a deployment that are not subflows (prefect/server/orchestration/
    core_policy.py HandlePausingFlows)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx else None
    return bool(run and run.deployment_id and not run.parent_task_run_id)


def approval_gate(report: dict, samples: Optional[dict], publish: PublishSection) -> dict:
    """Suspend the current (deployment) run until someone resumes it with an `Approval`,
    and return their answer. On the first pass this raises Prefect's Pause and the
    process exits; on the resumed pass it returns the input at once.

    Args:
        report: the run report so far (adapter, metrics).
        samples: the samples step's result as JSON, shown on the form.
        publish: the run's publish section (the form's defaults).
    Returns:
        The decision as {decision, approver, note, at, repo_id, tag, flow_run_id}.
    Raises:
        Pause: the run is now suspended (let it through: the engine handles it).
        ProfileError: the repo id or tag given in the form is refused by the schema,
            named as publish.<field>.
    """
    from prefect.flow_runs import suspend_flow_run

    summary = approval_summary(report, samples)
    form = approval_form(publish, summary)
    approval_page_artifact(report, samples, publish.repo_id,
                           str(Path(report["adapter"]["path"]).parent))
    answer = suspend_flow_run(wait_for_input=form, key=GATE_KEY)
    decision = {"decision": answer.decision, "approver": answer.approver,
                "note": answer.note, "repo_id": answer.repo_id, "tag": answer.tag or None,
                "flow_run_id": report["flow_run_id"],
                "at": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}
    return decision


def approved_section(publish: PublishSection, decision: dict) -> PublishSection:
    """The run's publish section with the repo id and tag the approver gave.

    Raises:
        ProfileError: the schema refuses them, the field named as publish.<field>.
    """
    from profiles.loader import describe_validation_error

    data = {**publish.model_dump(mode="json"), "repo_id": decision["repo_id"],
            "tag": decision["tag"]}
    try:
        return PublishSection.model_validate(data)
    except ValidationError as err:
        raise errors.ProfileError(describe_validation_error(err, "publish")) from None


def lineage_entry(decision: dict) -> dict:
    """What the published lineage keeps of an approval: who, when, the note, the run."""
    return {k: decision[k] for k in ("approver", "at", "note", "flow_run_id")}


def _request_path(run_dir: str) -> Path:
    return settings.loraflow_home() / "approvals" / f"{Path(run_dir).name}.json"


def _samples_path(run_dir: str) -> Path:
    return settings.loraflow_home() / "approvals" / f"{Path(run_dir).name}.samples.json"


def pending_samples(run_dir: str, adapter_sha256: str) -> Optional[dict]:
    """The samples the run that asked for approval took of this adapter, or None: a
    later `loraflow publish RUN_DIR` puts them in the card."""
    try:
        samples = json.loads(_samples_path(run_dir).read_text())
    except (OSError, ValueError):
        return None
    return samples if samples.get("adapter_sha256") == adapter_sha256 else None


def pending_request(run_dir: str) -> Optional[dict]:
    """The publish section the latest approval request for `run_dir` named, or None."""
    path = _request_path(run_dir)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def request_publication(run_dir: str, publish: PublishSection) -> None:
    """Record where the training in `run_dir` should be published, for a later
    `loraflow publish RUN_DIR` (the latest request wins). Kept beside, never inside, the
    run directory: a training's outputs depend on its cache key alone."""
    path = _request_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # appears whole or not at all
    tmp.write_text(json.dumps(publish.model_dump(mode="json"), indent=1, sort_keys=True))
    tmp.replace(path)


def publish_command(run_dir: str, publish: PublishSection) -> str:
    """`loraflow publish RUN_DIR --set publish.…` naming every field that differs from the
    default (repo_id always), so the command publishes where this run asked on its own."""
    import yaml

    def literal(value) -> str:  # --set values are read as YAML: keep "1.0" a string
        plain = isinstance(value, str) and yaml.safe_load(value) == value
        return value if plain else json.dumps(value)

    defaults = {k: f.default for k, f in PublishSection.model_fields.items()}
    sets = [f"publish.{k}={literal(v)}" for k, v in publish.model_dump(mode="json").items()
            if k != "when" and (k == "repo_id" or v != defaults.get(k))]
    return " ".join(["loraflow", "publish", shlex.quote(run_dir)]
                    + [f"--set {shlex.quote(s)}" for s in sets])


def hold_for_approval(report: dict, trained, publish: PublishSection,
                      samples: Optional[dict] = None) -> dict:
    """Mark a completed, unpublished run: where it is, where it should go, how to publish.

    Args:
        report: the run report, updated in place.
        trained: the TrainResult of the training.
        publish: the publish section of this run (the approval's target).
        samples: the samples step's result as JSON, kept for the card of the later
            publication (beside the request, not in the run directory).
    Returns:
        The report, status completed, with an "approval" entry.
    """
    request_publication(trained.run_dir, publish)
    if samples is not None:
        path = _samples_path(trained.run_dir)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(samples, indent=1, sort_keys=True))
        tmp.replace(path)
    report["approval"] = {"repo_id": publish.repo_id, "run_dir": trained.run_dir,
                          "publish": publish.model_dump(mode="json"),
                          "deployment": PUBLISH_DEPLOYMENT,
                          "command": publish_command(trained.run_dir, publish)}
    awaiting_approval_artifact(report)
    report["status"] = "completed"
    return report
