"""download_snapshot: the base model's files at a pinned commit, integrity checked.

Only safetensors weights, configs and tokenizer files (no pickle). Every file is
checked against the Hub's listing (sha256 for LFS files, git blob sha1 for small ones)
and the manifest records file → size/sha256/mtime, which keys the downstream caches.

Never redo, never keep bad bytes: a re-run after an interrupted download keeps the
files that completed and fetches the rest (huggingface_hub 2.x downloads each file to
a process-unique temporary file, so a killed process leaves only orphan temporaries,
removed here); a file whose bytes changed on disk since it was listed is removed and
fetched again, and so is one that does not match the Hub's hash after the download.

A full disk is not retried (waiting does not free space): the download stops with a
DiskFullError naming the directory, the temporaries of the interrupted files are
removed (they hold the space and would never be finished), no manifest is written
(nothing looks complete) and the files that did complete stay for the next run.
"""
from __future__ import annotations

import errno
import hashlib
import shutil
from pathlib import Path
from typing import Optional

from prefect import task

from tasks import errors, settings
from tasks.cache.keys import cache_key, code_inputs
from tasks.cache.manifest import (
    changed_files,
    read_manifest,
    sha256_file,
    write_manifest,
)
from tasks.cache.policy import cache_options
from tasks.contracts import (
    ADAPTER_PATTERNS,
    SNAPSHOT_PATTERNS,
    AdapterRef,
    ModelRef,
    SnapshotManifest,
)
from tasks.hub import hub_api
from tasks.retry import TRANSIENT_RETRIES

FILES = "files"
HF_LOCAL_META = ".cache"  # huggingface_hub's local_dir bookkeeping (metadata, temp files)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def download_inputs(model: ModelRef) -> dict:
    """What keys a download: repo@commit, the file patterns, this step's code."""
    return {"repo_id": model.repo_id, "commit": model.commit,
            "patterns": list(SNAPSHOT_PATTERNS), "code": code_inputs("tasks.download")}


def adapter_download_inputs(adapter: AdapterRef) -> dict:
    """What keys an adapter's download: repo@commit, the adapter file patterns, code."""
    return {"repo_id": adapter.repo_id, "commit": adapter.commit,
            "patterns": list(ADAPTER_PATTERNS), "code": code_inputs("tasks.download")}


def download_key(model: ModelRef, adapter: Optional[AdapterRef] = None, **_) -> str:
    """The step's key: the base's download, and the adapter's when one is continued."""
    key = cache_key("download", download_inputs(model))
    if adapter is None:
        return key
    return cache_key("download", {"base": key, "adapter": adapter_download_inputs(adapter)})


def download_dir(model: ModelRef) -> Path:
    return settings.loraflow_home() / "downloads" / download_key(model)


def adapter_download_dir(adapter: AdapterRef) -> Path:
    return (settings.loraflow_home() / "downloads"
            / cache_key("download-adapter", adapter_download_inputs(adapter)))


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1()
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _hub_listing(api, model: ModelRef) -> dict:
    """path → tree entry (with .lfs.sha256 or .blob_id) at the pinned commit."""
    return {e.path: e for e in api.list_repo_tree(model.repo_id, revision=model.commit,
                                                  recursive=True)
            if getattr(e, "blob_id", None) is not None}


def _local_files(files_dir: Path) -> list[Path]:
    if not files_dir.is_dir():
        return []
    return sorted(p for p in files_dir.rglob("*") if p.is_file()
                  and p.relative_to(files_dir).parts[0] != HF_LOCAL_META)


def _forget(files_dir: Path, rel: str) -> None:
    """Remove a file and huggingface_hub's note that it was downloaded (else the
    client would trust the local copy and not fetch it again)."""
    (files_dir / rel).unlink(missing_ok=True)
    (files_dir / HF_LOCAL_META / "huggingface" / "download" / f"{rel}.metadata").unlink(
        missing_ok=True)


def _drop_orphan_temporaries(files_dir: Path) -> None:
    # Only one process downloads into this directory at a time (the step holds the
    # key's lock), so any temporary file here was left by a process that died.
    meta = files_dir / HF_LOCAL_META
    if meta.is_dir():
        for p in meta.rglob("*.incomplete"):
            p.unlink(missing_ok=True)


def _verify(files_dir: Path, listing: dict, trusted: dict[str, str]) -> tuple[dict, list]:
    """sha256 of every local file (trusted ones not re-read) and those that do not match
    the Hub's listing (or are not in it: stray files would change the downstream keys)."""
    hashes, bad = {}, []
    for path in _local_files(files_dir):
        rel = path.relative_to(files_dir).as_posix()
        digest = trusted.get(rel) or sha256_file(path)
        hashes[rel] = digest
        entry = listing.get(rel)
        if rel in trusted and entry is not None:
            continue
        ok = entry is not None and (digest == entry.lfs.sha256 if entry.lfs is not None
                                    else _git_blob_sha1(path) == entry.blob_id)
        if not ok:
            bad.append(rel)
    return hashes, bad


def _result(target: Path, manifest: dict, model) -> SnapshotManifest:
    prefix = f"{FILES}/"
    files = {k.removeprefix(prefix): {"size": v["size"], "sha256": v["sha256"]}
             for k, v in manifest["files"].items() if k.startswith(prefix)}
    return SnapshotManifest(repo_id=model.repo_id, commit=model.commit,
                            local_dir=str(target / FILES), files=files)


