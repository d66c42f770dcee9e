"""Write API: create/delete repo, settings, validate-yaml, preupload, commit, tags and branches."""

from __future__ import annotations

import base64
import binascii
import json
import posixpath

from starlette.responses import JSONResponse

from localhub import card
from localhub.context import Ctx, header_safe
from localhub.errors import HubError
from localhub.store import Operation, RepoMeta, git_blob_sha1

# Files above this size, or with a binary extension, or whose sample holds a NUL byte, go through
# LFS. The Hub's own threshold is 10 MB; 1 MiB keeps tests that exercise the LFS path small.
LFS_THRESHOLD = 1024 * 1024
BINARY_EXTENSIONS = {
    ".7z", ".arrow", ".bin", ".ckpt", ".gguf", ".gz", ".h5", ".jpg", ".jpeg", ".msgpack", ".npy", ".npz",
    ".onnx", ".parquet", ".pkl", ".png", ".pt", ".pth", ".safetensors", ".tar", ".tflite", ".wav", ".zip",
}


def _gated_value(value) -> bool | str:
    if value in (False, None, "false", "False"):
        return False
    if value in ("auto", "manual"):
        return value
    raise HubError(400, f"gated must be false, 'auto' or 'manual', got {value!r}")


def _private_value(body: dict, default: bool | None) -> bool | None:
    if body.get("visibility") is not None:
        if body["visibility"] not in ("public", "private", "protected"):
            raise HubError(400, f"Invalid visibility {body['visibility']!r}")
        return body["visibility"] != "public"
    if body.get("private") is not None:
        return bool(body["private"])
    return default


def _repo_type(value) -> str:
    t = value or "model"
    if t not in ("model", "dataset"):
        raise HubError(400, f"localhub only hosts model and dataset repos, not {t!r}")
    return t


async def create_repo(ctx: Ctx) -> JSONResponse:
    """`POST /api/repos/create`: 200 {url}; 409 {url} when it exists; 403 outside your namespaces."""
    body = await ctx.json_body()
    repo_type = _repo_type(body.get("type"))
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise HubError(400, "name is required")
    namespace = body.get("organization") or (ctx.user.name if ctx.user else None)
    if namespace is None:
        raise HubError(401, "You must be authenticated to create a repo")
    user = ctx.require_write(namespace, what=f"create a {repo_type} under")
    meta = RepoMeta(repo_type=repo_type, repo_id=f"{namespace}/{name}", private=bool(_private_value(body, False)))
    url = ctx.repo_url(meta)
    if ctx.hub.store.get_repo(repo_type, meta.repo_id) is not None:
        return JSONResponse({"error": f"You already created this {repo_type} repo", "url": url}, status_code=409,
                            headers={"X-Error-Message": f"You already created this {repo_type} repo"})
    try:
        ctx.hub.store.create_repo(meta, author=user.name)
    except HubError as e:
        if e.status == 409:  # lost a race with a concurrent create
            return JSONResponse({"error": e.message, "url": url}, status_code=409,
                                headers={"X-Error-Message": header_safe(e.message)})
        raise
    return JSONResponse({"url": url, "name": meta.repo_id, "id": meta.repo_id})


async def delete_repo(ctx: Ctx) -> JSONResponse:
    """`DELETE /api/repos/delete` {name, organization, type}."""
    body = await ctx.json_body()
    repo_type = _repo_type(body.get("type"))
    namespace = body.get("organization") or (ctx.user.name if ctx.user else None)
    if namespace is None:
        raise HubError(401, "You must be authenticated to delete a repo")
    meta = ctx.repo(repo_type, f"{namespace}/{body.get('name')}")
    ctx.require_write(meta.namespace, what="delete repos of")
    ctx.hub.store.delete_repo(repo_type, meta.repo_id)
    return JSONResponse({})


async def update_settings(ctx: Ctx, repo_type: str, repo_id: str) -> JSONResponse:
    """`PUT /api/{type}s/{repo}/settings` {private?, visibility?, gated?}."""
    meta = ctx.repo(repo_type, repo_id)
    ctx.require_write(meta.namespace, what="change settings of repos of")
    body = await ctx.json_body()
    with ctx.hub.store.lock:
        meta = ctx.hub.store.get_repo(repo_type, repo_id)
        meta.private = bool(_private_value(body, meta.private))
        if "gated" in body:
            meta.gated = _gated_value(body["gated"])
        ctx.hub.store.update_repo(meta)
    return JSONResponse({"private": meta.private, "gated": meta.gated})


async def validate_yaml(ctx: Ctx) -> JSONResponse:
    """`POST /api/validate-yaml` {content, repoType}: always a JSON body; 400 {errors} when invalid."""
    body = await ctx.json_body()
    errors, warnings = card.validate(str(body.get("content", "")))
    if errors:
        return JSONResponse({"errors": errors}, status_code=400,
                            headers={"X-Error-Message": header_safe(errors[0]["message"])})
    return JSONResponse({"warnings": warnings} if warnings else {})


def _branch_name(rev: str) -> str:
    return rev[len("refs/heads/"):] if rev.startswith("refs/heads/") else rev


def _upload_mode(path: str, size: int, sample: bytes) -> str:
    ext = posixpath.splitext(path)[1].lower()
    if size > LFS_THRESHOLD or ext in BINARY_EXTENSIONS or b"\0" in sample:
        return "lfs"
    return "regular"


