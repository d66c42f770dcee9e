"""Repositories, commits and refs on disk.

Layout under the root directory::

    blobs/<sha256[:2]>/<sha256>                 file contents, content-addressed, shared by all repos
    repos/<type>s/<namespace>/<name>/repo.json  flags (private, gated), creation date
    repos/<type>s/<namespace>/<name>/refs.json  {"branches": {name: sha}, "tags": {name: sha}}
    repos/<type>s/<namespace>/<name>/commits/<sha>.json
    tmp/                                        partial uploads, renamed into blobs/ when complete

Every commit stores the full flat file tree (path -> sha256, size, lfs flag, git oid), so reading a
revision never walks history. A commit sha is the sha1 of the canonical JSON of its parent, tree,
message and date: the same content committed at the same date gives the same sha on any machine,
which is what makes seeding reproducible.

All mutations go through one lock: the server is a single process and commits are small, so
serialising them is the simplest way to make "check parent, then move the branch" atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from localhub.errors import HubError

REPO_TYPES = ("model", "dataset")
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Namespaces and repo names as the Hub accepts them (letters, digits, '-', '_', '.'; no '--' or '..').
NAME_RE = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

# What the Hub writes into a new repo: keeps the initial commit realistic, and a repo is never
# without a head commit (the client asserts that repo info has a `sha`).
DEFAULT_GITATTRIBUTES = (
    "*.7z filter=lfs diff=lfs merge=lfs -text\n"
    "*.arrow filter=lfs diff=lfs merge=lfs -text\n"
    "*.bin filter=lfs diff=lfs merge=lfs -text\n"
    "*.ckpt filter=lfs diff=lfs merge=lfs -text\n"
    "*.gguf filter=lfs diff=lfs merge=lfs -text\n"
    "*.h5 filter=lfs diff=lfs merge=lfs -text\n"
    "*.npy filter=lfs diff=lfs merge=lfs -text\n"
    "*.npz filter=lfs diff=lfs merge=lfs -text\n"
    "*.onnx filter=lfs diff=lfs merge=lfs -text\n"
    "*.parquet filter=lfs diff=lfs merge=lfs -text\n"
    "*.pt filter=lfs diff=lfs merge=lfs -text\n"
    "*.pth filter=lfs diff=lfs merge=lfs -text\n"
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    "*.tar filter=lfs diff=lfs merge=lfs -text\n"
    "*.zip filter=lfs diff=lfs merge=lfs -text\n"
).encode()


# --------------------------------------------------------------------------- hashing helpers


def canonical_json(obj) -> bytes:
    """JSON with sorted keys and no whitespace: the byte form that commit shas are computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def git_blob_sha1(data: bytes) -> str:
    """Git's object id of a blob (what the Hub reports as `oid` / `blobId` of a regular file)."""
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that stands in the git tree for an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def utc_now_iso() -> str:
    """Current UTC time, second precision, in the ISO form the Hub uses (`2024-01-01T00:00:00.000Z`)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def atomic_write(path: Path, data: bytes) -> None:
    # Write-then-rename so a reader never sees a half-written ref or commit.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# --------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit's tree."""

    sha256: str
    size: int
    lfs: bool
    oid: str  # git blob sha1 of the content, or of the LFS pointer for LFS files

    @property
    def pointer_size(self) -> int:
        """Size of the LFS pointer file (the Hub reports it as `pointerSize`)."""
        return len(lfs_pointer(self.sha256, self.size))

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "size": self.size, "lfs": self.lfs, "oid": self.oid}

    @classmethod
    def from_json(cls, d: dict) -> "FileEntry":
        return cls(sha256=d["sha256"], size=d["size"], lfs=d["lfs"], oid=d["oid"])


@dataclass(frozen=True)
class Commit:
    """An immutable commit: full flat tree plus metadata."""

    sha: str
    parent: str | None
    tree: dict[str, FileEntry]
    title: str
    description: str
    date: str
    author: str

    @property
    def message(self) -> str:
        return self.title + ("\n\n" + self.description if self.description else "")


@dataclass
class RepoMeta:
    """Flags and identity of a repository."""

    repo_type: str
    repo_id: str
    private: bool = False
    gated: bool | str = False
    created_at: str = field(default_factory=utc_now_iso)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]

    def to_json(self) -> dict:
        return {
            "type": self.repo_type,
            "id": self.repo_id,
            "private": self.private,
            "gated": self.gated,
            "createdAt": self.created_at,
        }


@dataclass(frozen=True)
class Operation:
    """One line of a commit: add (regular or LFS), delete a file, or delete a folder."""

    kind: str  # "add" | "delete_file" | "delete_folder"
    path: str
    content: bytes | None = None  # for regular adds
    lfs_sha256: str | None = None  # for LFS adds
    lfs_size: int | None = None


