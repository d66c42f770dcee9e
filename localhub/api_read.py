"""Read-only API: whoami, repo info, auth-check, tree, paths-info, refs, commits."""

from __future__ import annotations

import hashlib
import json

from starlette.responses import JSONResponse

from localhub.card import card_data
from localhub.context import Ctx
from localhub.errors import HubError
from localhub.store import Commit, FileEntry, RepoMeta, Store, dir_oid, tree_dirs

# Repo info keys the client may name in `expand`; anything else requested is ignored.
_EXPANDABLE = {
    "author", "cardData", "createdAt", "disabled", "downloads", "downloadsAllTime", "gated", "lastModified",
    "library_name", "likes", "pipeline_tag", "private", "sha", "siblings", "tags", "usedStorage",
}


async def whoami(ctx: Ctx) -> JSONResponse:
    """`GET /api/whoami-v2`: the token's user, orgs and role; 401 without a valid token."""
    if ctx.user is None:
        raise HubError(401, "Invalid credentials in Authorization header")
    u = ctx.user
    return JSONResponse({
        "type": "user",
        "id": hashlib.sha1(u.name.encode()).hexdigest()[:24],
        "name": u.name,
        "fullname": u.name,
        "email": None,
        "emailVerified": False,
        "canPay": False,
        "isPro": False,
        "periodEnd": None,
        "avatarUrl": "",
        "orgs": [{"type": "org", "name": o, "fullname": o, "roleInOrg": "write" if u.role == "write" else "read",
                  "isEnterprise": False} for o in u.orgs],
        "auth": {"type": "access_token", "accessToken": {"displayName": "localhub", "role": u.role}},
    })


def _readme(store: Store, commit: Commit) -> bytes | None:
    e = commit.tree.get("README.md")
    return store.read_blob(e.sha256) if e is not None else None


def _tags(meta: RepoMeta, card: dict | None) -> list[str]:
    card = card or {}
    tags: list[str] = []
    raw = card.get("tags") or []
    if isinstance(raw, str):
        raw = [raw]
    candidates = [str(t) for t in raw if isinstance(t, (str, int, float))]
    if meta.repo_type == "model":
        candidates += [str(card[k]) for k in ("library_name", "pipeline_tag") if isinstance(card.get(k), str)]
    if isinstance(card.get("license"), str):
        candidates.append(f"license:{card['license']}")
    for t in candidates:
        if t not in tags:
            tags.append(t)
    return tags


def _info(store: Store, meta: RepoMeta, sha: str) -> dict:
    """The repo info body of `meta` at commit `sha` (all fields; callers filter by `expand`)."""
    repo_type, repo_id = meta.repo_type, meta.repo_id
    commit = store.get_commit(meta, sha)
    # JSON round trip: YAML may hold dates and other values JSON cannot carry as-is.
    card = card_data(_readme(store, commit))
    card = json.loads(json.dumps(card, default=str)) if card is not None else None
    siblings = []
    for path in sorted(commit.tree):
        e = commit.tree[path]
        s: dict = {"rfilename": path, "size": e.size, "blobId": e.oid}
        if e.lfs:
            s["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": e.pointer_size}
        siblings.append(s)
    body: dict = {
        "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
        "id": repo_id,
        "author": meta.namespace,
        "sha": sha,
        "lastModified": commit.date,
        "createdAt": meta.created_at,
        "private": meta.private,
        "gated": meta.gated,
        "disabled": False,
        "downloads": 0,
        "downloadsAllTime": 0,
        "likes": 0,
        "tags": _tags(meta, card),
        "siblings": siblings,
        "usedStorage": sum(e.size for e in commit.tree.values()),
    }
    if card is not None:
        body["cardData"] = card
    if repo_type == "model":
        for k in ("library_name", "pipeline_tag"):
            if isinstance((card or {}).get(k), str):
                body[k] = card[k]
    return body


def _expand(ctx: Ctx, body: dict) -> dict:
    expand = ctx.query_list("expand")
    if not expand:
        return body
    keep = {"_id", "id"} | (set(expand) & _EXPANDABLE)
    return {k: v for k, v in body.items() if k in keep}


async def repo_info(ctx: Ctx, repo_type: str, repo_id: str, rev: str | None = None) -> JSONResponse:
    """`GET /api/{models|datasets}/{repo}[/revision/{rev}]`: metadata, head sha, siblings with sizes."""
    meta = ctx.repo(repo_type, repo_id)
    return JSONResponse(_expand(ctx, _info(ctx.hub.store, meta, ctx.hub.store.resolve(meta, rev or "main"))))


async def list_repos(ctx: Ctx, kind: str) -> JSONResponse:
    """`GET /api/{models|datasets}?author=&search=&limit=`: repos the caller can see, one page.

    Siblings and card data only with `full` / `cardData`, as on the Hub; other filters are ignored.
    """
    repo_type = "model" if kind == "models" else "dataset"
    qp = ctx.request.query_params
    author, search = qp.get("author"), (qp.get("search") or "").lower()
    limit = int(qp["limit"]) if qp.get("limit", "").isdigit() else None
    store = ctx.hub.store
    out = []
    for meta in store.list_repos():
        if meta.repo_type != repo_type or not ctx.hub.users.can_read(ctx.user, meta):
            continue
        if (author and meta.namespace != author) or (search and search not in meta.repo_id.lower()):
            continue
        body = _info(store, meta, store.resolve(meta, "main"))
        if not ctx.query_flag("full"):
            body.pop("siblings")
        if not (ctx.query_flag("full") or ctx.query_flag("cardData")):
            body.pop("cardData", None)
        out.append(_expand(ctx, body))
        if limit is not None and len(out) >= limit:
            break
    return JSONResponse(out)


