"""Preflight: check, in seconds and before any GPU work, that the run can succeed.

Token valid (whoami), read access to the (possibly gated) base model (auth_check),
write access to the target namespace, revisions resolved to commit shas, safetensors
weights present, enough free disk for the shards; the loading options this machine can
honour (libraries, GPUs), LoRA target modules that exist, and a memory estimate from the
safetensors headers that fits the visible GPUs (tasks/memory/). Never cached: it is
the check that the world is still as the caches assume. Never imports torch.
"""
from __future__ import annotations

import importlib.util
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

from prefect import task

from profiles.schema import Profile
from tasks import errors, settings
from tasks.cache.policy import REPORT_HOOKS
from tasks.contracts import (
    ADAPTER_PATTERNS,
    SNAPSHOT_PATTERNS,
    AdapterRef,
    DatasetRef,
    MemoryReport,
    ModelRef,
    PreflightReport,
)
from tasks.hub import hub_api
from tasks.memory import devices
from tasks.memory.fit import plan_memory
from tasks.memory.tensors import (
    TensorSpecs,
    check_fp8_target_modules,
    check_target_modules,
    linear_modules,
    tensor_specs_from_hub,
)
from tasks.retry import TRANSIENT_RETRIES


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


def resolve_model(api, profile: Profile, adapter: Optional[AdapterRef] = None) -> ModelRef:
    """Revision → commit sha, gated access, safetensors present, architecture, license.

    With `adapter` (model.id is an adapter repo), the model resolved is its base."""
    repo_id, revision = profile.model.id, profile.model.revision
    if adapter is not None:
        repo_id, revision = adapter.base_id, adapter.base_revision
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


def model_tensors(api, model: ModelRef) -> TensorSpecs:
    """Every weight's name, dtype and shape from the safetensors headers (ranged reads)."""
    from huggingface_hub import errors as hf

    try:
        return tensor_specs_from_hub(api, model.repo_id, model.commit)
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


FP8_CAPABILITY = 8.9  # CUDA compute capability with FP8 tensor cores (Ada)


