"""The publish flow: publish a finished training run without training again.

`loraflow publish RUN_DIR` runs it; it is also the flow a publish deployment runs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from prefect import flow
from pydantic import ValidationError

from flows.ui import emit_published
from profiles.schema import PublishSection
from tasks import errors
from tasks.cache.manifest import outputs_intact, sha256_file
from tasks.contracts import RECORD, TrainResult
from tasks.publish import publish_adapter


def load_run(run_dir: str) -> TrainResult:
    """A finished run directory → the TrainResult the flow would have passed on."""
    path = Path(run_dir).expanduser().resolve()
    if not (path / RECORD).is_file() or not outputs_intact(path):
        raise errors.ProfileError(
            f"RUN_DIR: {path} is not a finished loraflow run (no {RECORD}, or its files "
            "changed). Fix: pass a directory listed by `loraflow runs`.")
    record = json.loads((path / RECORD).read_text())
    adapter = path / "adapter"
    if sha256_file(adapter / "adapter_model.safetensors") != record["adapter"]["sha256"]:
        raise errors.ProfileError(f"RUN_DIR: {adapter} no longer matches its record. Fix: "
                                  "re-run the training.")
    return TrainResult(run_dir=str(path), adapter_dir=str(adapter),
                       adapter_sha256=record["adapter"]["sha256"],
                       trainable_params=record["adapter"]["trainable_params"],
                       total_params=record["adapter"]["total_params"],
                       metrics=record["metrics"])


def publish_section_for(run_dir: str, overrides: Optional[dict] = None) -> PublishSection:
    """Where to publish a finished run: the latest approval request for it (the publish
    section of the run that asked, flows/approval.py), with `overrides` on top (e.g.
    another repo_id or tag). The training's own outputs say nothing about it.

    Args:
        run_dir: the finished run's directory.
        overrides: publish fields, e.g. {"repo_id": "me/other"}.
    Returns:
        The validated PublishSection.
    Raises:
        ProfileError: no repo id anywhere, or a field the Hub (or the schema) refuses,
            named as publish.<field>.
    """
    from flows.approval import pending_request
    from profiles.loader import describe_validation_error

    data = {**(pending_request(str(Path(run_dir).expanduser().resolve())) or {}),
            **(overrides or {})}
    if not data.get("repo_id"):
        raise errors.ProfileError(
            f"publish.repo_id: no repo to publish {run_dir} to (no approval request names "
            "one, and none was given). Fix: loraflow publish RUN_DIR --set "
            "publish.repo_id=namespace/name.")
    try:
        return PublishSection.model_validate(data)
    except ValidationError as err:
        raise errors.ProfileError(describe_validation_error(err, "publish")) from None


@flow(name="loraflow-publish", log_prints=True)
def publish_run(run_dir: str, publish: Optional[PublishSection] = None) -> dict:
    """Publish the adapter of a finished run (by default where its profile said).

    Args:
        run_dir: the finished run's directory, as its "awaiting approval" note in the
            UI and `loraflow runs` show it (LORAFLOW_HOME/runs/<key>).
        publish: where and how to publish; None: where the latest approval request
            for this run said (publish_section_for).
    """
    from flows.approval import pending_samples

    train = load_run(run_dir)
    section = publish or publish_section_for(run_dir)
    result = publish_adapter(train, section,
                             samples=pending_samples(train.run_dir, train.adapter_sha256))
    # Automations notify on this event: once per landed commit, not per approval.
    emit_published(result.model_dump(), train.adapter_sha256)
    return {"run_dir": train.run_dir, "adapter_sha256": train.adapter_sha256,
            **result.model_dump()}
