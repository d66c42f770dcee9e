"""Preflight: check, in seconds and before any GPU work, that the run can succeed.

Token valid (whoami), read access to the (possibly gated) base model (auth_check),
write access to the target namespace, revisions resolved to commit shas, safetensors
weights present, enough free disk for the shards; the loading options this machine can
honour (libraries, GPUs), LoRA target modules that exist, and a memory estimate from the
safetensors headers that fits the visible GPUs (tasks/memory.py). Never cached: it is
the check that the world is still as the caches assume. Never imports torch.
"""
from __future__ import annotations

import importlib.util
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal, Optional

from prefect import task
from pydantic import BaseModel

from profiles.schema import Profile
from tasks import errors, memory, settings
from tasks.hub import hub_api
from tasks.memory import MemoryReport
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
    memory: Optional[MemoryReport] = None


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


def model_config(api, model: ModelRef) -> dict:
    """config.json at the pinned commit (already in the cache: resolve_model fetched it)."""
    import json

    path = api.hf_hub_download(model.repo_id, "config.json", revision=model.commit,
                               cache_dir=settings.loraflow_home() / "hub")
    return json.loads(Path(path).read_text())


def model_tensors(api, model: ModelRef) -> memory.TensorSpecs:
    """Every weight's name, dtype and shape from the safetensors headers (ranged reads)."""
    from huggingface_hub import errors as hf

    try:
        return memory.tensor_specs_from_hub(api, model.repo_id, model.commit)
    except (hf.SafetensorsParsingError, hf.NotASafetensorsRepoError) as exc:
        raise errors.ProfileError(
            f"model.id: the safetensors headers of '{model.repo_id}' at {model.commit} "
            f"cannot be read ({type(exc).__name__}). Fix: pick a revision whose "
            "safetensors files are complete.") from None
    except (hf.HfHubHTTPError, OSError) as exc:
        raise errors.translate_hub_error(exc, repo_id=model.repo_id, revision=model.commit,
                                         endpoint=settings.hub_endpoint()) from None


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _major_minor(package: str) -> tuple[int, int]:
    try:
        parts = version(package).split("+")[0].split(".")
        return int(parts[0]), int(parts[1])
    except (PackageNotFoundError, ValueError, IndexError):
        return (0, 0)


def check_loading_options(profile: Profile, gpus: list) -> None:
    """What loading needs from this machine, checked before any weight is read.

    Libraries are looked up without importing them (torch is never imported here);
    GPUs come from nvidia-smi (`memory.visible_gpus`).
    """
    m, q, t = profile.model, profile.quantization, profile.training
    on_cpu = not gpus or m.device_map == "cpu"
    if q.mode != "none" and not _installed("bitsandbytes"):
        raise errors.ProfileError(
            f"quantization.mode: {q.mode} needs bitsandbytes, which is not installed. Fix: "
            "pip install 'bitsandbytes>=0.50', or set quantization.mode to none.")
    if m.attn_implementation == "flash_attention_2":
        if not _installed("flash_attn"):
            raise errors.ProfileError(
                "model.attn_implementation: flash_attention_2 needs the flash-attn package, "
                "which is not installed. Fix: pip install flash-attn --no-build-isolation "
                "(on a machine with a CUDA GPU and toolkit), or set "
                "model.attn_implementation to sdpa.")
        if on_cpu:
            raise errors.ProfileError(
                "model.attn_implementation: flash_attention_2 runs on CUDA GPUs only and "
                "none is visible here (nvidia-smi). Fix: use sdpa, or run on a GPU machine.")
        if m.dtype == "auto" and not all(g.bf16 for g in gpus):
            raise errors.ProfileError(
                "model.dtype: auto means float32 on this GPU (no bfloat16), and "
                "flash_attention_2 needs float16/bfloat16. Fix: set model.dtype to float16.")
    if m.attn_implementation == "flex_attention" and _major_minor("torch") < (2, 5):
        raise errors.ProfileError(
            "model.attn_implementation: flex_attention needs torch >= 2.5 (installed: "
            f"{'.'.join(map(str, _major_minor('torch')))}). Fix: upgrade torch, or use sdpa.")
    if m.attn_implementation == "flex_attention" and on_cpu:
        raise errors.ProfileError(
            "model.attn_implementation: flex_attention has no backward pass on CPU in torch "
            "(training would stop at the first step). Fix: use sdpa or eager on CPU, or "
            "train on a GPU.")
    if not m.low_cpu_mem_usage and _major_minor("transformers") >= (5, 0):
        raise errors.ProfileError(
            "model.low_cpu_mem_usage: transformers >= 5 always loads weights without a "
            "second copy in RAM and has no way to turn that off. Fix: set "
            "model.low_cpu_mem_usage to true (or remove it).")
    wants_gpu = m.device_map == "cuda" or (isinstance(m.device_map, dict) and any(
        not (isinstance(v, str) and v in ("cpu", "disk")) for v in m.device_map.values()))
    if wants_gpu and not gpus:
        raise errors.ProfileError(
            f"model.device_map: {m.device_map!r} places weights on a GPU, and no CUDA GPU "
            "is visible here (nvidia-smi). Fix: set model.device_map to cpu or null, or run "
            "on a GPU machine.")
    if on_cpu and q.mode in ("nf4", "fp4") and t.eval_steps:
        # bitsandbytes repacks 4-bit weights for its CPU kernel on the first no-grad
        # forward in eval mode (AVX512-BF16 CPUs); LoRA stops learning after it.
        # load_base_model turns that repacking off, and this keeps evaluation out of the
        # training loop on CPU in case a bitsandbytes release brings it back by another
        # path; the evaluation after training still runs.
        raise errors.ProfileError(
            f"training.eval_steps: evaluating during 4-bit ({q.mode}) training on CPU can "
            "stop LoRA from learning (bitsandbytes repacks 4-bit weights for inference). "
            "Fix: set training.eval_steps to null (evaluation runs once, after training), "
            "use quantization.mode int8 or none, or train on a GPU.")


def check_task(api, profile: Profile, model: ModelRef) -> None:
    """model.task is one the base can do, from its config.json (tasks/task_types.py)."""
    from tasks.task_types import check_config

    check_config(profile.model.task, model_config(api, model), model.repo_id)


def check_memory(api, profile: Profile, model: ModelRef, gpus: list) -> memory.MemoryReport:
    """Target modules exist and the run fits the visible GPUs (headers only)."""
    tensors = model_tensors(api, model)
    memory.check_target_modules(profile.lora.target_modules, tensors)
    return memory.plan_memory(profile, tensors, model_config(api, model), gpus=gpus)


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
    gpus = memory.visible_gpus()
    check_loading_options(profile, gpus)
    api = hub_api()
    me = check_token(api)
    model = resolve_model(api, profile)
    check_task(api, profile, model)
    dataset = resolve_dataset(api, profile)
    check_write_access(me, profile.publish.repo_id)
    check_disk(model.download_bytes)
    mem = check_memory(api, profile, model, gpus)
    return PreflightReport(user=me["name"], base_model=model, dataset=dataset,
                           target_repo=profile.publish.repo_id, memory=mem)


@task(name="preflight", **TRANSIENT_RETRIES)
def preflight(profile: Profile) -> PreflightReport:
    """Prefect task: run_preflight, never cached."""
    return run_preflight(profile)