async def auth_check(ctx: Ctx, repo_type: str, repo_id: str, write: bool = False) -> JSONResponse:
    """`GET /api/{type}s/{repo}/auth-check[/write]`: 200 when the caller may download (or write)."""
    meta = ctx.repo(repo_type, repo_id)
    if write:
        ctx.require_write(meta.namespace)
    else:
        ctx.require_gated_access(meta)
    return JSONResponse({})


# --------------------------------------------------------------------------- tree entries


def last_commits(store: Store, meta: RepoMeta, sha: str, paths: list[tuple[str, bool]]) -> dict[str, Commit]:
    """For each (path, is_dir), the newest commit reachable from `sha` that changed it."""
    todo = dict(paths)
    found: dict[str, Commit] = {}
    for commit in store.history(meta, sha):
        if not todo:
            break
        parent_tree = store.get_commit(meta, commit.parent).tree if commit.parent else {}
        changed = {p for p in commit.tree.keys() | parent_tree.keys() if commit.tree.get(p) != parent_tree.get(p)}
        for path, is_dir in list(todo.items()):
            prefix = path + "/"
            if (path in changed) if not is_dir else any(c.startswith(prefix) for c in changed):
                found[path] = commit
                del todo[path]
    return found


def _entry(tree: dict[str, FileEntry], path: str, is_dir: bool) -> dict:
    if is_dir:
        return {"type": "directory", "oid": dir_oid(tree, path), "size": 0, "path": path}
    e = tree[path]
    d: dict = {"type": "file", "oid": e.oid, "size": e.size, "path": path}
    if e.lfs:
        d["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
    return d


def _entries(store: Store, meta: RepoMeta, commit: Commit, items: list[tuple[str, bool]], expand: bool) -> list[dict]:
    out = [_entry(commit.tree, p, d) for p, d in items]
    if expand:
        lc = last_commits(store, meta, commit.sha, items)
        for d in out:
            c = lc.get(d["path"])
            if c is not None:
                d["lastCommit"] = {"id": c.sha, "title": c.title, "date": c.date}
    return out


async def tree(ctx: Ctx, repo_type: str, repo_id: str, rev: str, path: str = "") -> JSONResponse:
    """`GET /api/{type}s/{repo}/tree/{rev}[/{path}]`: one page holding every entry (no Link header)."""
    meta = ctx.repo(repo_type, repo_id)
    store = ctx.hub.store
    commit = store.get_commit(meta, store.resolve(meta, rev))
    path = path.strip("/")
    dirs = tree_dirs(commit.tree)
    if path and path not in dirs:
        raise HubError(404, f"Directory {path!r} not found at {rev}", code="EntryNotFound",
                       headers={"X-Repo-Commit": commit.sha})
    recursive = ctx.query_flag("recursive")
    prefix = path + "/" if path else ""
    items: list[tuple[str, bool]] = []
    for p in sorted(commit.tree.keys() | dirs):
        if not p.startswith(prefix) or p == path:
            continue
        rest = p[len(prefix):]
        if recursive or "/" not in rest:
            items.append((p, p in dirs))
    return JSONResponse(_entries(store, meta, commit, items, ctx.query_flag("expand")))


async def paths_info(ctx: Ctx, repo_type: str, repo_id: str, rev: str) -> JSONResponse:
    """`POST /api/{type}s/{repo}/paths-info/{rev}` (form `paths`, `expand`): entries for paths that exist."""
    meta = ctx.repo(repo_type, repo_id)
    store = ctx.hub.store
    fields = await ctx.form_or_json()
    commit = store.get_commit(meta, store.resolve(meta, rev))
    dirs = tree_dirs(commit.tree)
    expand = any(str(v).lower() in ("1", "true") for v in fields.get("expand", []))
    items: list[tuple[str, bool]] = []
    for raw in fields.get("paths", []):
        p = str(raw).strip("/")
        if not p or any(p == q for q, _ in items):
            continue
        if p in commit.tree:
            items.append((p, False))
        elif p in dirs:
            items.append((p, True))
    return JSONResponse(_entries(store, meta, commit, items, expand))


async def refs(ctx: Ctx, repo_type: str, repo_id: str) -> JSONResponse:
    """`GET /api/{type}s/{repo}/refs`: branches, tags, and the always-present `converts: []`."""
    meta = ctx.repo(repo_type, repo_id)
    r = ctx.hub.store.refs(meta)
    body = {
        "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                     for n, s in sorted(r["branches"].items())],
        "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in sorted(r["tags"].items())],
        "converts": [],
    }
    if ctx.query_flag("include_prs"):
        body["pullRequests"] = []
    return JSONResponse(body)


async def commits(ctx: Ctx, repo_type: str, repo_id: str, rev: str) -> JSONResponse:
    """`GET /api/{type}s/{repo}/commits/{rev}`: history newest first, one page."""
    meta = ctx.repo(repo_type, repo_id)
    store = ctx.hub.store
    out = []
    for c in store.history(meta, store.resolve(meta, rev)):
        item = {
            "id": c.sha,
            "title": c.title,
            "message": c.description,
            "authors": [{"user": c.author or "localhub", "avatar": None}],
            "date": c.date,
        }
        if "formatted" in ctx.query_list("expand"):
            item["formatted"] = {"title": c.title, "message": c.description}
        out.append(item)
    return JSONResponse(out)
