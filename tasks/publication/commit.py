"""One atomic commit of a bundle of files to a Hub repo, plus a version tag — shared by
the adapter's publish and the merged model's.

- Atomic: every file lands in one `create_commit` made against the head it read
  (`parent_commit`), so two runs publishing to one repo at once cannot both land on the
  same head: the loser re-reads and tries again (MAX_ATTEMPTS).
- Idempotent: when the head's loraflow.json already names this adapter's sha256, no
  commit is made; the existing commit and its tag are reported.
- Versions: the wanted tag, or the next free `vN`; a tag that already points at other
  content is a typed error raised before anything is pushed. A tag already on the
  commit is reported, not made again.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Optional

from tasks import errors
from tasks.contracts import PublishResult
from tasks.hub import repo_url
from tasks.publication.modelcard import LINEAGE

MAX_ATTEMPTS = 3


def _head_lineage(api, repo_id: str, head: Optional[str]) -> Optional[dict]:
    """The loraflow.json at the head commit, or None (empty repo, not a loraflow repo)."""
    if head is None:
        return None
    from huggingface_hub import errors as hf
    from huggingface_hub import hf_hub_download

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = hf_hub_download(repo_id, LINEAGE, revision=head, cache_dir=tmp,
                                   endpoint=api.endpoint, token=api.token)
        except hf.EntryNotFoundError:
            return None
        return json.loads(Path(path).read_text())


def _tag_targets(api, repo_id: str) -> dict[str, str]:
    return {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags}


def _next_version(tags: dict[str, str]) -> str:
    numbers = [int(m.group(1)) for t in tags if (m := re.fullmatch(r"v(\d+)", t))]
    return f"v{max(numbers, default=0) + 1}"


def _refuse_taken_tag(tag: str, tags: dict[str, str], commit: Optional[str], repo_id: str):
    if tag in tags and tags[tag] != commit:
        raise errors.PublishError(
            f"publish.tag: tag '{tag}' already points at commit {tags[tag]} of {repo_id}, "
            "which holds a different adapter. Fix: choose a new publish.tag, or leave it null "
            "for the next vN.", repo_id=repo_id)


def _tag(api, repo_id: str, commit: str, wanted: Optional[str]) -> str:
    """Tag `commit`: the profile's tag, an existing tag on it, or the next free vN.

    An automatic vN that another publisher took in the meantime is re-numbered.
    """
    from huggingface_hub import errors as hf

    for _ in range(MAX_ATTEMPTS):
        tags = _tag_targets(api, repo_id)
        if wanted:
            _refuse_taken_tag(wanted, tags, commit, repo_id)
        on_commit = sorted(t for t, c in tags.items() if c == commit)
        tag = wanted or (on_commit[0] if on_commit else _next_version(tags))
        if tags.get(tag) == commit:
            return tag
        try:
            api.create_tag(repo_id, tag=tag, revision=commit, tag_message=f"loraflow {tag}")
            return tag
        except hf.HfHubHTTPError as exc:
            if getattr(exc.response, "status_code", None) != 409:
                raise
    raise errors.PublishError(f"could not tag {repo_id}@{commit}: tags kept changing. Fix: "
                              "re-run; publishing is idempotent.", repo_id=repo_id)


def _operations(files: dict[str, object]):
    from huggingface_hub import CommitOperationAdd

    return [CommitOperationAdd(path_in_repo=name,
                               path_or_fileobj=data if isinstance(data, bytes) else str(data))
            for name, data in sorted(files.items())]


# What an earlier attempt of this same task run committed, by (task run id, repo, adapter
# sha256): {"commit": sha} when the commit's answer came, {"parent": sha} (the head it was
# posted against) when the answer was lost. The step's retry finds such a commit by its
# lineage; this says whether the run made it (new_commit) or found it there.
_ATTEMPTS: dict[tuple, dict] = {}


def _attempt_key(repo_id: str, adapter_sha256: str) -> Optional[tuple]:
    from prefect.runtime import task_run

    run_id = task_run.id
    return None if run_id is None else (run_id, repo_id, adapter_sha256)


def _made_by_this_run(api, repo_id: str, head: str, key: Optional[tuple]) -> bool:
    """Whether the commit `head` (which holds this adapter) came from an earlier attempt of
    this task run: its recorded sha, or a commit whose parent is the head the unanswered
    attempt was posted against (parent_commit lets at most one commit land there)."""
    mine = _ATTEMPTS.get(key) if key is not None else None
    if mine is None:
        return False
    if "commit" not in mine:
        history = api.list_repo_commits(repo_id, revision=head)
        if not (len(history) > 1 and history[1].commit_id == mine["parent"]):
            return False
        _ATTEMPTS[key] = mine = {"commit": head}  # known now, for a retry after a failed tag
    return mine["commit"] == head


def planned_tag(api, repo_id: str, adapter_sha256: str, wanted: Optional[str]) -> str:
    """The tag a publication will carry, known before its files are rendered, so the card
    can pin its loading snippets to it: `wanted`; else the tag already on the head when the
    head holds this adapter (a re-publish renders the same bytes); else the next free vN.
    Should another publisher take that vN before this one tags, tagging refuses it (a
    PublishError) rather than renumber under a card that names it; a re-run picks the next.

    Args:
        api: an HfApi with the token.
        repo_id: the target repo (it exists).
        adapter_sha256: the adapter's sha256, as the lineage names it.
        wanted: publish.tag, or None.
    Returns:
        The tag name.
    """
    if wanted:
        return wanted
    tags = _tag_targets(api, repo_id)
    head = api.model_info(repo_id).sha
    current = _head_lineage(api, repo_id, head)
    if current and (current.get("adapter") or {}).get("sha256") == adapter_sha256:
        on_head = sorted(t for t, commit in tags.items() if commit == head)
        if on_head:
            return on_head[0]
    return _next_version(tags)


def push_bundle(api, repo_id: str, files: dict[str, object], adapter_sha256: str,
                wanted_tag: Optional[str], summary: str) -> PublishResult:
    """Commit `files` (path in repo → bytes or local path) atomically, unless the head
    already holds this adapter; then tag. `files` must include loraflow.json.

    Args:
        api: an HfApi with the token.
        repo_id: the target repo (it exists).
        files: path in repo → bytes or a local path.
        adapter_sha256: the adapter's sha256, as the lineage names it.
        wanted_tag: the tag to set, or None for the next free vN.
        summary: the commit message.
    Returns:
        The publication; new_commit is True when this run (this attempt, or an earlier
        attempt of the same task run whose answer was lost) made the commit.
    Raises:
        PublishError: the commit POST got an error answer, a tag is taken, or the head
            kept moving.
        HfHubHTTPError: any other Hub answer (run_publish translates it).
    """
    from huggingface_hub import errors as hf

    key = _attempt_key(repo_id, adapter_sha256)
    for _ in range(MAX_ATTEMPTS):
        head = api.model_info(repo_id).sha
        current = _head_lineage(api, repo_id, head)
        if current and (current.get("adapter") or {}).get("sha256") == adapter_sha256:
            new = _made_by_this_run(api, repo_id, head, key)
            tag = _tag(api, repo_id, head, wanted_tag)  # a crash before tagging heals here
            _ATTEMPTS.pop(key, None)
            return PublishResult(repo_id=repo_id, commit=head, tag=tag, url=repo_url(repo_id),
                                 new_commit=new)
        if wanted_tag:  # refuse before pushing anything
            _refuse_taken_tag(wanted_tag, _tag_targets(api, repo_id), None, repo_id)
        if key is not None:
            _ATTEMPTS[key] = {"parent": head}  # until an answer says otherwise
        try:
            info = api.create_commit(repo_id, operations=_operations(files), parent_commit=head,
                                     commit_message=summary,
                                     commit_description=f"adapter sha256 {adapter_sha256}")
        except hf.HfHubHTTPError as exc:
            _ATTEMPTS.pop(key, None)  # an answer came: nothing of ours to find later
            status = getattr(exc.response, "status_code", None)
            if status in (409, 412):  # another publisher moved the head: re-read, retry
                continue
            raise errors.PublishError(
                f"the commit to {repo_id} failed (HTTP {status}); it may have landed all the "
                "same, untagged. Fix: re-run the same command — training is cached and "
                "publishing reads the repo's head first, so the re-run lands at most one "
                "commit and tags it.", repo_id=repo_id) from None
        if key is not None:
            _ATTEMPTS[key] = {"commit": info.oid}  # a failed tag is retried: still ours
        tag = _tag(api, repo_id, info.oid, wanted_tag)
        _ATTEMPTS.pop(key, None)
        return PublishResult(repo_id=repo_id, commit=info.oid, tag=tag, url=repo_url(repo_id),
                             new_commit=True)
    raise errors.PublishError(f"{repo_id} kept moving during {MAX_ATTEMPTS} attempts to "
                              "publish. Fix: re-run when the other publishers are done.")


def ensure_repo(api, repo_id: str, private: bool) -> None:
    """Create the repo (private unless asked otherwise); refuse a public one if private."""
    api.create_repo(repo_id, private=private, exist_ok=True)
    if private and not api.model_info(repo_id).private:
        raise errors.PublishError(
            f"publish.private: {repo_id} already exists and is public; loraflow will not "
            "publish a private adapter into it. Fix: set publish.private to false, or choose "
            "another publish.repo_id.", repo_id=repo_id)
