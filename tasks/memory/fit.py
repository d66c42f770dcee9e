"""Does a run fit the GPUs: placement, suggestions, fitting under training.memory_cap_gib,
and the plan preflight records."""
from __future__ import annotations

from typing import Callable, Optional

from profiles.schema import Profile
from tasks import errors
from tasks.contracts import CUDA_CONTEXT_BYTES, GiB, Gpu, MemoryEstimate, MemoryReport
from tasks.memory.devices import available_ram_bytes, parse_size, visible_gpus
from tasks.memory.estimate import (
    HEADROOM,
    MICRO_BATCH_COST_TOKENS,
    RECOMPUTE_COST,
    estimate_training_memory,
)
from tasks.memory.tensors import TensorSpecs
from tasks.training.speed import offloads_activations


class InsufficientMemoryError(errors.OutOfMemoryError):
    """Preflight: the run cannot fit the visible GPU memory at these settings."""


def _single_gpu_index(device_map) -> Optional[int]:
    """The GPU a placement puts everything on, or None when it spreads or uses the CPU."""
    if device_map is None or device_map == "cuda":
        return 0
    if isinstance(device_map, dict) and set(device_map) == {""}:
        v = device_map[""]
        if isinstance(v, int):
            return v
        if isinstance(v, str) and v.startswith("cuda"):
            return int(v.split(":")[1]) if ":" in v else 0
    return None


def place(profile: Profile, estimate: MemoryEstimate, gpus: list[Gpu],
          ram_bytes: Optional[int] = None) -> MemoryReport:
    """Compare the estimate with the devices the profile's device_map would use."""
    dm = profile.model.device_map
    if not gpus or dm == "cpu" or (isinstance(dm, dict) and set(map(str, dm.values()))
                                   <= {"cpu", "disk"}):
        return MemoryReport(estimate=estimate, placement="cpu", gpus=gpus)
    need = estimate.peak_bytes * (1 + HEADROOM)
    single = _single_gpu_index(dm)
    if single is not None:
        if single >= len(gpus):
            raise errors.ProfileError(
                f"model.device_map: GPU {single} is not visible (this process sees "
                f"{len(gpus)}). Fix: use an index below {len(gpus)}, or device_map auto.")
        gpu = gpus[single]
        return MemoryReport(estimate=estimate, placement=f"gpu:{single}",
                            capacity_bytes=gpu.usable_bytes, fits=need <= gpu.usable_bytes,
                            gpus=gpus)
    # Spread (auto, or a module map): the weights go over the GPUs (within max_memory),
    # then the CPU; everything else stays with the layers on a GPU.
    limits = {str(k): parse_size(v) for k, v in (profile.model.max_memory or {}).items()}
    named = None
    if isinstance(dm, dict):
        named = {int(v.split(":")[1]) if isinstance(v, str) and ":" in v else
                 (0 if v == "cuda" else v) for v in dm.values() if v not in ("cpu", "disk")}
    used = [g for g in gpus if named is None or g.index in named]
    caps = [min(g.usable_bytes, limits.get(str(g.index), g.usable_bytes)) for g in used]
    offload = dm == "auto" or (isinstance(dm, dict) and ("cpu" in dm.values()
                                                         or "disk" in dm.values()))
    cpu = 0
    if offload:
        ram = available_ram_bytes() if ram_bytes is None else ram_bytes
        cpu = min(ram, limits["cpu"]) if "cpu" in limits else ram
    if isinstance(dm, dict) and "disk" in dm.values():
        cpu = max(cpu, 1 << 62)  # disk offload: weights have somewhere to go
    rest = (estimate.peak_bytes - estimate.weights_bytes) * (1 + HEADROOM)
    fits = bool(caps) and rest <= max(caps) and need <= sum(caps) + cpu
    where = ",".join(f"gpu:{g.index}" for g in used) + (" (+cpu)" if cpu else "")
    return MemoryReport(estimate=estimate, placement=f"spread over {where}",
                        capacity_bytes=sum(caps) + min(cpu, 1 << 50), fits=fits, gpus=gpus)


def _variant(profile: Profile, **sections) -> Profile:
    update = {name: getattr(profile, name).model_copy(update=fields)
              for name, fields in sections.items()}
    return profile.model_copy(update=update)