def _no_space(exc: BaseException) -> Optional[OSError]:
    """The ENOSPC/EDQUOT OSError in `exc`'s chain (huggingface_hub may wrap it), else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _disk_full(files_dir: Path, model, cause: OSError) -> errors.DiskFullError:
    """Free what the interrupted files held and say where the space ran out."""
    _drop_orphan_temporaries(files_dir)
    try:
        free = f"{shutil.disk_usage(files_dir).free / 2**20:.1f} MiB free now"
    except OSError:
        free = "free space unknown"
    return errors.DiskFullError(
        f"download: no space left on the disk holding {files_dir} while downloading "
        f"{model.repo_id}@{model.commit} ({cause.strerror}; {free}). Fix: free space on that "
        "disk, or set LORAFLOW_HOME to a directory on a larger disk, then run again: the "
        "files that completed are kept and only the rest is downloaded.",
        directory=str(files_dir))


def run_download(model: ModelRef, adapter: Optional[AdapterRef] = None) -> SnapshotManifest:
    """snapshot_download pinned to the commit, into LORAFLOW_HOME/downloads/<key>/files;
    with `adapter`, that adapter repo's files too (manifest.adapter)."""
    snapshot = _download(model, download_dir(model), SNAPSHOT_PATTERNS, download_inputs(model))
    if adapter is not None:
        snapshot.adapter = _download(adapter, adapter_download_dir(adapter), ADAPTER_PATTERNS,
                                     adapter_download_inputs(adapter))
    return snapshot


def _download(model, target: Path, patterns: list[str], inputs: dict) -> SnapshotManifest:
    """One repo (a ModelRef or AdapterRef: repo_id + commit) into target/files."""
    files_dir = target / FILES
    old = read_manifest(target)
    changed = changed_files(target, old) if old is not None else None
    if changed == []:
        # Complete and unchanged (the cache record was lost, e.g. another result
        # storage): adopt it instead of downloading again.
        return _result(target, old, model)
    # What an earlier attempt left and is still as it recorded: not re-read.
    trusted = {k.removeprefix(f"{FILES}/"): v["sha256"] for k, v in (old or {"files": {}})
               ["files"].items() if k not in (changed or [])}
    api = hub_api()
    from huggingface_hub import errors as hf
    from huggingface_hub import snapshot_download

    try:
        listing = _hub_listing(api, model)
        for rel in changed or []:
            _forget(files_dir, rel.removeprefix(f"{FILES}/"))
        _drop_orphan_temporaries(files_dir)
        # Files present without a manifest entry (an interrupted first download, or
        # an older layout): checked against the Hub before they are kept.
        hashes, bad = _verify(files_dir, listing, trusted)
        for rel in bad:
            _forget(files_dir, rel)
        trusted.update((rel, h) for rel, h in hashes.items() if rel not in bad)
        for attempt in (1, 2):
            snapshot_download(model.repo_id, revision=model.commit,
                              allow_patterns=patterns, local_dir=files_dir,
                              endpoint=api.endpoint, token=api.token)
            hashes, bad = _verify(files_dir, listing, trusted)
            if not bad:
                break
            for rel in bad:  # corrupted in transit: fetch once more, then give up
                _forget(files_dir, rel)
                trusted.pop(rel, None)
        else:
            raise errors.DownloadIntegrityError(
                f"{model.repo_id}@{model.commit}: {', '.join(bad)} did not match the Hub's "
                "hash twice; the corrupt files were removed and a retry downloads them again.")
    except (hf.HfHubHTTPError, OSError) as exc:
        if (full := _no_space(exc)) is not None:
            raise _disk_full(files_dir, model, full) from None
        raise errors.translate_hub_error(
            exc, repo_id=model.repo_id, revision=model.commit, endpoint=settings.hub_endpoint(),
            doing=f"downloading {model.repo_id}@{model.commit}",
            fix="run the same command again once the Hub answers: the files that completed "
                "are kept and only the rest is downloaded") from None
    try:
        manifest = write_manifest(
            target, {"step": "download", "repo_id": model.repo_id, "commit": model.commit,
                     "inputs": inputs},
            include=lambda rel: rel.startswith(f"{FILES}/")
            and not rel.startswith(f"{FILES}/{HF_LOCAL_META}/"),
            known={f"{FILES}/{k}": v for k, v in hashes.items()})
    except OSError as exc:
        if (full := _no_space(exc)) is None:
            raise
        for tmp in target.glob("manifest.json.*.tmp"):  # the atomic write's half-written file
            tmp.unlink(missing_ok=True)
        raise _disk_full(files_dir, model, full) from None
    return _result(target, manifest, model)


def download_is_cached_and_intact(model: ModelRef, adapter: Optional[AdapterRef] = None,
                                  **_) -> bool:
    return changed_files(download_dir(model)) == [] and (
        adapter is None or changed_files(adapter_download_dir(adapter)) == [])


@task(name="download", **cache_options(download_key, download_is_cached_and_intact),
      **TRANSIENT_RETRIES)
def download_snapshot(model: ModelRef, adapter: Optional[AdapterRef] = None) -> SnapshotManifest:
    """Prefect task: run_download, cached by download_key."""
    return run_download(model, adapter)
