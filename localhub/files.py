"""File downloads: `HEAD|GET /{repo}/resolve/{rev}/{path}` (datasets under `/datasets/`).

The client needs `X-Repo-Commit`, an ETag (git sha1 for regular files, sha256 for LFS files, which it
reads from `X-Linked-Etag` first) and the real size (`X-Linked-Size` or `Content-Length`). Ranged reads
(`bytes=N-` to resume, `bytes=A-B` for safetensors headers and HfFileSystem) answer 206 with
`Content-Range`. We serve bytes directly instead of redirecting to a CDN.
"""

from __future__ import annotations

import mimetypes
import re
from typing import Iterator
from urllib.parse import quote

from starlette.responses import Response, StreamingResponse

from localhub.context import Ctx
from localhub.errors import HubError

CHUNK = 1024 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) for a single `bytes=` range; None to serve the whole file.

    Raises HubError(416) when the range cannot be satisfied. Multi-range requests are answered
    with the whole file, which RFC 9110 allows.
    """
    if not header:
        return None
    m = _RANGE.match(header.strip().replace(" ", ""))
    if m is None:
        return None
    first, last = m.groups()
    if first == "" and last == "":
        return None
    if first == "":  # suffix: the last N bytes
        n = int(last)
        if n == 0:
            raise _unsatisfiable(size)
        return max(size - n, 0), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        raise _unsatisfiable(size)
    return start, min(end, size - 1)


def _unsatisfiable(size: int) -> HubError:
    return HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})


def _read(path, start: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk


async def resolve(ctx: Ctx, repo_type: str, repo_id: str, rev: str, path: str) -> Response:
    """Serve one file of one revision, honouring gating and Range."""
    meta = ctx.repo(repo_type, repo_id)
    ctx.require_gated_access(meta)
    store = ctx.hub.store
    sha = store.resolve(meta, rev)
    entry = store.get_commit(meta, sha).tree.get(path)
    if entry is None:
        raise HubError(404, f"Entry not found: {path} at {rev}", code="EntryNotFound", headers={"X-Repo-Commit": sha})
    size = entry.size
    etag = entry.sha256 if entry.lfs else entry.oid
    filename = path.rsplit("/", 1)[-1]
    headers = {
        "X-Repo-Commit": sha,
        "ETag": f'"{etag}"',
        "Accept-Ranges": "bytes",
        "Content-Type": mimetypes.guess_type(filename)[0] or "application/octet-stream",
        "Content-Disposition": f"inline; filename*=UTF-8''{quote(filename)}",
        "Cache-Control": "private, max-age=0, must-revalidate" if meta.private or meta.gated else "public, max-age=0",
    }
    if entry.lfs:
        headers["X-Linked-Etag"] = f'"{entry.sha256}"'
        headers["X-Linked-Size"] = str(size)
    rng = parse_range(ctx.request.headers.get("range"), size) if size else None
    status, start, length = 200, 0, size
    if rng is not None:
        start, end = rng
        status, length = 206, end - start + 1
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(length)
    if ctx.request.method == "HEAD":
        return Response(b"", status_code=status, headers=headers)
    return StreamingResponse(_read(store.blob_path(entry.sha256), start, length), status_code=status,
                             headers=headers)
