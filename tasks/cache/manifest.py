"""Manifests: each cached step's output directory lists its files (size, sha256,
mtime_ns); a hit is checked against that list."""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

MANIFEST = "manifest.json"
STAT_CACHE = ".manifest-stat.json"  # re-verified stats of files touched but unchanged


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)  # appears whole or not at all


def write_manifest(directory: Path, extra: dict | None = None,
                   include: Callable[[str], bool] = lambda rel: True,
                   known: dict[str, str] | None = None) -> dict:
    """List the files under `directory` (those `include` accepts, by relative path)
    with size, sha256 and mtime_ns in manifest.json; `known` maps relative paths to
    sha256s already computed (so a file is hashed once)."""
    files = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and p.name not in (MANIFEST, STAT_CACHE) and include(rel):
            st = p.stat()
            digest = (known or {}).get(rel) or sha256_file(p)
            files[rel] = {"size": st.st_size, "sha256": digest, "mtime_ns": st.st_mtime_ns}
    data = {"files": files, **(extra or {})}
    (directory / STAT_CACHE).unlink(missing_ok=True)
    _atomic_write_json(directory / MANIFEST, data)
    return data


def read_manifest(directory: Path) -> Optional[dict]:
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def changed_files(directory: Path, manifest: Optional[dict] = None) -> Optional[list[str]]:
    """Files the manifest lists that are gone or whose bytes changed; None: no manifest.

    Cheap: a file whose size and mtime_ns are as recorded is trusted; only a file whose
    stat changed is hashed again (and, if its bytes are unchanged, its new stat is
    remembered beside the manifest so the next check is cheap again).
    """
    manifest = manifest or read_manifest(directory)
    if manifest is None:
        return None
    try:
        reverified = json.loads((directory / STAT_CACHE).read_text())
    except (OSError, ValueError):
        reverified = {}
    changed, learned = [], {}
    for rel, meta in manifest["files"].items():
        p = directory / rel
        try:
            st = p.stat()
        except OSError:
            changed.append(rel)
            continue
        if st.st_size != meta["size"]:
            changed.append(rel)
            continue
        if st.st_mtime_ns in (meta.get("mtime_ns"), reverified.get(rel)):
            continue
        if sha256_file(p) == meta["sha256"]:
            learned[rel] = st.st_mtime_ns
        else:
            changed.append(rel)
    if learned and not changed:
        try:
            _atomic_write_json(directory / STAT_CACHE, {**reverified, **learned})
        except OSError:  # a read-only cache still answers correctly, only slower
            pass
    return changed


def outputs_intact(directory: Path) -> bool:
    """True when `directory` has a manifest and every file it lists is unchanged."""
    changed = changed_files(Path(directory))
    return changed == []


def dir_size(directory: Path) -> int:
    total = 0
    for root, _, names in os.walk(directory):
        for n in names:
            try:
                total += os.lstat(os.path.join(root, n)).st_size
            except OSError:
                pass
    return total
