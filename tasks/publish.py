"""publish_adapter: one atomic commit of the adapter, its card and its lineage, plus a tag.

- Atomic: adapter_config.json, adapter_model.safetensors, README.md and loraflow.json
  land in one `create_commit`, made against the head it read (`parent_commit`), so two
  runs publishing to one repo at once cannot both take the same version: the loser
  re-reads and tries again.
- Idempotent: when the head's loraflow.json already names this adapter's sha256, no
  commit is made; the existing commit (and its tag) is reported.
- Private by default; an existing public repo is refused when private is asked.
- The commit POST is never retried blindly (the server may have applied it); a failed
  publish is a PublishError, and re-running is safe because training is cached and
  publishing is idempotent.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from prefect import task
from pydantic import BaseModel

from profiles.schema import PublishSection
from tasks import errors, settings
from tasks.hub import hub_api, repo_url
from tasks.modelcard import render_model_card
from tasks.train import ADAPTER_FILES, RECORD, TrainResult

LINEAGE = "loraflow.json"
MAX_ATTEMPTS = 3


class PublishResult(BaseModel):
    repo_id: str
    commit: str
    tag: Optional[str]
    url: str
    new_commit: bool


def lineage_manifest(record: dict, version: int, tag: str) -> dict:
    """loraflow.json: the profile (no secrets), input hashes, adapter sha256, run ids."""
    keep = ("profile", "base_model", "dataset", "adapter", "metrics", "flow_run_id",
            "train_key", "versions", "hardware")
    return {"loraflow_version": 1, "publication": {"version": version, "tag": tag},
            **{k: record[k] for k in keep}}


def _head_lineage(api, repo_id: str, head: Optional[str]) -> Optional[dict]:
    """The loraflow.json at the head commit, or None (empty repo, not a loraflow repo)."""
    if head is None:
        return None
    from huggingface_hub import errors as hf
    from huggingface_hub import hf_hub_download

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = hf_hub_download(repo_id, LINEAGE, revision=head, cache_dir=tmp,
                                   endpoint=api.endpoint, token=api.token)
        except hf.EntryNotFoundError:
            return None
        return json.loads(Path(path).read_text())


def _tag_targets(api, repo_id: str) -> dict[str, str]:
    return {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags}


def _ensure_tag(api, repo_id: str, tag: str, commit: str) -> None:
    """Tag `commit`; an existing tag on the same commit is fine, on another is an error."""
    target = _tag_targets(api, repo_id).get(tag)
    if target == commit:
        return
    if target is not None:
        raise errors.PublishError(
            f"publish.tag: tag '{tag}' already points at commit {target} of {repo_id}, which "
            "holds a different adapter. Fix: choose a new publish.tag, or leave it null for "
            "the next vN.", repo_id=repo_id)
    api.create_tag(repo_id, tag=tag, revision=commit, tag_message=f"loraflow {tag}")


def _operations(train: TrainResult, card: str, lineage: dict):
    from huggingface_hub import CommitOperationAdd

    adapter_dir = Path(train.adapter_dir)
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(adapter_dir / name))
           for name in ADAPTER_FILES]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    ops.append(CommitOperationAdd(path_in_repo=LINEAGE, path_or_fileobj=(
        json.dumps(lineage, indent=1, sort_keys=True) + "\n").encode()))
    return ops


def _publish_once(api, train: TrainResult, publish: PublishSection, record: dict):
    """One read-decide-commit round. Returns a PublishResult, or None if the head moved."""
    from huggingface_hub import errors as hf

    repo_id = publish.repo_id
    head = api.model_info(repo_id).sha
    current = _head_lineage(api, repo_id, head)
    if current and current["adapter"]["sha256"] == train.adapter_sha256:
        tag = current["publication"]["tag"]
        _ensure_tag(api, repo_id, tag, head)  # a crash between commit and tag heals here
        return PublishResult(repo_id=repo_id, commit=head, tag=tag, url=repo_url(repo_id),
                             new_commit=False)
    version = (current["publication"]["version"] + 1) if current else 1
    tag = publish.tag or f"v{version}"
    if tag in _tag_targets(api, repo_id):
        raise errors.PublishError(
            f"publish.tag: tag '{tag}' already exists in {repo_id} on a different adapter. "
            "Fix: choose a new publish.tag, or leave it null for the next vN.", repo_id=repo_id)
    card = render_model_card(record, repo_id)
    ops = _operations(train, card, lineage_manifest(record, version, tag))
    try:
        info = api.create_commit(repo_id, operations=ops, parent_commit=head,
                                 commit_message=f"loraflow: publish {tag}",
                                 commit_description=f"adapter sha256 {train.adapter_sha256}")
    except hf.HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status in (409, 412):  # someone else committed first: re-read and retry
            return None
        raise errors.PublishError(
            f"the commit to {repo_id} failed (HTTP {status}); nothing was tagged. Fix: re-run "
            "the same command — training is cached and publishing is idempotent, so it lands "
            "exactly one commit.", repo_id=repo_id) from None
    _ensure_tag(api, repo_id, tag, info.oid)
    return PublishResult(repo_id=repo_id, commit=info.oid, tag=tag, url=repo_url(repo_id),
                         new_commit=True)


def run_publish(train: TrainResult, publish: PublishSection) -> PublishResult:
    """Create the repo if needed (private by default) and publish the run's adapter."""
    api = hub_api()
    record = json.loads((Path(train.run_dir) / RECORD).read_text())
    from huggingface_hub import errors as hf

    try:
        api.create_repo(publish.repo_id, private=publish.private, exist_ok=True)
        if publish.private and not api.model_info(publish.repo_id).private:
            raise errors.PublishError(
                f"publish.private: {publish.repo_id} already exists and is public; loraflow "
                "will not publish a private adapter into it. Fix: set publish.private to "
                "false, or choose another publish.repo_id.", repo_id=publish.repo_id)
        for _ in range(MAX_ATTEMPTS):
            result = _publish_once(api, train, publish, record)
            if result is not None:
                return result
    except hf.HfHubHTTPError as exc:
        raise errors.translate_hub_error(exc, repo_id=publish.repo_id,
                                         endpoint=settings.hub_endpoint()) from None
    raise errors.PublishError(f"{publish.repo_id} kept moving during {MAX_ATTEMPTS} attempts "
                              "to publish. Fix: re-run when other publishers are done.")


@task(name="publish")
def publish_adapter(train: TrainResult, publish: PublishSection) -> PublishResult:
    """Prefect task: run_publish. Not cached: idempotent against the repo itself."""
    return run_publish(train, publish)
