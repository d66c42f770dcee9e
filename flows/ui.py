"""What a run shows in the Prefect UI and tells automations, beyond flows/artifacts.py:
the typed error of a failed run, the "awaiting approval" note of a run that stops
before publishing, and the `loraflow.adapter.published` event of a new version.

Never the token: these carry ids, shas, paths and the typed errors' messages, which
name causes and fixes, not credentials.
"""
from __future__ import annotations

from typing import Optional

from flows.artifacts import artifact_key

PUBLISHED_EVENT = "loraflow.adapter.published"


def _repo(report: dict) -> str:
    hub = report.get("hub") or {}
    return hub.get("repo_id") or report.get("target_repo") or report.get("profile") or "run"


def failure_artifact(report: dict) -> None:
    """A markdown artifact with the failed step and the typed error (type, message, fix).

    Best effort: it must never hide the error it reports."""
    try:
        _failure_artifact(report)
    except Exception as exc:  # noqa: BLE001 — e.g. no API while the run is being torn down
        print(f"loraflow: could not create the error artifact ({type(exc).__name__})")


def _failure_artifact(report: dict) -> None:
    from prefect.artifacts import create_markdown_artifact

    error = report.get("error") or {}
    failed = [name for name, s in report["steps"].items() if s["state"] == "failed"]
    create_markdown_artifact(
        key=artifact_key(_repo(report), "error"),
        markdown=f"# loraflow run failed: {error.get('type', 'Error')}\n\n"
                 f"Step: **{failed[0] if failed else 'before the first step'}**\n\n"
                 f"{error.get('message', '')}\n",
        description=f"{error.get('type', 'Error')} in {failed[0] if failed else 'the flow'}")


def awaiting_approval_artifact(report: dict) -> None:
    from prefect.artifacts import create_markdown_artifact

    approval = report["approval"]
    create_markdown_artifact(
        key=artifact_key(approval["repo_id"], "approval"),
        markdown=f"""# Awaiting approval: {approval['repo_id']}

Adapter `{report['adapter']['sha256'][:16]}` trained and checked locally; nothing was
published. To publish it to `{approval['repo_id']}`, run the **{approval['deployment']}**
deployment with

    run_dir: {approval['run_dir']}

(it publishes where this run asked; give it a `publish` parameter to publish elsewhere),
or, on the machine that trained it: `{approval['command']}`.
""", description="trained, not yet published")


def emit_published(hub: Optional[dict], adapter_sha256: Optional[str],
                   profile_name: Optional[str] = None) -> None:
    """Emit `loraflow.adapter.published` for a publication that landed a new commit — by
    the finetune flow or by an approved publish — and for nothing else, so a version is
    announced once however often it is published."""
    from prefect.events import emit_event

    if not hub or not hub.get("new_commit"):
        return
    emit_event(event=PUBLISHED_EVENT,
               resource={"prefect.resource.id": f"loraflow.adapter.{hub['repo_id']}",
                         "prefect.resource.name": hub["repo_id"]},
               payload={"repo_id": hub["repo_id"], "commit": hub["commit"], "tag": hub["tag"],
                        "url": f"{hub['url']}/commit/{hub['commit']}",
                        "adapter_sha256": adapter_sha256, "profile": profile_name})
