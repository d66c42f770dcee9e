"""Publishing on approval (`publish.when: on_approval`).

The finetune flow stops after training and a check of the local adapter; the run
directory holds everything `loraflow publish RUN_DIR` (the loraflow-publish flow, also
the `on-approval` deployment) needs to publish it later.
"""
from __future__ import annotations

from flows.ui import awaiting_approval_artifact

PUBLISH_DEPLOYMENT = "loraflow-publish/on-approval"


def hold_for_approval(report: dict, trained, repo_id: str) -> dict:
    """Mark a completed, unpublished run: where it is and how to publish it."""
    report["approval"] = {"repo_id": repo_id, "run_dir": trained.run_dir,
                          "deployment": PUBLISH_DEPLOYMENT,
                          "command": f"loraflow publish {trained.run_dir}"}
    awaiting_approval_artifact(report)
    report["status"] = "completed"
    return report
