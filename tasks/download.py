"""download_snapshot: the base model's files at a pinned commit, integrity checked.

Only safetensors weights, configs and tokenizer files (no pickle). Every file is
checked against the Hub's listing (sha256 for LFS files, git blob sha1 for small ones)
and the manifest records file → size/sha256, which keys the downstream caches.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from tasks import errors, settings
from tasks.caching import code_version, outputs_intact, sha256_file, stable_hash, write_manifest
from tasks.hub import hub_api
from tasks.preflight import SNAPSHOT_PATTERNS, ModelRef
from tasks.retry import TRANSIENT_RETRIES


class SnapshotManifest(BaseModel):
    """What was downloaded: repo@commit, where, and each file's size and sha256."""
    repo_id: str
    commit: str
    local_dir: str
    files: dict[str, dict]

    def file_hashes(self, predicate=lambda name: True) -> dict[str, str]:
        return {n: m["sha256"] for n, m in sorted(self.files.items()) if predicate(n)}


def download_key(model: ModelRef, **_) -> str:
    """repo@commit + the file patterns + this step's code."""
    return stable_hash("download", model.repo_id, model.commit, SNAPSHOT_PATTERNS,
                       code_version("tasks.download"))


def download_dir(model: ModelRef) -> Path:
    return settings.loraflow_home() / "downloads" / download_key(model)


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1()
    h.update(f"blob {path.stat().st_size}\0".encode())
    h.update(path.read_bytes())
    return h.hexdigest()


def _check_integrity(api, model: ModelRef, local_dir: Path) -> None:
    """Compare each downloaded file with the Hub's tree listing at the commit."""
    entries = {e.path: e for e in api.list_repo_tree(model.repo_id, revision=model.commit,
                                                    recursive=True)
               if getattr(e, "blob_id", None) is not None}
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = str(path.relative_to(local_dir))
        entry = entries.get(rel)
        if entry is None:
            continue
        if entry.lfs is not None:
            ok = sha256_file(path) == entry.lfs.sha256
        else:
            ok = _git_blob_sha1(path) == entry.blob_id
        if not ok:
            path.unlink()
            raise errors.DownloadIntegrityError(
                f"{model.repo_id}@{model.commit}: {rel} does not match the Hub's hash; "
                "the corrupt file was removed and a retry downloads it again.")


def run_download(model: ModelRef) -> SnapshotManifest:
    """snapshot_download pinned to the commit, into LORAFLOW_HOME/downloads/<key>/."""
    api = hub_api()
    target = download_dir(model)
    files_dir = target / "files"
    from huggingface_hub import errors as hf
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(model.repo_id, revision=model.commit, allow_patterns=SNAPSHOT_PATTERNS,
                          local_dir=files_dir, endpoint=api.endpoint, token=api.token)
        _check_integrity(api, model, files_dir)
    except (hf.HfHubHTTPError, OSError) as exc:
        raise errors.translate_hub_error(exc, repo_id=model.repo_id, revision=model.commit,
                                         endpoint=settings.hub_endpoint()) from None
    # local_dir downloads keep resume metadata under .cache/: not part of the snapshot.
    shutil.rmtree(files_dir / ".cache", ignore_errors=True)
    manifest = write_manifest(target, {"repo_id": model.repo_id, "commit": model.commit})
    files = {k.removeprefix("files/"): v for k, v in manifest["files"].items()}
    return SnapshotManifest(repo_id=model.repo_id, commit=model.commit,
                            local_dir=str(files_dir), files=files)


def download_is_cached_and_intact(model: ModelRef) -> bool:
    return outputs_intact(download_dir(model))


@task(name="download", **TRANSIENT_RETRIES)
def download_snapshot(model: ModelRef) -> SnapshotManifest:
    """Prefect task: run_download, cached by download_key."""
    return run_download(model)