def commit_sha(parent: str | None, tree: dict[str, FileEntry], message: str, date: str) -> str:
    """Deterministic commit id: sha1 over canonical JSON of parent, tree, message and date."""
    payload = {
        "parent": parent,
        "tree": {p: {"sha256": e.sha256, "size": e.size, "lfs": e.lfs} for p, e in tree.items()},
        "message": message,
        "date": date,
    }
    return hashlib.sha1(canonical_json(payload)).hexdigest()


def make_entry(data: bytes, lfs: bool) -> FileEntry:
    """The tree entry for these bytes (pure: nothing is stored)."""
    sha = hashlib.sha256(data).hexdigest()
    oid = git_blob_sha1(lfs_pointer(sha, len(data))) if lfs else git_blob_sha1(data)
    return FileEntry(sha256=sha, size=len(data), lfs=lfs, oid=oid)


def validate_repo_path(path: str) -> str:
    """Reject paths that could escape the tree or that git would refuse."""
    if not path or path.startswith("/") or path.endswith("/") or "\\" in path or "\0" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


# --------------------------------------------------------------------------- the store


class BlobWriter:
    """Streams an upload into tmp/, then moves it into blobs/ if its sha256 and size are as announced."""

    def __init__(self, store: "Store"):
        self._store = store
        fd, self._tmp = tempfile.mkstemp(dir=store.root / "tmp", prefix="upload-")
        self._f = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._size = 0

    def write(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self._size += len(chunk)
        self._f.write(chunk)

    def commit(self, expected_sha256: str, expected_size: int) -> None:
        """Keep the content (raises HubError(400) on a mismatch, keeping nothing)."""
        self._f.close()
        got = self._hash.hexdigest()
        if self._size != expected_size or got != expected_sha256:
            raise HubError(400, f"Uploaded content does not match: got sha256 {got} size {self._size}, "
                                f"expected {expected_sha256} size {expected_size}")
        dest = self._store.blob_path(expected_sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp, dest)

    def close(self) -> None:
        """Drop the temporary file if it was not committed."""
        self._f.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)


