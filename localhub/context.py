"""Per-server state and per-request helpers shared by the route modules.

Kept apart from app.py so route modules can import it without importing each other.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse

from localhub.auth import User, Users
from localhub.errors import HubError
from localhub.store import RepoMeta, Store

URL_PREFIX = {"model": "", "dataset": "datasets/"}  # how web/resolve URLs spell each repo type
API_PREFIX = {"model": "models", "dataset": "datasets"}  # /api/{models|datasets}/...
API_TYPE = {"models": "model", "datasets": "dataset"}


class Hub:
    """Everything a running server shares: the store, the users, and a per-process upload secret."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.store = Store(self.root)
        self.users = Users(self.root)
        # Signs LFS upload URLs: the client PUTs to them without an Authorization header.
        self.upload_secret = secrets.token_bytes(32)


@dataclass
class Ctx:
    """One request, with the caller resolved."""

    hub: Hub
    request: Request
    user: User | None

    @property
    def base_url(self) -> str:
        """Scheme and host the client used, so URLs we hand out (LFS hrefs, commit URLs) reach us."""
        return str(self.request.base_url).rstrip("/")

    @property
    def user_name(self) -> str:
        return self.user.name if self.user else "-"

    def repo_url(self, meta: RepoMeta) -> str:
        return f"{self.base_url}/{URL_PREFIX[meta.repo_type]}{meta.repo_id}"

    def query_list(self, name: str) -> list[str]:
        """A repeated query parameter, accepting both `name=` and `name[]=` spellings."""
        qp = self.request.query_params
        return qp.getlist(name) + qp.getlist(name + "[]")

    def query_flag(self, name: str) -> bool:
        return self.request.query_params.get(name, "").lower() in ("1", "true", "yes")

    async def json_body(self) -> dict:
        """The body parsed as a JSON object (400 otherwise)."""
        raw = await self.request.body()
        try:
            data = json.loads(raw or b"{}")
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e
        if not isinstance(data, dict):
            raise HubError(400, "JSON body must be an object")
        return data

    async def form_or_json(self) -> dict[str, list[str]]:
        """Fields of a urlencoded form (repeated keys kept) or of a JSON object.

        Parsed by hand: Starlette's form parser needs python-multipart, which is not installed.
        """
        raw = await self.request.body()
        ctype = self.request.headers.get("content-type", "")
        if "json" in ctype:
            data = json.loads(raw or b"{}")
            return {k: (v if isinstance(v, list) else [v]) for k, v in data.items()}
        fields: dict[str, list[str]] = {}
        for k, v in parse_qsl(raw.decode("utf-8"), keep_blank_values=True):
            fields.setdefault(k.removesuffix("[]"), []).append(v)
        return fields

    # ---- access checks

    def repo(self, repo_type: str, repo_id: str) -> RepoMeta:
        """The repo if the caller may see it; RepoNotFound otherwise (never reveals private repos)."""
        meta = self.hub.store.get_repo(repo_type, repo_id)
        if meta is None or not self.hub.users.can_read(self.user, meta):
            # 401 for anonymous callers, as the Hub does: "log in, maybe you can see it then".
            raise HubError(401 if self.user is None else 404,
                           f"Repository not found: {API_PREFIX.get(repo_type, repo_type)}/{repo_id}",
                           code="RepoNotFound")
        return meta

    def require_write(self, namespace: str, what: str = "write to") -> User:
        """The caller, if they hold a write token for `namespace`; 401/403 otherwise."""
        if self.user is None:
            raise HubError(401, f"You must be authenticated to {what} {namespace}")
        if not self.hub.users.can_write(self.user, namespace):
            reason = "your token is read-only" if self.user.role != "write" else f"you are not a member of {namespace}"
            raise HubError(403, f"You don't have the rights to {what} {namespace}: {reason}")
        return self.user

    def require_gated_access(self, meta: RepoMeta) -> None:
        """GatedRepo errors with the Hub's wording: 401 when anonymous, 403 when not approved."""
        if self.hub.users.has_gated_access(self.user, meta):
            return
        if self.user is None:
            raise HubError(
                401,
                f"Access to {meta.repo_type} {meta.repo_id} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in.",
                code="GatedRepo",
            )
        raise HubError(
            403,
            f"Access to {meta.repo_type} {meta.repo_id} is restricted and you are not in the authorized list. "
            f"Visit {self.repo_url(meta)} to request access.",
            code="GatedRepo",
        )


def error_response(err: HubError, headers: dict | None = None) -> JSONResponse:
    """A Hub-style error: status, X-Error-Code, X-Error-Message and a JSON body {"error": msg}."""
    h = {"X-Error-Message": header_safe(err.message)}
    if err.code:
        h["X-Error-Code"] = err.code
    h.update(err.headers)
    h.update(headers or {})
    return JSONResponse({"error": err.message}, status_code=err.status, headers=h)


def header_safe(text: str) -> str:
    # Header values must be single-line latin-1.
    return " ".join(text.split()).encode("latin-1", "replace").decode("latin-1")
