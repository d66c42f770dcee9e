"""Users, tokens and permissions.

Users live in `<root>/users.json`::

    {"orgs": ["tinylabs"],
     "users": [{"name": "owner", "token": "hf_...", "role": "write", "orgs": ["tinylabs"], "gated_access": true}]}

Rules (a small, predictable subset of the Hub's):
- anyone, even anonymous, reads public repos; private repos only members of their namespace
  (the user of that name or members of that org);
- writing needs a "write" token and membership of the target namespace;
- gated repos ("manual" or "auto") expose metadata to everyone who can read them, but file
  downloads need access: namespace members always have it; for "manual" gating a user needs
  `gated_access: true`; "auto" gating approves every authenticated user (the Hub auto-approves
  requests).

The file is re-read when its mtime changes, so users can be added while the server runs.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from localhub.store import RepoMeta, atomic_write

ROLES = ("read", "write")


@dataclass(frozen=True)
class User:
    """A user and their single access token."""

    name: str
    token: str
    role: str = "read"
    orgs: tuple[str, ...] = field(default_factory=tuple)
    gated_access: bool = False

    def to_json(self) -> dict:
        return {"name": self.name, "token": self.token, "role": self.role, "orgs": list(self.orgs),
                "gated_access": self.gated_access}

    def is_member(self, namespace: str) -> bool:
        """Whether `namespace` is this user or one of their orgs."""
        return namespace == self.name or namespace in self.orgs


class InvalidToken(Exception):
    """A bearer token was sent but matches no user."""


class Users:
    """The users file, with lookups and permission checks."""

    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / "users.json"
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._users: dict[str, User] = {}
        self._by_token: dict[str, User] = {}
        self._orgs: list[str] = []

    # ---- file

    def _load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        with self._lock:
            if mtime == self._mtime:
                return
            data = json.loads(self.path.read_text()) if mtime is not None else {"users": [], "orgs": []}
            users = {}
            for u in data.get("users", []):
                user = User(name=u["name"], token=u["token"], role=u.get("role", "read"),
                            orgs=tuple(u.get("orgs", [])), gated_access=bool(u.get("gated_access", False)))
                users[user.name] = user
            self._users = users
            self._by_token = {u.token: u for u in users.values()}
            self._orgs = list(data.get("orgs", []))
            self._mtime = mtime

    def users(self) -> list[User]:
        """All users, in file order."""
        self._load()
        return list(self._users.values())

    def orgs(self) -> list[str]:
        """All org names."""
        self._load()
        return list(self._orgs)

    def save(self, users: list[User], orgs: list[str]) -> None:
        """Replace the users file."""
        for u in users:
            if u.role not in ROLES:
                raise ValueError(f"role must be one of {ROLES}, got {u.role!r}")
        data = {"orgs": list(orgs), "users": [u.to_json() for u in users]}
        atomic_write(self.path, (json.dumps(data, indent=2) + "\n").encode())
        self._mtime = None  # force a reload even if the mtime did not tick

    # ---- lookups

    def from_authorization(self, header: str | None) -> User | None:
        """The user behind an `Authorization: Bearer <token>` header; None when absent.

        Raises InvalidToken when a token is sent but unknown, so a typo never silently falls back to
        anonymous access.
        """
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise InvalidToken()
        self._load()
        user = self._by_token.get(token)
        if user is None:
            raise InvalidToken()
        return user

    def namespace_exists(self, namespace: str) -> bool:
        """Whether a user or org of this name exists."""
        self._load()
        return namespace in self._users or namespace in self._orgs

    # ---- permissions

    @staticmethod
    def can_read(user: User | None, meta: RepoMeta) -> bool:
        """Public repos: everyone. Private: namespace members only."""
        return not meta.private or (user is not None and user.is_member(meta.namespace))

    @staticmethod
    def can_write(user: User | None, namespace: str) -> bool:
        """A write token of a member of the namespace."""
        return user is not None and user.role == "write" and user.is_member(namespace)

    @staticmethod
    def has_gated_access(user: User | None, meta: RepoMeta) -> bool:
        """Whether `user` may download files of `meta` (always true for non-gated repos)."""
        if not meta.gated:
            return True
        if user is None:
            return False
        if user.is_member(meta.namespace):
            return True
        if meta.gated == "auto":
            return True
        return user.gated_access
