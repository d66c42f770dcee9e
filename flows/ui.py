"""What a run shows in the Prefect UI and tells automations, beyond flows/artifacts.py:
the typed error of a failed run, the "awaiting approval" note of a run that stops
before publishing, and the `loraflow.adapter.published` event of a landed commit (once
per commit, whichever run lands or heals it).

Never the token: these carry ids, shas, paths and the typed errors' messages, which
name causes and fixes, not credentials.
"""
from __future__ import annotations

from typing import Optional
from uuid import NAMESPACE_URL, UUID, uuid5

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


def samples_artifact(samples: dict, repo_id: str) -> None:
    """A markdown artifact with the samples table (prompt, reference, base, adapter).

    Created by the flow, not the samples step, so a run whose samples were a cache hit
    shows them too; the key is stable per repo, so the UI shows their history.

    Args:
        samples: the samples step's result as JSON.
        repo_id: the repo the run publishes to (the artifact's key).
    """
    from prefect.artifacts import create_markdown_artifact

    from tasks.publication.modelcard import samples_markdown

    create_markdown_artifact(
        key=artifact_key(repo_id, "samples"),
        markdown=f"# Samples: adapter `{samples['adapter_sha256'][:16]}`\n\n"
                 f"{samples_markdown(samples)}",
        description="held-out prompts, base and adapter side by side")


def _metric(value) -> str:
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def approval_summary(report: dict, samples: Optional[dict]) -> str:
    """Markdown for the approver: the adapter, its metrics and its samples. It is the
    Resume form's description on the run's page and the "awaiting approval" artifact.

    Args:
        report: the run report so far (adapter, metrics, base model).
        samples: the samples step's result as JSON, or None.
    Returns:
        Markdown.
    """
    from tasks.publication.modelcard import samples_markdown

    adapter, metrics = report["adapter"], report.get("metrics") or {}
    rows = "\n".join(f"| {k} | {_metric(metrics.get(k))} |" for k in
                     ("first_loss", "last_loss", "eval_loss", "train_loss", "steps"))
    return f"""# Approve this adapter?

Adapter `{adapter['sha256'][:16]}` on `{report['base_model']['repo_id']}` @
`{(report['base_model']['commit'] or '')[:12]}`, trained and checked locally; nothing
is published until you resume this run with **approve**.

| metric | value |
|---|---|
{rows}

## Samples

{samples_markdown(samples)}"""


def approval_page_artifact(report: dict, samples: Optional[dict], repo_id: str,
                           run_dir: str) -> None:
    """The "awaiting approval" artifact of a run suspended on its own page; it also names
    the run directory, for `loraflow publish RUN_DIR` on the machine that trained it."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key=artifact_key(repo_id, "approval"),
        markdown=approval_summary(report, samples)
        + "\nResume this run (the **Resume** button on its page) to approve or reject it."
        f"\n\n    run_dir: {run_dir}\n",
        description="trained, waiting for approval on this run's page")


def decision_artifact(report: dict) -> None:
    """The approval's outcome on the run's page: who decided what, and where it went."""
    from prefect.artifacts import create_markdown_artifact

    approval = report["approval"]
    where = (f"published to [{report['hub']['repo_id']}]({report['hub']['url']}) at "
             f"`{report['hub']['commit']}`, tag `{report['hub']['tag']}`"
             if report.get("hub") else "nothing was published")
    done = {"approve": "Approved", "reject": "Rejected"}[approval["decision"]]
    create_markdown_artifact(
        key=artifact_key(approval["repo_id"], "approval"),
        markdown=f"# {done} by {approval['approver']}\n\n"
                 f"{approval['at']}: {where}.\n\n"
                 + (f"> {approval['note']}\n" if approval.get("note") else ""),
        description=f"{done.lower()} by {approval['approver']}")


def published_event_id(hub: dict) -> UUID:
    """The `loraflow.adapter.published` event's id for one landed commit: a UUID5 of the
    repo's URL and the commit sha, the same in every process that sees that commit.

    Prefect's event store keeps one event per id (prefect/server/events/storage/
    database.py inserts with ON CONFLICT DO NOTHING on SQLite and Postgres alike), so an
    id derived from the commit makes the event belong to the commit, not to the process.

    Args:
        hub: the publication (repo_id, commit, url).
    Returns:
        The event id.
    """
    return uuid5(NAMESPACE_URL, f"{hub['url']}@{hub['commit']}")


def _already_announced(event_id: UUID) -> bool:
    """Whether the API already holds the event. Automations react to each event they
    receive and do not look at ids, so a publication that is re-confirmed by a later run
    (cached, or healing a run that died) is not sent again once it is stored. Best
    effort: when the API cannot say, the event is sent and the store's id dedupes it."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.events.filters import EventFilter, EventIDFilter

        with get_client(sync_client=True) as client:
            page = client.read_events(EventFilter(id=EventIDFilter(id=[event_id])), limit=1)
        return bool(page.events)
    except Exception:  # noqa: BLE001 — an older server, no API: fall back to the store
        return False


def emit_published(hub: Optional[dict], adapter_sha256: Optional[str],
                   profile_name: Optional[str] = None) -> Optional[UUID]:
    """Emit `loraflow.adapter.published` once per landed commit.

    The publication a run reports is the repo's commit for this adapter, whether this
    process made it (`new_commit`) or found it there — landed by a concurrent run, or by
    a run that died after its commit and before its event (this run heals it). So the
    event is emitted in both cases, with an id derived from the commit
    (`published_event_id`), and skipped when the API already holds that id.

    Args:
        hub: the publication (repo_id, commit, tag, url, new_commit); None: nothing.
        adapter_sha256: the adapter's weights hash, for the payload.
        profile_name: the profile's label, for the payload.
    Returns:
        The event's id, or None when there is no publication.
    """
    from prefect.events import emit_event

    if not hub or not hub.get("commit"):
        return None
    event_id = published_event_id(hub)
    if _already_announced(event_id):
        return event_id
    emit_event(event=PUBLISHED_EVENT, id=event_id,
               resource={"prefect.resource.id": f"loraflow.adapter.{hub['repo_id']}",
                         "prefect.resource.name": hub["repo_id"]},
               payload={"repo_id": hub["repo_id"], "commit": hub["commit"], "tag": hub["tag"],
                        "url": f"{hub['url']}/commit/{hub['commit']}",
                        "adapter_sha256": adapter_sha256, "profile": profile_name})
    return event_id
