"""publish_adapter: one atomic commit of the adapter, its card, lineage and loss curve,
plus a tag per version.

- Atomic: adapter_config.json, adapter_model.safetensors, the tokenizer training used
  (its files as saved next to the adapter), README.md, loraflow.json and loss_curve.png
  land in one `create_commit`, made against the head it read
  (`parent_commit`), so two runs publishing to one repo at once cannot both land on the
  same head: the loser re-reads and tries again.
- Versions: the profile's tag, or the next free `vN`; a tag that already points at
  other content is a typed error raised before anything is pushed.
- Idempotent: when the head's loraflow.json already names this adapter's sha256, no
  commit is made; the existing commit and its tag are reported.
- Private by default; an existing public repo is refused when private is asked.
- The commit POST is never retried blindly (the server may have applied it although it
  answered an error): an error answer to it is a PublishError, and re-running is safe
  because training is cached and every attempt reads the head's lineage before it
  commits. That same check makes the step as a whole safe to retry, so transient
  failures elsewhere (an API call answered 429/5xx, a connection dropped, a tag POST
  that failed after its commit landed) are retried by the task (tasks/retry.py): the
  retry finds the commit by its lineage and only tags it.
- Tagging is idempotent too: a tag already on the commit is reported, not made again.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from prefect import task

from profiles.schema import PublishSection
from tasks import errors, settings
from tasks.cache.policy import REPORT_HOOKS
from tasks.contracts import ADAPTER_FILES, RECORD, PublishResult, TrainResult
from tasks.hub import hub_api
from tasks.publication.commit import ensure_repo, planned_tag, push_bundle
from tasks.publication.modelcard import publication_files
from tasks.retry import TRANSIENT_RETRIES

PUBLICATIONS = "publications.json"  # in the run dir: where this run was published


def adapter_bundle(run_dir: Path, record: dict, publish: PublishSection,
                   samples: Optional[dict] = None,
                   approval: Optional[dict] = None) -> dict[str, object]:
    """The files of one publication: the adapter and the tokenizer saved with it, and the
    card, lineage and loss curve rendered from the training record and the publish
    section given now (rendering is pure: the same bytes on every re-publish to the same
    place, and the lineage names the publication it travels with).

    Args:
        run_dir: the finished training's run directory.
        record: its record.json.
        publish: where and how it is published.
        samples: the samples step's result as JSON, for the card (None: no section).
        approval: who approved it, when, with what note, for the lineage (None: none).
    Returns:
        Path in repo → local path or bytes. With training.report_to tensorboard, the
        run's TensorBoard event files (RUN_DIR/tensorboard) go under `runs/`, where
        Trainer.push_to_hub puts them and the Hub's TensorBoard tab finds them.
    """
    adapter = run_dir / "adapter"
    names = list(ADAPTER_FILES) + list((record.get("tokenizer") or {}).get("files") or [])
    files: dict[str, object] = {name: adapter / name for name in names}
    report_to = ((record.get("profile") or {}).get("training") or {}).get("report_to") or []
    tensorboard = run_dir / "tensorboard"
    if "tensorboard" in report_to and tensorboard.is_dir():
        files.update({f"runs/{path.relative_to(tensorboard).as_posix()}": path
                      for path in sorted(tensorboard.rglob("*")) if path.is_file()})
    files.update(publication_files(record, publish.model_dump(mode="json"), samples,
                                   approval))
    return files


def _remember(run_dir: Path, result: PublishResult) -> None:
    """Append to the run's publications.json (what `loraflow runs` shows)."""
    path = run_dir / PUBLICATIONS
    seen = json.loads(path.read_text()) if path.is_file() else []
    entry = {"repo_id": result.repo_id, "commit": result.commit, "tag": result.tag,
             "endpoint": settings.hub_endpoint()}
    if entry not in seen:
        path.write_text(json.dumps(seen + [entry], indent=1))


def run_publish(train: TrainResult, publish: PublishSection, samples: Optional[dict] = None,
                approval: Optional[dict] = None) -> PublishResult:
    """Publish a trained run's adapter to publish.repo_id (`samples` and `approval` go
    to the card and the lineage, see adapter_bundle). Raises PublishError."""
    api = hub_api()
    run_dir = Path(train.run_dir)
    record = json.loads((run_dir / RECORD).read_text())
    from huggingface_hub import errors as hf

    try:
        ensure_repo(api, publish.repo_id, publish.private)
        # The card pins its snippets to the version tag: known before rendering.
        tag = planned_tag(api, publish.repo_id, train.adapter_sha256, publish.tag)
        publish = publish.model_copy(update={"tag": tag})
        bundle = adapter_bundle(run_dir, record, publish, samples, approval)
        result = push_bundle(api, publish.repo_id, bundle, train.adapter_sha256, tag,
                             summary="loraflow: publish adapter")
    except hf.HfHubHTTPError as exc:
        raise errors.translate_hub_error(
            exc, repo_id=publish.repo_id, endpoint=settings.hub_endpoint(),
            doing=f"publishing to {publish.repo_id}",
            fix="run the same command again once the Hub answers — training is cached and "
                "publishing reads the repo's head first, so it lands at most one commit and "
                "tags it once") from None
    _remember(run_dir, result)
    return result


@task(name="publish", **REPORT_HOOKS, **TRANSIENT_RETRIES)
def publish_adapter(train: TrainResult, publish: PublishSection,
                    samples: Optional[dict] = None,
                    approval: Optional[dict] = None) -> PublishResult:
    """Prefect task: run_publish. Not cached: idempotent against the repo itself, which
    is what makes retrying it on a transient error safe (see the module docstring)."""
    return run_publish(train, publish, samples, approval)