async def preupload(ctx: Ctx, repo_type: str, repo_id: str, rev: str) -> JSONResponse:
    """`POST /api/{type}s/{repo}/preupload/{rev}`: upload mode per file, and the remote `oid`.

    The client drops a file from the commit when the returned `oid` equals its local oid, which it
    computes as sha256 for "lfs" files and git blob sha1 for "regular" ones: so the oid we return
    must be of the same kind as the mode we answer, whatever way the remote file was stored.
    """
    meta = ctx.repo(repo_type, repo_id)
    ctx.require_write(meta.namespace)
    store = ctx.hub.store
    body = await ctx.json_body()
    head = store.resolve(meta, _branch_name(rev))
    tree = store.get_commit(meta, head).tree
    out = []
    for f in body.get("files", []):
        path = f.get("path")
        if not isinstance(path, str):
            raise HubError(400, "each file needs a path")
        try:
            sample = base64.b64decode(f.get("sample") or "")
        except (binascii.Error, ValueError):
            sample = b""
        mode = _upload_mode(path, int(f.get("size") or 0), sample)
        item = {"path": path, "uploadMode": mode, "shouldIgnore": False}
        remote = tree.get(path)
        if remote is not None:
            if mode == "lfs":
                item["oid"] = remote.sha256
            else:
                item["oid"] = remote.oid if not remote.lfs else git_blob_sha1(store.read_blob(remote.sha256))
        out.append(item)
    return JSONResponse({"files": out, "commitOid": head})


def _parse_commit_body(raw: bytes) -> tuple[dict, list[Operation]]:
    header: dict | None = None
    ops: list[Operation] = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key, value = item["key"], item["value"]
        except (ValueError, KeyError, TypeError) as e:
            raise HubError(400, f"Malformed NDJSON line {n}: {e}") from e
        if key == "header":
            if header is not None or ops:
                raise HubError(400, "The header line must come first, once")
            header = value
        elif header is None:
            raise HubError(400, "The first line must be the header")
        elif key == "file":
            enc = value.get("encoding", "base64")
            content = value.get("content", "")
            try:
                data = base64.b64decode(content, validate=True) if enc == "base64" else content.encode("utf-8")
            except (binascii.Error, ValueError) as e:
                raise HubError(400, f"Invalid base64 content for {value.get('path')!r}") from e
            ops.append(Operation("add", value["path"], content=data))
        elif key == "lfsFile":
            if value.get("algo", "sha256") != "sha256":
                raise HubError(400, f"Unsupported LFS algo {value.get('algo')!r}")
            ops.append(Operation("add", value["path"], lfs_sha256=value.get("oid"), lfs_size=value.get("size")))
        elif key == "deletedFile":
            ops.append(Operation("delete_file", value["path"]))
        elif key == "deletedFolder":
            ops.append(Operation("delete_folder", value["path"]))
        else:
            raise HubError(400, f"Unknown commit operation {key!r}")
    if header is None:
        raise HubError(400, "Empty commit payload")
    return header, ops


async def commit(ctx: Ctx, repo_type: str, repo_id: str, rev: str) -> JSONResponse:
    """`POST /api/{type}s/{repo}/commit/{rev}` (NDJSON): one commit or none; 412 on a stale parentCommit."""
    meta = ctx.repo(repo_type, repo_id)
    user = ctx.require_write(meta.namespace)
    if ctx.query_flag("create_pr"):
        raise HubError(400, "localhub does not support pull requests (create_pr)")
    header, ops = _parse_commit_body(await ctx.request.body())
    summary = str(header.get("summary") or "").strip()
    if not summary:
        raise HubError(400, "A commit summary is required")
    sha = ctx.hub.store.commit(
        meta, _branch_name(rev), ops, title=summary, description=str(header.get("description") or ""),
        author=user.name, parent_commit=header.get("parentCommit"),
    )
    return JSONResponse({
        "success": True,
        "commitOid": sha,
        "commitUrl": f"{ctx.repo_url(meta)}/commit/{sha}",
        "pullRequestUrl": None,
    })


async def create_tag(ctx: Ctx, repo_type: str, repo_id: str, rev: str) -> JSONResponse:
    """`POST /api/{type}s/{repo}/tag/{rev}` {tag, message?}: 409 when the tag exists."""
    meta = ctx.repo(repo_type, repo_id)
    ctx.require_write(meta.namespace)
    body = await ctx.json_body()
    tag = body.get("tag")
    if not isinstance(tag, str):
        raise HubError(400, "tag is required")
    sha = ctx.hub.store.resolve(meta, rev)
    ctx.hub.store.create_ref(meta, "tags", tag, sha)
    return JSONResponse({"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": sha})


async def delete_tag(ctx: Ctx, repo_type: str, repo_id: str, rev: str) -> JSONResponse:
    """`DELETE /api/{type}s/{repo}/tag/{tag}`."""
    meta = ctx.repo(repo_type, repo_id)
    ctx.require_write(meta.namespace)
    ctx.hub.store.delete_ref(meta, "tags", rev)
    return JSONResponse({})


async def create_branch(ctx: Ctx, repo_type: str, repo_id: str, rev: str) -> JSONResponse:
    """`POST /api/{type}s/{repo}/branch/{branch}` {startingPoint?}: 409 when the branch exists."""
    meta = ctx.repo(repo_type, repo_id)
    ctx.require_write(meta.namespace)
    body = await ctx.json_body()
    start = body.get("startingPoint") or "main"
    sha = ctx.hub.store.resolve(meta, start)
    ctx.hub.store.create_ref(meta, "branches", rev, sha)
    return JSONResponse({"name": rev, "ref": f"refs/heads/{rev}", "targetCommit": sha})


async def delete_branch(ctx: Ctx, repo_type: str, repo_id: str, rev: str) -> JSONResponse:
    """`DELETE /api/{type}s/{repo}/branch/{branch}`."""
    meta = ctx.repo(repo_type, repo_id)
    ctx.require_write(meta.namespace)
    ctx.hub.store.delete_ref(meta, "branches", rev)
    return JSONResponse({})
