"""Git LFS over HTTP: batch, upload (PUT) and verify, for the client's non-Xet upload path.

Flow: `POST /{repo}.git/info/lfs/objects/batch` lists objects; for each one we do not have we hand
back an upload href and a verify href on this same server (built from the request's Host). The
client PUTs the raw bytes to the upload href *without* an Authorization header, so the href carries
an HMAC ticket bound to repo, oid and size. Verify is called with the user's token.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.responses import JSONResponse

from localhub.context import URL_PREFIX, Ctx
from localhub.errors import HubError
from localhub.store import SHA256_RE

LFS_MEDIA_TYPE = "application/vnd.git-lfs+json"


def _ticket(ctx: Ctx, repo_type: str, repo_id: str, oid: str, size: int) -> str:
    msg = f"{repo_type}:{repo_id}:{oid}:{size}".encode()
    return hmac.new(ctx.hub.upload_secret, msg, hashlib.sha256).hexdigest()


def _lfs_base(ctx: Ctx, repo_type: str, repo_id: str) -> str:
    return f"{ctx.base_url}/{URL_PREFIX[repo_type]}{repo_id}.git/info/lfs/objects"


async def batch(ctx: Ctx, repo_type: str, repo_id: str) -> JSONResponse:
    """`POST /{repo}.git/info/lfs/objects/batch`: upload actions for objects we lack, none for the rest."""
    meta = ctx.repo(repo_type, repo_id)
    body = await ctx.json_body()
    if body.get("operation") != "upload":
        raise HubError(400, "localhub only supports the LFS 'upload' operation (downloads go through /resolve)")
    ctx.require_write(meta.namespace)
    store = ctx.hub.store
    base = _lfs_base(ctx, repo_type, meta.repo_id)
    objects = []
    for obj in body.get("objects", []):
        oid, size = obj.get("oid"), obj.get("size")
        if not isinstance(oid, str) or not SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
            objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                            "error": {"code": 422, "message": "oid must be a sha256 hex digest and size an int"}})
            continue
        if store.has_blob(oid, size):
            objects.append({"oid": oid, "size": size})  # no actions: already stored
            continue
        ticket = _ticket(ctx, repo_type, meta.repo_id, oid, size)
        objects.append({
            "oid": oid,
            "size": size,
            "authenticated": True,
            "actions": {
                "upload": {"href": f"{base}/upload/{oid}/{size}?ticket={ticket}"},
                "verify": {"href": f"{base}/verify"},
            },
        })
    return JSONResponse({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, media_type=LFS_MEDIA_TYPE)


async def upload(ctx: Ctx, repo_type: str, repo_id: str, oid: str, size: str) -> JSONResponse:
    """`PUT {upload href}`: store the body if the ticket, sha256 and size all match."""
    expected = _ticket(ctx, repo_type, repo_id, oid, int(size))
    if not hmac.compare_digest(ctx.request.query_params.get("ticket", ""), expected):
        raise HubError(403, "Invalid or missing upload ticket")
    store = ctx.hub.store
    if not store.has_blob(oid, int(size)):
        writer = store.blob_writer()
        try:
            async for chunk in ctx.request.stream():
                writer.write(chunk)
            writer.commit(oid, int(size))
        finally:
            writer.close()
    return JSONResponse({})


async def verify(ctx: Ctx, repo_type: str, repo_id: str) -> JSONResponse:
    """`POST {verify href}` {oid, size}: 200 when the object is stored with that size."""
    meta = ctx.repo(repo_type, repo_id)
    ctx.require_write(meta.namespace)
    body = await ctx.json_body()
    oid, size = body.get("oid"), body.get("size")
    if not isinstance(oid, str) or not SHA256_RE.match(oid) or not ctx.hub.store.has_blob(oid, size):
        raise HubError(404, f"LFS object {oid} of size {size} not found")
    return JSONResponse({"oid": oid, "size": size}, media_type=LFS_MEDIA_TYPE)