def check_loading_options(profile: Profile, gpus: list) -> None:
    """What loading needs from this machine, checked before any weight is read.

    Libraries are looked up without importing them (torch is never imported here);
    GPUs come from nvidia-smi (`visible_gpus`).
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
    if t.liger_kernel is True and (on_cpu or not _installed("liger_kernel")):
        raise errors.ProfileError(
            "training.liger_kernel: true needs the liger-kernel package and a CUDA GPU ("
            f"{'none is visible here' if on_cpu else 'the package is not installed'}). Fix: "
            "pip install 'loraflow[fast]' on a GPU machine, or set it to auto (on where it "
            "can run) or false.")
    if t.fp8 and on_cpu:
        raise errors.ProfileError(
            "training.fp8: FP8 matmuls run on a GPU's FP8 tensor cores (compute capability "
            "8.9 or newer: Ada, Hopper, Blackwell), and no CUDA GPU is visible here. Fix: set "
            "training.fp8 to false, or train on such a GPU.")
    older = [g for g in gpus if (g.compute_capability or 0) < FP8_CAPABILITY]
    if t.fp8 and not on_cpu and older:
        raise errors.ProfileError(
            f"training.fp8: FP8 matmuls need FP8 tensor cores (compute capability "
            f"{FP8_CAPABILITY} or newer: Ada, Hopper, Blackwell), and GPU {older[0].index} "
            f"({older[0].name}) has {older[0].compute_capability or 'an unknown one'}. Fix: "
            "set training.fp8 to false, or train on such a GPU.")
    from tasks.training.launch import resolve_launcher

    launcher, processes = resolve_launcher(t, len(gpus), m.device_map)
    if t.offload_activations and processes > 1:
        raise errors.ProfileError(
            f"training.offload_activations: training would run {processes} processes "
            f"({launcher}, training.launcher {t.launcher}), and offloaded checkpointing runs "
            "in one. Fix: set training.launcher to single (or nproc_per_node to 1), or "
            "training.offload_activations to false.")
    from tasks.training.speed import adapts_output_head

    if t.liger_kernel is True and profile.model.task == "causal-lm" \
            and adapts_output_head(profile.lora):
        raise errors.ProfileError(
            "training.liger_kernel: true, and the adapter adapts or saves lm_head "
            "(lora.target_modules / lora.modules_to_save): Liger's fused linear "
            "cross-entropy multiplies by lm_head's own weight, past the adapter, so that "
            "part would learn nothing. Fix: set training.liger_kernel to auto (off for "
            "such an adapter) or false, or leave lm_head out of the adapter.")
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
    """model.task is one the base can do, from its config.json (tasks.model_tasks.py)."""
    from tasks.model_tasks import check_config

    check_config(profile.model.task, model_config(api, model), model.repo_id)


def check_memory(api, profile: Profile, model: ModelRef, gpus: list,
                 adapter: Optional[AdapterRef] = None) -> MemoryReport:
    """Target modules exist, a continued adapter is the one the lora section describes,
    and the run fits the visible GPUs (headers only)."""
    tensors = model_tensors(api, model)
    config = model_config(api, model)
    check_target_modules(profile.lora, tensors, config, profile.model.task)
    if profile.training.fp8:
        check_fp8_target_modules(profile.training.fp8_target_modules, tensors, config,
                                 profile.model.task)
    if adapter is not None:
        check_adapter_shape(profile, adapter, tensors, config)
    return plan_memory(profile, tensors, config, gpus=gpus)


def resolve_dataset(api, profile: Profile) -> DatasetRef:
    """A local file → its sha256; a Hub dataset → the commit its revision points at."""
    data = profile.data
    local = Path(data.dataset).expanduser()
    if local.suffix in (".json", ".jsonl", ".csv", ".parquet") or local.exists():
        if not local.is_file():
            raise errors.ProfileError(f"data.dataset: local file '{local}' does not exist. "
                                      "Fix: give an existing .json/.jsonl/.csv/.parquet file "
                                      "or a Hub dataset id.")
        from tasks.cache.manifest import sha256_file

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

# ------------------------------------------------------------------ adapter repos


def _is_adapter_repo(files: list[str]) -> bool:
    return "adapter_config.json" in files and "config.json" not in files


def resolve_adapter(api, profile: Profile) -> Optional[AdapterRef]:
    """model.id → an AdapterRef when it is an adapter repo, else None (and the options
    that only apply to adapters are refused)."""
    import json
    from fnmatch import fnmatch

    from huggingface_hub import errors as hf

    from profiles.schema import REPO_ID_RE, SHA_RE
    from tasks.training.adapters import continued_method

    m, lora = profile.model, profile.lora
    try:
        info = api.model_info(m.id, revision=m.revision, files_metadata=True)
        files = [s.rfilename for s in info.siblings or []]
        config_path = (api.hf_hub_download(m.id, "adapter_config.json", revision=info.sha,
                                           cache_dir=settings.loraflow_home() / "hub")
                       if _is_adapter_repo(files) else None)
    except (hf.HfHubHTTPError, OSError) as exc:
        raise errors.translate_hub_error(exc, repo_id=m.id, revision=m.revision,
                                         endpoint=settings.hub_endpoint()) from None
    if config_path is None:
        for field in ("base_id", "base_revision"):
            if getattr(m, field) is not None:
                raise errors.ProfileError(
                    f"model.{field}: '{m.id}' is a base model, not an adapter repo, so there "
                    f"is no adapter base to check. Fix: remove model.{field}, or point "
                    "model.id at the adapter repo to continue.")
        if lora.low_cpu_mem_usage:
            raise errors.ProfileError(
                "lora.low_cpu_mem_usage: it creates adapter weights empty, to be filled from a "
                f"saved adapter, and '{m.id}' is a base model (a fresh adapter has none). Fix: "
                "set it to false, or point model.id at an adapter repo to continue.")
        return None
    if "adapter_model.safetensors" not in files:
        raise errors.ProfileError(
            f"model.id: adapter repo '{m.id}' has no adapter_model.safetensors (loraflow "
            "loads safetensors only; pickled .bin files can run code). Fix: pick a revision "
            "or repo with safetensors adapter weights.")
    config = json.loads(Path(config_path).read_text())
    method = continued_method(config, m.id)
    if method != lora.method:
        raise errors.ProfileError(
            f"lora.method: {lora.method}, but '{m.id}' is a {config['peft_type']} adapter, "
            f"which training continues as it is. Fix: set lora.method to {method}.")
    from tasks.model_tasks import TASKS

    want = TASKS[m.task].peft_task_type
    if config.get("task_type") not in (None, want):
        raise errors.ProfileError(
            f"model.task: {m.task} ({want}), but '{m.id}' was trained for "
            f"{config['task_type']}. Fix: set model.task to match the adapter, or train a "
            "fresh adapter.")
    if lora.init != "default":
        raise errors.ProfileError(
            f"lora.init: {lora.init} initialises a fresh adapter, and '{m.id}' is continued "
            "from its trained weights. Fix: remove lora.init (default).")
    named = config.get("base_model_name_or_path")
    named_is_repo = isinstance(named, str) and bool(REPO_ID_RE.match(named))
    if m.base_id is not None and named_is_repo and m.base_id != named:
        raise errors.ProfileError(
            f"model.base_id: '{m.base_id}', but the adapter '{m.id}' was trained on "
            f"'{named}' (adapter_config.json). Fix: set model.base_id to {named} or remove "
            "it, or pick the adapter made for your base.")
    base_id = named if named_is_repo else m.base_id
    if base_id is None:
        raise errors.ProfileError(
            f"model.base_id: the adapter '{m.id}' names its base as {named!r}, not a Hub repo "
            "id (it was saved from a local folder). Fix: set model.base_id to the base's "
            "repo id, and model.base_revision to the commit it was trained on.")
    named_rev = config.get("revision")
    if named_rev and m.base_revision and named_rev != m.base_revision:
        pinned = [_commit_of(api, base_id, r) for r in (named_rev, m.base_revision)]
        if pinned[0] != pinned[1]:
            raise errors.ProfileError(
                f"model.base_revision: '{m.base_revision}' is commit {pinned[1]} of "
                f"{base_id}, and the adapter '{m.id}' was trained on {pinned[0]} "
                f"(revision '{named_rev}' in adapter_config.json). Fix: set "
                f"model.base_revision to {pinned[0]} or remove it.")
    base_revision = named_rev or m.base_revision or "main"
    source = ("adapter_config" if named_rev else
              "model.base_revision" if m.base_revision else "default")
    if m.trust_remote_code and not SHA_RE.match(base_revision):
        raise errors.ProfileError(
            f"model.base_revision: remote code of the base {base_id} runs only from a pinned "
            f"commit, and its revision is '{base_revision}'. Fix: set model.base_revision to "
            "a 40-hex commit sha, or model.trust_remote_code to false.")
    size = sum((s.size or 0) for s in info.siblings or []
               if any(fnmatch(s.rfilename, p) for p in ADAPTER_PATTERNS))
    return AdapterRef(repo_id=m.id, revision=m.revision, commit=info.sha, method=method,
                      base_id=base_id, base_revision=base_revision,
                      base_revision_from=source, config=config, download_bytes=size)


def _commit_of(api, repo_id: str, revision: str) -> str:
    from huggingface_hub import errors as hf

    try:
        return api.model_info(repo_id, revision=revision).sha
    except hf.HfHubHTTPError as exc:
        raise errors.translate_hub_error(exc, repo_id=repo_id, revision=revision,
                                         endpoint=settings.hub_endpoint()) from None


def check_adapter_shape(profile: Profile, adapter: AdapterRef, tensors,
                        config: Optional[dict] = None) -> None:
    """The lora section describes the adapter being continued (method, adapted modules
    resolved on the base's linear layers, r, alpha, …)."""
    from tasks.training.adapters import structure_mismatches

    linears = linear_modules(tensors, config, profile.model.task)
    names = [lin.name for lin in linears]
    heads = [lin.name for lin in linears if not lin.in_block]
    wrong = structure_mismatches(profile.lora, adapter.config, names, heads)
    if wrong:
        raise errors.ProfileError(
            f"lora: the profile describes another adapter than '{adapter.repo_id}'@"
            f"{adapter.commit[:12]}, which training continues as it is: "
            + "; ".join(wrong) + ". Fix: set those lora fields to the adapter's values.")


def run_preflight(profile: Profile) -> PreflightReport:
    """All checks, cheapest first. Raises a typed LoraflowError naming cause and fix."""
    gpus = devices.visible_gpus()
    check_loading_options(profile, gpus)
    api = hub_api()
    me = check_token(api)
    adapter = resolve_adapter(api, profile)
    model = resolve_model(api, profile, adapter)
    check_task(api, profile, model)
    dataset = resolve_dataset(api, profile)
    check_write_access(me, profile.publish.repo_id)
    check_disk(model.download_bytes + (adapter.download_bytes if adapter else 0))
    mem = check_memory(api, profile, model, gpus, adapter)
    return PreflightReport(user=me["name"], base_model=model, dataset=dataset,
                           target_repo=profile.publish.repo_id, memory=mem, adapter=adapter)


@task(name="preflight", **REPORT_HOOKS, **TRANSIENT_RETRIES)
def preflight(profile: Profile) -> PreflightReport:
    """Prefect task: run_preflight, never cached."""
    return run_preflight(profile)
