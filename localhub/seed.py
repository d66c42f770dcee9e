"""Deterministic seeding: users, orgs, `tinylabs/tiny-llama` (gated) and `tinylabs/tiny-instruct`;
`tinylabs/tiny-bert`, `tinylabs/tiny-t5` and `tinylabs/tiny-tasks` for the other task types.

`seed(root)` is idempotent: on an already-seeded root it writes nothing and returns the same dict.
Tokens, file bytes, commit dates and therefore commit shas are identical on every machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from localhub import seed_adapters, seed_data, seed_models
from localhub.auth import User, Users
from localhub.store import (
    DEFAULT_GITATTRIBUTES,
    Operation,
    RepoMeta,
    Store,
    commit_sha,
    make_entry,
)

ENDPOINT_HINT = "set HF_ENDPOINT to the server URL, HF_TOKEN to a user's token, HF_HUB_DISABLE_XET=1"
ORGS = ["loraflow-demo", "tinylabs"]
# Fixed dates: part of the commit shas.
CREATED_AT = "2025-01-01T00:00:00.000Z"
SEEDED_AT = "2025-01-01T00:01:00.000Z"
SEED_AUTHOR = "owner"


def seed_token(name: str) -> str:
    """`hf_local_` + 24 hex chars: deterministic, and short enough (29 alphanumerics after `hf_`) that
    secret scanners looking for real Hub tokens do not flag it."""
    return "hf_local_" + hashlib.sha256(f"localhub-seed:{name}".encode()).hexdigest()[:24]


def seed_users() -> list[User]:
    """demo (write, loraflow-demo, gated access), reader (read-only), owner (write, tinylabs)."""
    return [
        User("demo", seed_token("demo"), "write", ("loraflow-demo",), True),
        User("reader", seed_token("reader"), "read", (), False),
        User("owner", seed_token("owner"), "write", ("tinylabs",), True),
    ]


@dataclass(frozen=True)
class SeedRepo:
    meta: RepoMeta
    files: dict[str, bytes]
    lfs: frozenset[str]
    message: str


def seed_repos() -> list[SeedRepo]:
    """The model and the dataset, with their files; the task-type seeds; a LoRA adapter for the model."""
    repos = [
        SeedRepo(
            RepoMeta("model", "tinylabs/tiny-llama", private=False, gated="manual", created_at=CREATED_AT),
            seed_data.model_files(), frozenset({"model.safetensors"}), "Add tiny Llama model and tokenizer",
        ),
        SeedRepo(
            RepoMeta("dataset", "tinylabs/tiny-instruct", private=False, gated=False, created_at=CREATED_AT),
            seed_data.dataset_files(), frozenset(), "Add tiny-instruct dataset",
        ),
        # The task-type seeds (localhub/seed_models.py): classification, tagging, seq2seq.
        SeedRepo(
            RepoMeta("model", "tinylabs/tiny-bert", private=False, gated=False, created_at=CREATED_AT),
            seed_models.bert_files(), frozenset({"model.safetensors"}), "Add tiny BERT model and tokenizer",
        ),
        SeedRepo(
            RepoMeta("model", "tinylabs/tiny-t5", private=False, gated=False, created_at=CREATED_AT),
            seed_models.t5_files(), frozenset({"model.safetensors"}), "Add tiny T5 model and tokenizer",
        ),
        SeedRepo(
            RepoMeta("dataset", "tinylabs/tiny-tasks", private=False, gated=False, created_at=CREATED_AT),
            seed_models.tasks_dataset_files(), frozenset(), "Add tiny-tasks dataset",
        ),
    ]
    # An adapter repo (localhub/seed_adapters.py) whose adapter_config.json pins tiny-llama's seeded commit.
    repos.append(SeedRepo(
        RepoMeta("model", seed_adapters.ADAPTER_REPO, private=False, gated=False, created_at=CREATED_AT),
        seed_adapters.adapter_files(expected_commits(repos[0])[1]), frozenset({"adapter_model.safetensors"}),
        "Add a LoRA adapter for tiny-llama",
    ))
    return repos


def expected_commits(repo: SeedRepo) -> tuple[str, str]:
    """(initial commit sha, content commit sha), computed without touching disk."""
    tree = {".gitattributes": make_entry(DEFAULT_GITATTRIBUTES, False)}
    initial = commit_sha(None, tree, "initial commit", CREATED_AT)
    for path, data in repo.files.items():
        tree[path] = make_entry(data, path in repo.lfs)
    return initial, commit_sha(initial, tree, repo.message, SEEDED_AT)


def _seed_repo(store: Store, repo: SeedRepo) -> str:
    initial, content = expected_commits(repo)
    existing = store.get_repo(repo.meta.repo_type, repo.meta.repo_id)
    if existing is not None:
        if not store.has_commit(existing, content):
            raise RuntimeError(
                f"{repo.meta.repo_type} {repo.meta.repo_id} exists in {store.root} but does not contain the seed "
                f"commit {content}: refusing to overwrite it (use an empty root)"
            )
        return content
    got = store.create_repo(repo.meta, author=SEED_AUTHOR, date=CREATED_AT)
    assert got == initial, (got, initial)
    ops = []
    for path in sorted(repo.files):
        data = repo.files[path]
        if path in repo.lfs:
            ops.append(Operation("add", path, lfs_sha256=store.put_blob(data), lfs_size=len(data)))
        else:
            ops.append(Operation("add", path, content=data))
    got = store.commit(repo.meta, "main", ops, title=repo.message, author=SEED_AUTHOR, parent_commit=initial,
                       date=SEEDED_AT)
    assert got == content, (got, content)
    return content


def _seed_users(root: Path) -> list[User]:
    users = Users(root)
    wanted = seed_users()
    current = users.users()
    merged = {u.name: u for u in current}
    for u in wanted:
        merged[u.name] = u
    orgs = list(dict.fromkeys(users.orgs() + ORGS))
    if list(merged.values()) != current or orgs != users.orgs():
        users.save(list(merged.values()), orgs)
    return wanted


def seed(root: str | Path) -> dict:
    """Seed `root` (creating it if needed) and return the description the CLI prints.

    Safe to call again: an already-seeded root is left untouched and gives the same dict. Users added
    by hand are kept; a seed repo that exists without the seed commit is an error.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    store = Store(root)
    users = _seed_users(root)
    repos = []
    with store.lock:
        for repo in seed_repos():
            sha = _seed_repo(store, repo)
            repos.append({"repo_id": repo.meta.repo_id, "type": repo.meta.repo_type,
                          "gated": bool(repo.meta.gated), "private": repo.meta.private, "commit": sha})
    return {
        "endpoint_hint": ENDPOINT_HINT,
        "users": [{"name": u.name, "token": u.token, "role": u.role, "orgs": list(u.orgs),
                   "gated_access": u.gated_access} for u in users],
        "repos": repos,
    }