class Store:
    """Repos, commits, refs and blobs under one root directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.lock = threading.RLock()
        for sub in ("blobs", "repos", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ---- blobs

    def blob_path(self, sha256: str) -> Path:
        """Where the content with this sha256 lives (whether or not it exists)."""
        return self.root / "blobs" / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        """Whether the blob is stored (and has this size, if given)."""
        p = self.blob_path(sha256)
        try:
            return size is None or p.stat().st_size == size
        except FileNotFoundError:
            return False

    def put_blob(self, data: bytes) -> str:
        """Store bytes, return their sha256."""
        sha = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha, len(data)):
            atomic_write(self.blob_path(sha), data)
        return sha

    def blob_writer(self) -> "BlobWriter":
        """A writer for streamed content (LFS uploads): hashes while writing, checks on commit."""
        return BlobWriter(self)

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    # ---- repos

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        ns, name = repo_id.split("/", 1)
        return self.root / "repos" / f"{repo_type}s" / ns / name

    def get_repo(self, repo_type: str, repo_id: str) -> RepoMeta | None:
        """Repo flags, or None when the repo does not exist."""
        if repo_type not in REPO_TYPES or repo_id.count("/") != 1:
            return None
        if not all(NAME_RE.match(part) for part in repo_id.split("/")):
            return None  # also keeps '..' and friends from reaching the filesystem
        p = self.repo_dir(repo_type, repo_id) / "repo.json"
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            return None
        return RepoMeta(repo_type=d["type"], repo_id=d["id"], private=d["private"], gated=d["gated"],
                        created_at=d["createdAt"])

    def list_repos(self) -> Iterator[RepoMeta]:
        """All repos, sorted by type then id."""
        for repo_type in REPO_TYPES:
            base = self.root / "repos" / f"{repo_type}s"
            for p in sorted(base.glob("*/*/repo.json")):
                meta = self.get_repo(repo_type, f"{p.parent.parent.name}/{p.parent.name}")
                if meta is not None:
                    yield meta

    def create_repo(self, meta: RepoMeta, author: str, date: str | None = None) -> str:
        """Create a repo with an initial commit holding .gitattributes; return that commit's sha.

        Raises HubError(409) when it exists.
        """
        ns, name = meta.repo_id.split("/", 1)
        if not NAME_RE.match(ns) or not NAME_RE.match(name):
            raise HubError(400, f"Invalid repo name: {meta.repo_id!r}")
        with self.lock:
            if self.get_repo(meta.repo_type, meta.repo_id) is not None:
                raise HubError(409, f"You already created this {meta.repo_type} repo")
            d = self.repo_dir(meta.repo_type, meta.repo_id)
            (d / "commits").mkdir(parents=True, exist_ok=True)
            date = date or meta.created_at
            tree = {".gitattributes": self._entry_for_bytes(DEFAULT_GITATTRIBUTES, lfs=False)}
            sha = self._write_commit(meta, None, tree, "initial commit", "", date, author)
            self._write_refs(meta, {"branches": {"main": sha}, "tags": {}})
            # repo.json last: a repo is visible only once it is complete.
            atomic_write(d / "repo.json", json.dumps(meta.to_json(), indent=2).encode())
            return sha

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        """Remove a repo (blobs stay: they may be shared)."""
        with self.lock:
            if self.get_repo(repo_type, repo_id) is None:
                raise HubError(404, f"Repository {repo_id} not found", code="RepoNotFound")
            d = self.repo_dir(repo_type, repo_id)
            trash = self.root / "tmp" / f"deleted-{os.getpid()}-{threading.get_ident()}-{d.name}"
            os.replace(d, trash)  # atomic disappearance, then clean up
            shutil.rmtree(trash, ignore_errors=True)

    def update_repo(self, meta: RepoMeta) -> None:
        """Persist changed flags (private, gated)."""
        with self.lock:
            atomic_write(self.repo_dir(meta.repo_type, meta.repo_id) / "repo.json",
                          json.dumps(meta.to_json(), indent=2).encode())

    # ---- refs

    def refs(self, meta: RepoMeta) -> dict:
        """{"branches": {name: sha}, "tags": {name: sha}}."""
        return json.loads((self.repo_dir(meta.repo_type, meta.repo_id) / "refs.json").read_text())

    def _write_refs(self, meta: RepoMeta, refs: dict) -> None:
        atomic_write(self.repo_dir(meta.repo_type, meta.repo_id) / "refs.json",
                      json.dumps(refs, indent=2, sort_keys=True).encode())

    def resolve(self, meta: RepoMeta, revision: str) -> str:
        """Branch, tag, `refs/heads/x`, `refs/tags/x` or a full commit sha -> commit sha.

        Raises HubError(404, RevisionNotFound) otherwise.
        """
        refs = self.refs(meta)
        if revision in refs["branches"]:
            return refs["branches"][revision]
        if revision in refs["tags"]:
            return refs["tags"][revision]
        if revision.startswith("refs/heads/") and revision[11:] in refs["branches"]:
            return refs["branches"][revision[11:]]
        if revision.startswith("refs/tags/") and revision[10:] in refs["tags"]:
            return refs["tags"][revision[10:]]
        if SHA1_RE.match(revision) and self._commit_path(meta, revision).exists():
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def create_ref(self, meta: RepoMeta, kind: str, name: str, target_sha: str) -> None:
        """Create a branch or tag ("branches" / "tags"); 409 when it exists."""
        if not name or name.startswith("/") or name.endswith("/") or ".." in name or SHA1_RE.match(name):
            raise HubError(400, f"Invalid {'tag' if kind == 'tags' else 'branch'} name: {name!r}")
        with self.lock:
            refs = self.refs(meta)
            if name in refs[kind]:
                what = "Tag" if kind == "tags" else "Branch"
                raise HubError(409, f"{what} {name} already exists")
            refs[kind][name] = target_sha
            self._write_refs(meta, refs)

    def delete_ref(self, meta: RepoMeta, kind: str, name: str) -> None:
        """Delete a branch or tag; 404 when it does not exist, 403 for the main branch."""
        with self.lock:
            refs = self.refs(meta)
            if name not in refs[kind]:
                what = "Tag" if kind == "tags" else "Branch"
                raise HubError(404, f"{what} {name} not found", code="RevisionNotFound")
            if kind == "branches" and name == "main":
                raise HubError(403, "Cannot delete the default branch")
            del refs[kind][name]
            self._write_refs(meta, refs)

    # ---- commits

    def _commit_path(self, meta: RepoMeta, sha: str) -> Path:
        return self.repo_dir(meta.repo_type, meta.repo_id) / "commits" / f"{sha}.json"

    def has_commit(self, meta: RepoMeta, sha: str) -> bool:
        return self._commit_path(meta, sha).exists()

    def get_commit(self, meta: RepoMeta, sha: str) -> Commit:
        """Load a commit by sha (it must exist)."""
        d = json.loads(self._commit_path(meta, sha).read_text())
        return Commit(sha=sha, parent=d["parent"], tree={p: FileEntry.from_json(e) for p, e in d["tree"].items()},
                      title=d["title"], description=d["description"], date=d["date"], author=d["author"])

    def history(self, meta: RepoMeta, sha: str) -> Iterator[Commit]:
        """Commits from `sha` back to the root, newest first."""
        cur: str | None = sha
        while cur is not None:
            c = self.get_commit(meta, cur)
            yield c
            cur = c.parent

    def _entry_for_bytes(self, data: bytes, lfs: bool) -> FileEntry:
        self.put_blob(data)
        return make_entry(data, lfs)

    def _write_commit(self, meta: RepoMeta, parent: str | None, tree: dict[str, FileEntry], title: str,
                      description: str, date: str, author: str) -> str:
        message = title + ("\n\n" + description if description else "")
        sha = commit_sha(parent, tree, message, date)
        path = self._commit_path(meta, sha)
        if not path.exists():
            body = {
                "parent": parent,
                "tree": {p: tree[p].to_json() for p in sorted(tree)},
                "title": title,
                "description": description,
                "date": date,
                "author": author,
            }
            atomic_write(path, json.dumps(body, indent=1, sort_keys=True).encode())
        return sha

    def commit(
        self,
        meta: RepoMeta,
        branch: str,
        operations: list[Operation],
        title: str,
        description: str = "",
        author: str = "",
        parent_commit: str | None = None,
        date: str | None = None,
    ) -> str:
        """Apply operations on top of `branch` as one commit and move the branch; return the new sha.

        All-or-nothing: every operation is validated before anything is written (blobs of regular files
        are content-addressed, so storing them early is harmless). `parent_commit`, when given, must be the
        branch head (412 otherwise), so two writers cannot silently overwrite each other.
        """
        with self.lock:
            refs = self.refs(meta)
            if branch not in refs["branches"]:
                if branch in refs["tags"] or SHA1_RE.match(branch):
                    raise HubError(400, f"Can only commit to a branch, not to {branch!r}")
                raise HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            head = refs["branches"][branch]
            if parent_commit is not None and parent_commit != head:
                raise HubError(
                    412,
                    f"A commit has happened since {parent_commit}: the head of branch {branch!r} is now {head}. "
                    "Refresh and retry.",
                )
            tree = dict(self.get_commit(meta, head).tree)
            for op in operations:
                if op.kind == "add":
                    path = validate_repo_path(op.path)
                    if op.content is not None:
                        tree[path] = self._entry_for_bytes(op.content, lfs=False)
                    else:
                        sha, size = op.lfs_sha256, op.lfs_size
                        if sha is None or not SHA256_RE.match(sha):
                            raise HubError(400, f"Invalid LFS oid for {path!r}")
                        if not self.has_blob(sha):
                            raise HubError(422, f"LFS object {sha} for {path!r} was not uploaded")
                        actual = self.blob_path(sha).stat().st_size
                        if size is not None and size != actual:
                            raise HubError(422, f"LFS object {sha} has size {actual}, not {size}")
                        oid = git_blob_sha1(lfs_pointer(sha, actual))
                        tree[path] = FileEntry(sha256=sha, size=actual, lfs=True, oid=oid)
                elif op.kind == "delete_file":
                    path = op.path
                    if path not in tree:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                    del tree[path]
                elif op.kind == "delete_folder":
                    prefix = op.path.rstrip("/") + "/"
                    doomed = [p for p in tree if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {op.path}", code="EntryNotFound")
                    for p in doomed:
                        del tree[p]
                else:  # pragma: no cover - the parser only builds the kinds above
                    raise HubError(400, f"Unknown operation {op.kind!r}")
            for p in tree:  # a path cannot be both a file and a folder
                parts = p.split("/")
                for i in range(1, len(parts)):
                    if "/".join(parts[:i]) in tree:
                        raise HubError(400, f"{'/'.join(parts[:i])!r} is a file, cannot create {p!r}")
            sha = self._write_commit(meta, head, tree, title, description, date or utc_now_iso(), author)
            refs["branches"][branch] = sha
            self._write_refs(meta, refs)
            return sha


# --------------------------------------------------------------------------- tree views


def tree_dirs(tree: dict[str, FileEntry]) -> set[str]:
    """All directory paths implied by the file paths of a tree."""
    dirs = set()
    for p in tree:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return dirs


def dir_oid(tree: dict[str, FileEntry], directory: str) -> str:
    """A stable id for a directory's content (stands in for git's tree id)."""
    prefix = directory + "/"
    content = sorted((p[len(prefix):], e.oid) for p, e in tree.items() if p.startswith(prefix))
    return hashlib.sha1(canonical_json(content)).hexdigest()
