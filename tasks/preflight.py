"""Preflight: check, in seconds and before any GPU work, that the run can succeed.

Token valid (whoami), read access to the (possibly gated) base model (auth_check),
write access to the target namespace, revisions resolved to commit shas, safetensors
weights present, enough free disk for the shards. Never cached: it is the check that
the world is still as the caches assume.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal, Optional

from prefect import task
from pydantic import BaseModel

from profiles.schema import Profile
from tasks import errors, settings
from tasks.hub import hub_api
from tasks.retry import TRANSIENT_RETRIES

# Files a training run needs from the base repo: weights as safetensors (never pickle),
# configs and tokenizer files.
SNAPSHOT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json",
                     "generation_config.json", "tokenizer*", "special_tokens_map.json",
                     "chat_template.jinja", "*.model", "vocab.*", "merges.txt"]


class ModelRef(BaseModel):
    """The base model, pinned."""
    repo_id: str
    revision: str
    commit: str
    gated: bool
    license: Optional[str] = None
    architecture: Optional[str] = None
    download_bytes: int = 0


class DatasetRef(BaseModel):
    """The training data, pinned: a Hub dataset at a commit, or a local file by sha256."""
    source: Literal["hub", "file"]
    id: str
    revision: Optional[str] = None
    commit: Optional[str] = None
    sha256: Optional[str] = None

    @property
    def content_id(self) -> str:
        return self.commit or self.sha256 or ""


class PreflightReport(BaseModel):
    user: str
    base_model: ModelRef
    dataset: DatasetRef
    target_repo: str


def check_token(api) -> dict:
    """whoami with the environment's token; typed errors when missing or invalid."""
    if not api.token:
        raise errors.MissingTokenError(
            "no Hub token: HF_TOKEN is not set and no token is saved. Fix: export HF_TOKEN "
            "with a token of a user who can read the base model and write the target repo.")
    from huggingface_hub import errors as hf

    try:
        return api.whoami()
    except hf.HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status == 401:
            raise errors.InvalidTokenError(
                f"the Hub at {settings.hub_endpoint()} rejected the token in HF_TOKEN "
                "(401). Fix: create a new token and export it as HF_TOKEN.") from None
        raise errors.translate_hub_error(exc, repo_id="(whoami)",
                                         endpoint=settings.hub_endpoint()) from None


def check_write_access(me: dict, repo_id: str) -> None:
    """The token must be a write token of the namespace's user or of one of its orgs."""
    namespace = repo_id.split("/")[0]
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    allowed = {me.get("name")} | {o.get("name") for o in me.get("orgs", [])}
    if role not in ("write", "admin", "fineGrained") or namespace not in allowed:
        why = ("a read-only token" if role not in ("write", "admin", "fineGrained")
               else f"user '{me.get('name')}' is not in '{namespace}'")
        raise errors.WritePermissionError(
            f"publish.repo_id: cannot publish to '{repo_id}': {why}. Fix: use a write token "
            f"of a member of '{namespace}', or set publish.repo_id to a namespace you can "
            f"write ({', '.join(sorted(n for n in allowed if n))}).", repo_id=repo_id)


def resolve_model(api, profile: Profile) -> ModelRef:
    """Revision → commit sha, gated access, safetensors present, architecture, license."""
    repo_id, revision = profile.model.id, profile.model.revision
    from huggingface_hub import errors as hf

    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
        api.auth_check(repo_id)  # gated repos list files freely; downloads need access
        config_path = api.hf_hub_download(repo_id, "config.json", revision=info.sha,
                                          cache_dir=settings.loraflow_home() / "hub")
    except (hf.HfHubHTTPError, OSError) as exc:
        raise errors.translate_hub_error(exc, repo_id=repo_id, revision=revision,
                                         endpoint=settings.hub_endpoint()) from None
    import json

    files = [s.rfilename for s in info.siblings or []]
    if not any(f.endswith(".safetensors") for f in files):
        raise errors.ProfileError(
            f"model.id: '{repo_id}' has no .safetensors weights; loraflow loads safetensors "
            "only (pickled .bin files can run code). Fix: pick a revision or repo with "
            "safetensors weights.")
    from fnmatch import fnmatch

    size = sum((s.size or 0) for s in info.siblings or []
               if any(fnmatch(s.rfilename, p) for p in SNAPSHOT_PATTERNS))
    config = json.loads(Path(config_path).read_text())
    card = info.card_data.to_dict() if info.card_data else {}
    return ModelRef(repo_id=repo_id, revision=revision, commit=info.sha,
                    gated=bool(info.gated), license=card.get("license"),
                    architecture=(config.get("architectures") or [None])[0],
                    download_bytes=size)


def resolve_dataset(api, profile: Profile) -> DatasetRef:
    """A local file → its sha256; a Hub dataset → the commit its revision points at."""
    data = profile.data
    local = Path(data.dataset).expanduser()
    if local.suffix in (".json", ".jsonl", ".csv", ".parquet") or local.exists():
        if not local.is_file():
            raise errors.ProfileError(f"data.dataset: local file '{local}' does not exist. "
                                      "Fix: give an existing .json/.jsonl/.csv/.parquet file "
                                      "or a Hub dataset id.")
        from tasks.caching import sha256_file

        return DatasetRef(source="file", id=str(local.resolve()), sha256=sha256_file(local))
    from huggingface_hub import errors as hf

    try:
        info = api.dataset_info(data.dataset, revision=data.revision)
    except hf.HfHubHTTPError as exc:
        raise errors.translate_hub_error(exc, repo_id=data.dataset, repo_type="dataset",
                                         revision=data.revision,
                                         endpoint=settings.hub_endpoint()) from None
    return DatasetRef(source="hub", id=data.dataset, revision=data.revision, commit=info.sha)


def check_disk(needed_bytes: int) -> None:
    home = settings.loraflow_home()
    home.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(home).free
    if needed_bytes * 1.1 > free:
        raise errors.ProfileError(
            f"not enough disk under LORAFLOW_HOME ({home}): the base model needs "
            f"{needed_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free. Fix: free space "
            "or point LORAFLOW_HOME at a larger disk.")


def run_preflight(profile: Profile) -> PreflightReport:
    """All checks, cheapest first. Raises a typed LoraflowError naming cause and fix."""
    api = hub_api()
    me = check_token(api)
    model = resolve_model(api, profile)
    dataset = resolve_dataset(api, profile)
    check_write_access(me, profile.publish.repo_id)
    check_disk(model.download_bytes)
    return PreflightReport(user=me["name"], base_model=model, dataset=dataset,
                           target_repo=profile.publish.repo_id)


@task(name="preflight", **TRANSIENT_RETRIES)
def preflight(profile: Profile) -> PreflightReport:
    """Prefect task: run_preflight, never cached."""
    return run_preflight(profile)
