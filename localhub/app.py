"""The ASGI application: routing table, request dispatch, admin endpoints.

Routing matches the *raw* (still percent-encoded) path rather than Starlette's decoded one: the
client quotes revisions with `safe=""`, so a revision like `refs/pr/1` arrives as `refs%2Fpr%2F1`
and must stay one path segment. Each captured group is percent-decoded after matching.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from pathlib import Path
from typing import Awaitable, Callable
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from localhub import api_read, api_write, files, lfs
from localhub.context import API_TYPE, Ctx, Hub, error_response
from localhub.errors import HubError
from localhub.middleware import INVALID, USER_KEY, Fault, FaultInjector, RequestLog

logger = logging.getLogger("localhub")

Handler = Callable[..., Awaitable[Response]]

_REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_API_REPO = r"^/api/(?P<kind>models|datasets)/" + _REPO
_GIT_REPO = r"^/(?:(?P<kind>datasets)/)?" + _REPO + r"\.git/info/lfs/objects"


def _route(methods: str, pattern: str, handler: Handler, *, auth: bool = True) -> tuple:
    return (frozenset(methods.split()), re.compile(pattern), handler, auth)


async def _health(ctx: Ctx) -> Response:
    return JSONResponse({"status": "ok"})


def _faults_endpoint(injector: FaultInjector) -> Handler:
    async def faults(ctx: Ctx) -> Response:
        """POST arms a fault, DELETE clears all, GET lists those still armed."""
        if ctx.request.method == "DELETE":
            injector.clear()
            return JSONResponse({"faults": []})
        if ctx.request.method == "GET":
            return JSONResponse({"faults": injector.snapshot()})
        body = await ctx.json_body()
        try:
            if body.get("kind") == "hook":
                raise ValueError("'hook' faults are in-process only (LocalHub.inject_fault)")
            retry_after = body.get("retry_after")
            fault = Fault(method=str(body.get("method", "*")).upper(), path_regex=str(body["path_regex"]),
                          status=int(body.get("status", 500)), times=int(body.get("times", 1)),
                          kind=str(body.get("kind", "status")), after_bytes=int(body.get("after_bytes", 0)),
                          retry_after=None if retry_after is None else int(retry_after),
                          delay_s=float(body.get("delay_s", 0.0)),
                          ranged=None if body.get("ranged") is None else bool(body["ranged"]))
            injector.add(fault)
        except (KeyError, ValueError, TypeError, re.error) as e:
            raise HubError(400, f"Invalid fault: {e}") from e
        return JSONResponse({"faults": injector.snapshot()})
    return faults


def _fault_stats_endpoint(injector: FaultInjector) -> Handler:
    async def fault_stats(ctx: Ctx) -> Response:
        """GET: faults fired and body bytes per request line since the last DELETE; DELETE: reset."""
        if ctx.request.method == "DELETE":
            injector.reset_stats()
        return JSONResponse(injector.stats())
    return fault_stats


def _routes(injector: FaultInjector) -> list[tuple]:
    r = api_read
    w = api_write
    return [
        _route("GET", r"^/_localhub/health$", _health, auth=False),
        _route("GET POST DELETE", r"^/_localhub/faults$", _faults_endpoint(injector), auth=False),
        _route("GET DELETE", r"^/_localhub/fault-stats$", _fault_stats_endpoint(injector), auth=False),
        _route("GET", r"^/api/whoami-v2$", r.whoami),
        _route("POST", r"^/api/repos/create$", w.create_repo),
        _route("DELETE", r"^/api/repos/delete$", w.delete_repo),
        _route("POST", r"^/api/validate-yaml$", w.validate_yaml),
        _route("GET", r"^/api/(?P<kind>models|datasets)$", r.list_repos),
        _route("GET", _API_REPO + r"$", r.repo_info),
        _route("GET", _API_REPO + r"/revision/(?P<rev>.+)$", r.repo_info),
        _route("GET", _API_REPO + r"/auth-check(?P<write>/write)?$", r.auth_check),
        _route("GET", _API_REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", r.tree),
        _route("POST", _API_REPO + r"/paths-info/(?P<rev>.+)$", r.paths_info),
        _route("GET", _API_REPO + r"/refs$", r.refs),
        _route("GET", _API_REPO + r"/commits/(?P<rev>.+)$", r.commits),
        _route("POST", _API_REPO + r"/preupload/(?P<rev>.+)$", w.preupload),
        _route("POST", _API_REPO + r"/commit/(?P<rev>.+)$", w.commit),
        _route("POST", _API_REPO + r"/tag/(?P<rev>.+)$", w.create_tag),
        _route("DELETE", _API_REPO + r"/tag/(?P<rev>.+)$", w.delete_tag),
        _route("POST", _API_REPO + r"/branch/(?P<rev>.+)$", w.create_branch),
        _route("DELETE", _API_REPO + r"/branch/(?P<rev>.+)$", w.delete_branch),
        _route("PUT", _API_REPO + r"/settings$", w.update_settings),
        _route("POST", _GIT_REPO + r"/batch$", lfs.batch),
        _route("POST", _GIT_REPO + r"/verify$", lfs.verify),
        _route("PUT", _GIT_REPO + r"/upload/(?P<oid>[0-9a-f]{64})/(?P<size>\d+)$", lfs.upload, auth=False),
        _route("GET HEAD", r"^/(?:(?P<kind>datasets)/)?" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$",
               files.resolve),
    ]


def _handler_kwargs(groups: dict[str, str | None]) -> dict:
    """Turn regex groups into handler arguments: repo_type/repo_id, decoded rev and path, flags."""
    kw: dict = {}
    g = {k: (unquote(v) if v is not None else None) for k, v in groups.items()}
    if "name" in g:
        kw["repo_type"] = API_TYPE.get(g.pop("kind") or "models", "model")
        kw["repo_id"] = f"{g.pop('ns')}/{g.pop('name')}"
    if "write" in g:
        kw["write"] = g.pop("write") is not None
    for k, v in g.items():
        if v is not None:
            kw[k] = v
    return kw


def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "testclient")


async def _drain(request: Request) -> None:
    # An unread request body (e.g. an LFS PUT of content we already have, or an early error) would
    # otherwise leave bytes on the connection the client wants to reuse.
    try:
        async for _ in request.stream():
            pass
    except Exception:
        pass


def build_app(root: str | Path) -> RequestLog:
    """The full ASGI app for a store rooted at `root`: request log -> fault injection -> routes.

    The returned object has `.hub` (the shared state) and `.injector` (the fault injector) attached.
    """
    hub = Hub(root)
    injector = FaultInjector(None)
    routes = _routes(injector)
    methods_seen = frozenset().union(*(r[0] for r in routes))

    async def dispatch(request: Request) -> Response:
        raw_path = (request.scope.get("raw_path") or request.url.path.encode()).decode("latin-1")
        method = request.method
        allowed: set[str] = set()
        for methods, pattern, handler, needs_auth in routes:
            m = pattern.match(raw_path)
            if m is None:
                continue
            if method not in methods:
                allowed |= methods
                continue
            user = request.scope.get(USER_KEY)
            try:
                if raw_path.startswith("/_localhub/") and not _is_loopback(request):
                    raise HubError(403, "Admin endpoints are only served on loopback")
                if needs_auth and user is INVALID:
                    raise HubError(401, "Invalid credentials in Authorization header")
                ctx = Ctx(hub=hub, request=request, user=None if user is INVALID else user)
                response = await handler(ctx, **_handler_kwargs(m.groupdict()))
            except HubError as e:
                response = error_response(e)
            except ClientDisconnect:  # the client went away mid-request (e.g. a cut upload): not a bug
                logger.info("localhub: client disconnected during %s %s", method, raw_path)
                response = error_response(HubError(400, "Client disconnected before the request was complete"))
            except Exception as e:  # a bug: say so, with the class name, rather than hang up
                logger.exception("localhub: unhandled error on %s %s", method, raw_path)
                response = error_response(HubError(500, f"Internal error: {type(e).__name__}: {e}"))
            await _drain(request)
            return response
        await _drain(request)
        if allowed:
            return error_response(HubError(405, f"Method {method} not allowed"), {"Allow": ", ".join(sorted(allowed))})
        return error_response(HubError(404, "Sorry, we can't find the page you are looking for."))

    starlette_app = Starlette(routes=[Route("/{path:path}", dispatch, methods=sorted(methods_seen | {"OPTIONS"}))])
    injector.app = starlette_app
    app = RequestLog(injector, Path(root), hub.users)
    app.hub = hub
    app.injector = injector
    return app