def suggestions(profile: Profile, tensors: TensorSpecs, config: dict, gpus: list[Gpu],
                ram_bytes: Optional[int] = None, fused_loss: bool = False) -> list[str]:
    """Changes that would fit, each as the --set overrides to apply, with its estimate."""
    t = profile.training
    bf16_ok = all(g.bf16 for g in gpus)

    def fits(p: Profile) -> Optional[MemoryReport]:
        est = estimate_training_memory(p, tensors, config, on_gpu=True, bf16_ok=bf16_ok,
                                       fused_loss=fused_loss)
        rep = place(p, est, gpus, ram_bytes)
        return rep if rep.fits else None

    # Preference order: keep the model as it is, then quantize, then spread it out; the
    # first variant that fits in each family (same settings changed) is reported.
    quant_options = [{}] + ([{"mode": "nf4"}] if profile.quantization.mode == "none" else [])
    batches = []
    bs = t.per_device_batch_size
    while bs >= 1:
        batches.append(bs)
        bs //= 2
    candidates: list[tuple[list[str], Profile]] = []
    for quant in quant_options:
        for ckpt in sorted({t.gradient_checkpointing, True}):
            for bs in batches:
                if not quant and ckpt == t.gradient_checkpointing \
                        and bs == t.per_device_batch_size:
                    continue  # that is the profile itself
                accum = max(1, t.gradient_accumulation_steps * t.per_device_batch_size // bs)
                sets = [f"quantization.mode={quant['mode']}"] if quant else []
                if ckpt != t.gradient_checkpointing:
                    sets.append("training.gradient_checkpointing=true")
                if bs != t.per_device_batch_size:
                    sets += [f"training.per_device_batch_size={bs}",
                             f"training.gradient_accumulation_steps={accum}"]
                training = {"gradient_checkpointing": ckpt, "per_device_batch_size": bs,
                            "gradient_accumulation_steps": accum}
                candidates.append((sets, _variant(profile, training=training,
                                                  **({"quantization": quant} if quant
                                                     else {}))))
    if _single_gpu_index(profile.model.device_map) is not None and len(gpus) > 1:
        candidates.append((["model.device_map=auto"],
                           _variant(profile, model={"device_map": "auto"})))
    out, families = [], set()
    for sets, variant in candidates:
        family = frozenset(s.split("=")[0] for s in sets)
        lever = family & {"quantization.mode", "model.device_map"}
        if lever:
            family = frozenset(lever)  # the first (largest-batch) fit of that lever only
        if family in families or (not lever and any(f < family for f in families)):
            continue  # a simpler change already fits
        rep = fits(variant)
        if rep is not None:
            families.add(family)
            out.append(f"--set {' --set '.join(sets)} (estimated "
                       f"{rep.estimate.peak_bytes / GiB:.1f} GiB)")
    return out[:4]


def step_cost(tokens: int, micro_batches: int, checkpointed: int, layers: int) -> float:
    """A training step's relative time (see RECOMPUTE_COST, MICRO_BATCH_COST_TOKENS)."""
    return (micro_batches * MICRO_BATCH_COST_TOKENS
            + tokens * (1 + RECOMPUTE_COST * checkpointed / layers))


def fit_to_cap(profile: Profile, tensors: TensorSpecs, config: dict, on_gpu: bool,
               bf16_ok: bool = True, processes: int = 1, fused_loss: bool = False) -> dict:
    """The training fields that keep the estimate under training.memory_cap_gib at the
    same global batch (each of `processes` training processes takes its share): of every
    per-device batch that divides it, with as few checkpointed layers as fit, the one
    step_cost ranks fastest — fewer, larger micro-batches against less recomputation.

    Raises:
        InsufficientMemoryError: nothing fits, not even one example with every layer
            checkpointed.
    """
    t = profile.training
    cap = t.memory_cap_gib * GiB
    total = (t.global_batch_size // processes if t.global_batch_size
             else t.per_device_batch_size * t.gradient_accumulation_steps)
    batches = [b for b in range(total, 0, -1) if total % b == 0]
    layers = estimate_training_memory(profile, tensors, config, on_gpu, bf16_ok).layers
    tokens = total * profile.data.max_length
    # Offloaded checkpointing (tasks.training.offload) only when nothing fits without it:
    # it costs copies; one process on a GPU, and not where compiled layers would
    # checkpoint inside their forward.
    can_offload = on_gpu and processes == 1 and offloads_activations(_variant(
        profile, training={"gradient_checkpointing": True, "offload_activations": True}),
        on_gpu, processes)
    for offload in (False, True) if can_offload else (False,):
        fitting = []  # (cost, fields) of the fewest checkpointed layers that fit, per batch
        for batch in batches:
            for count in range(1 if offload else 0, layers + 1):
                fields = {"per_device_batch_size": batch, "gradient_checkpointing": count > 0,
                          "checkpoint_layers": count if 0 < count < layers else None}
                if t.global_batch_size is None:
                    fields["gradient_accumulation_steps"] = total // batch
                if offload:
                    fields["offload_activations"] = True
                trial = _variant(profile, training=fields)
                if estimate_training_memory(trial, tensors, config, on_gpu, bf16_ok,
                                            fused_loss).peak_bytes <= cap:
                    fitting.append((step_cost(tokens, total // batch, count, layers), fields))
                    break
        if fitting:
            return min(fitting, key=lambda found: found[0])[1]
    raise InsufficientMemoryError(
        f"training.memory_cap_gib: even one example per step with every layer checkpointed "
        f"{'and its input offloaded to CPU memory ' if can_offload else ''}"
        f"needs more than {t.memory_cap_gib} GiB. Fix: raise the cap, quantize "
        "(quantization.mode nf4) or shorten data.max_length.")


def choose_data_parallel(profile: Profile, report: MemoryReport, processes: int,
                         fsdp_estimate: Callable[[], MemoryEstimate]) -> MemoryReport:
    """The data-parallel engine for `processes` processes, and why (training.data_parallel).

    auto: DDP when a full copy — the (4-bit or 16-bit) weights plus one process's adapter,
    optimizer and activations, `report.estimate` — fits one GPU: every rank holds its own
    copy and a step exchanges only the adapter's gradients. FSDP only when it does not: it
    shards the frozen weights over the processes and all-gathers them in every forward and
    backward (measured 0.61× one GPU for an 8B QLoRA that fits one H200, docs/benchmarks.md),
    so it buys memory, not speed. Without GPUs to compare (CPU, gloo), DDP.

    Args:
        profile: the profile (training.data_parallel: auto | ddp | fsdp).
        report: the single-process plan (place()), its estimate with Liger where DDP runs it.
        processes: how many processes train (> 1).
        fsdp_estimate: the estimate as FSDP runs it (without Liger), computed on demand.
    Returns:
        The report with data_parallel, data_parallel_reason and, under FSDP, `fits` for
        one process's shard.
    """
    engine, full = profile.training.data_parallel, report.estimate
    cap = report.capacity_bytes
    if engine == "ddp" or (engine == "auto" and report.fits is not False):
        if engine == "ddp":
            why = "training.data_parallel: ddp, the profile's choice"
        elif report.fits:
            why = (f"auto: a full copy per process fits one GPU ({full.peak_bytes / GiB:.1f} of "
                   f"{cap / GiB:.1f} GiB usable), so DDP: no weight all-gathers, each step "
                   "exchanges only the adapter's gradients")
        else:
            why = "auto: no GPU memory to compare, so DDP (each process holds a full copy)"
        return report.model_copy(update={"data_parallel": "ddp", "data_parallel_reason": why})
    sharded = fsdp_estimate()
    shard = sharded.peak_bytes - sharded.weights_bytes * (processes - 1) // processes
    fits = report.fits if cap is None else shard * (1 + HEADROOM) <= cap
    if engine == "fsdp":
        why = "training.data_parallel: fsdp, the profile's choice"
    else:
        why = (f"auto: a full copy needs {full.peak_bytes / GiB:.1f} GiB, more than one GPU's "
               f"{cap / GiB:.1f} GiB usable, so FSDP shards the weights over {processes} "
               f"processes (about {shard / GiB:.1f} GiB each)")
    return report.model_copy(update={"data_parallel": "fsdp", "data_parallel_reason": why,
                                     "fits": fits})


def plan_memory(profile: Profile, tensors: TensorSpecs, config: dict,
                gpus: Optional[list[Gpu]] = None, ram_bytes: Optional[int] = None
                ) -> MemoryReport:
    """Estimate, compare with the visible GPUs, and refuse a run that cannot fit.

    Raises:
        InsufficientMemoryError: naming the estimate, the capacity and the changes
            (each as --set overrides) that would fit.
    """
    from tasks.training.launch import resolve_launcher
    from tasks.training.speed import liger_expected

    gpus = visible_gpus() if gpus is None else gpus
    on_gpu = bool(gpus) and profile.model.device_map != "cpu"
    bf16_ok = all(g.bf16 for g in gpus) if gpus else True
    processes = resolve_launcher(profile.training, len(gpus), profile.model.device_map)[1]
    forced_fsdp = processes > 1 and profile.training.data_parallel == "fsdp"
    if forced_fsdp and not on_gpu:
        raise errors.ProfileError(
            "training.data_parallel: fsdp shards the weights over GPUs, and none is visible "
            "here (nvidia-smi) or model.device_map is cpu. Fix: set training.data_parallel "
            "to ddp or auto, or run on GPUs.")
    fused_loss = liger_expected(profile, on_gpu, processes, config.get("model_type"),
                                sharded=forced_fsdp)
    chosen = None
    if profile.training.memory_cap_gib is not None:
        chosen = fit_to_cap(profile, tensors, config, on_gpu, bf16_ok, processes, fused_loss)
        profile = _variant(profile, training=chosen)
    estimate = estimate_training_memory(profile, tensors, config, on_gpu=on_gpu,
                                        bf16_ok=bf16_ok, fused_loss=fused_loss)
    report = place(profile, estimate, gpus, ram_bytes)
    report.training = chosen
    if processes > 1:
        report = choose_data_parallel(profile, report, processes, lambda: (
            estimate_training_memory(profile, tensors, config, on_gpu=on_gpu, bf16_ok=bf16_ok,
                                     fused_loss=False)))
    if report.fits is False:
        fixes = suggestions(profile, tensors, config, gpus, ram_bytes, fused_loss)
        fix = ("Fix, any of: " + "; ".join(fixes)) if fixes else (
            "Fix: none of gradient checkpointing, a smaller batch, nf4 or device_map auto "
            "fits; use a GPU with more memory or a shorter data.max_length.")
        raise InsufficientMemoryError(
            f"training.per_device_batch_size / quantization.mode: this run needs about "
            f"{estimate.describe()}, more than {report.placement} can hold "
            f"({(report.capacity_bytes or 0) / GiB:.1f} GiB usable after "
            f"{CUDA_CONTEXT_BYTES / GiB:.0f} GiB for the CUDA context and "
            f"{HEADROOM:.0%} headroom). {fix}")
    return report
