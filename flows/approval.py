"""Publishing on approval (`publish.when: on_approval`).

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
from pathlib import Path
from typing import Optional

from flows.ui import awaiting_approval_artifact
from profiles.schema import PublishSection
from tasks import settings

PUBLISH_DEPLOYMENT = "loraflow-publish/on-approval"


def _request_path(run_dir: str) -> Path:
    return settings.loraflow_home() / "approvals" / f"{Path(run_dir).name}.json"


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


def hold_for_approval(report: dict, trained, publish: PublishSection) -> dict:
    """Mark a completed, unpublished run: where it is, where it should go, how to publish.

    Args:
        report: the run report, updated in place.
        trained: the TrainResult of the training.
        publish: the publish section of this run (the approval's target).
    Returns:
        The report, status completed, with an "approval" entry.
    """
    request_publication(trained.run_dir, publish)
    report["approval"] = {"repo_id": publish.repo_id, "run_dir": trained.run_dir,
                          "publish": publish.model_dump(mode="json"),
                          "deployment": PUBLISH_DEPLOYMENT,
                          "command": publish_command(trained.run_dir, publish)}
    awaiting_approval_artifact(report)
    report["status"] = "completed"
    return report
