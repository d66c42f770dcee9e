"""train_adapter: load the base, inject LoRA, train with transformers' Trainer.

The model is loaded and the adapter injected *inside* the task: GPU objects never
cross a task boundary. Everything lands in a run directory keyed by the training's
cache key (LORAFLOW_HOME/runs/<key>/): checkpoints, the adapter, the initial adapter
weights (to prove every tensor moved), metrics and the lineage record. A re-run after
a crash finds the checkpoints there and resumes.

Never lose work: a checkpoint every `training.save_steps`; a retry, or a re-run after
the process was killed, resumes from the last complete checkpoint (weights, optimizer,
scheduler, RNG and data position, through Trainer's resume_from_checkpoint; a
checkpoint cut short by the kill is skipped). SIGTERM — a cancel from the Prefect UI,
a pod eviction — or Ctrl-C finishes the current step, saves a checkpoint and raises
TrainingInterrupted; a second signal acts at once. Each attempt appends what it did to
`train_log.jsonl` in the run directory (start, steps, checkpoints, stop).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from prefect import task

from profiles.schema import Profile
from tasks import errors, settings
from tasks.cache.keys import cache_key, code_inputs
from tasks.cache.manifest import (
    changed_files,
    read_manifest,
    sha256_file,
    write_manifest,
)
from tasks.contracts import (
    ADAPTER_FILES,
    RECORD,
    DatasetManifest,
    PreflightReport,
    SnapshotManifest,
    TrainResult,
)
from tasks.data.chat import resolve_chat_template
from tasks.retry import TRANSIENT_RETRIES
from tasks.training.adapters import adapter_weights_path
from tasks.training.launch import (
    accumulation_steps,
    resolve_launcher,
    run_torchrun,
    world,
)

# Record fields that belong to one execution, not to what the key says: the only parts of
# a run directory's training outputs that differ between two runs with one key (with
# train_log.jsonl, the per-attempt log). Everything else is a function of the key.
PER_RUN_FIELDS = ("flow_run_id", "flow_run_url", "metrics.train_runtime_s",
                  "metrics.peak_gpu_mem_gib", "metrics.resumed_from")
PER_RUN_FILES = ("train_log.jsonl",)  # STEP_LOG
STEP_LOG = "train_log.jsonl"
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
# Checkpointing knobs: they change when state is saved, not what is learned (a resumed
# run matches an uninterrupted one), so changing them must not retrain.
# How many processes run it is left out too: global_batch_size keeps the training the
# same on 1 or N GPUs.
NOT_IN_KEY = {"save_steps", "save_total_limit", "launcher", "nproc_per_node"}


def train_inputs(profile: Profile, snapshot: SnapshotManifest, dataset: DatasetManifest) -> dict:
    """What keys a training: base repo@commit and every file's sha256, the prepared
    dataset's key, the model/quantization/lora/training settings and this step's code.
    Left out on purpose: the publish section (where an adapter goes must not retrain
    it, and nothing of it is in the outputs either), model.revision (the commit says it
    without moving), checkpoint cadence.
    A continued adapter (model.id is an adapter repo) keys by its repo@commit and files."""
    inputs = {"base": {"repo_id": snapshot.repo_id, "commit": snapshot.commit,
                       "files": snapshot.file_hashes()},
              "dataset": dataset.key,
              "model": profile.model.model_dump(mode="json",
                                                exclude={"revision", "base_revision"}),
              "quantization": profile.quantization.model_dump(mode="json"),
              "lora": profile.lora.model_dump(mode="json"),
              "training": profile.training.model_dump(mode="json", exclude=NOT_IN_KEY),
              "code": code_inputs("tasks.train")}
    if snapshot.adapter is not None:
        inputs["adapter"] = {"repo_id": snapshot.adapter.repo_id,
                             "commit": snapshot.adapter.commit,
                             "files": snapshot.adapter.file_hashes()}
    return inputs


def train_key(profile: Profile, snapshot: SnapshotManifest, dataset: DatasetManifest,
              **_) -> str:
    return cache_key("train", train_inputs(profile, snapshot, dataset))


def run_dir_for(key: str) -> Path:
    return settings.loraflow_home() / "runs" / key


def _in_result(rel: str) -> bool:
    # The manifest covers what a cache hit hands on, not the (changing) checkpoints. The
    # card, lineage and loss curve are not training outputs: publishing renders them.
    return rel.startswith("adapter/") or rel == RECORD


def _log_losses(log_history: list[dict]) -> tuple[list[dict], Optional[float]]:
    losses = [{"step": h["step"], "loss": h["loss"]} for h in log_history if "loss" in h]
    evals = [h["eval_loss"] for h in log_history if "eval_loss" in h]
    return losses, (evals[-1] if evals else None)


def _adapter_weights(model) -> dict:
    """The adapter's tensors, named as in adapter_model.safetensors, copied to CPU."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: a targeted lm_head's frozen base weight is not part of
    # the saved adapter (peft's "auto" would add it, and ask the Hub for the base config).
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _replicas_agree(model) -> bool:
    """Whether every process's adapter weights hash the same (all ranks must call it)."""
    import hashlib

    import torch.distributed as dist

    digest = hashlib.sha256()
    for name, tensor in sorted(_adapter_weights(model).items()):
        digest.update(name.encode())
        digest.update(tensor.float().numpy().tobytes())
    hashes = [None] * dist.get_world_size()
    dist.all_gather_object(hashes, digest.hexdigest())
    return len(set(hashes)) == 1


def _unchanged_tensors(adapter_dir: Path, initial: dict) -> list[str]:
    """Adapter tensors whose saved value equals their initial value."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return [k for k, v in initial.items() if torch.equal(v, saved[k].to(v.dtype))]


def _library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "datasets", "prefect",
                 "huggingface_hub", "loraflow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _flow_run_url(flow_run_id: Optional[str]) -> Optional[str]:
    """The run's page in the Prefect UI, when a server with a UI is configured."""
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui and flow_run_id else None


def _hardware() -> dict:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"gpus": gpus, "cpu": platform.processor() or platform.machine(),
            "platform": platform.platform()}


def build_trainer(profile: Profile, model, tokenizer, dataset: DatasetManifest, out: Path):
    """transformers.Trainer with the profile's TrainingArguments (the one mapping)."""
    import datasets
    import torch
    from transformers import Trainer, TrainingArguments

    from tasks.model_tasks import data_collator

    t = profile.training
    train_ds = datasets.load_from_disk(str(Path(dataset.path) / "train"))
    eval_path = Path(dataset.path) / "eval"
    eval_ds = datasets.load_from_disk(str(eval_path)) if eval_path.exists() else None
    dtype = next(model.parameters()).dtype
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        learning_rate=t.learning_rate,
        max_steps=t.max_steps or -1,
        num_train_epochs=t.num_epochs,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=accumulation_steps(t, world()[2]),
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        # Under FSDP, its own activation checkpointing replaces the Trainer's.
        gradient_checkpointing=t.gradient_checkpointing and not uses_fsdp(profile),
        gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if (eval_ds is not None and t.eval_steps) else "no",
        eval_steps=t.eval_steps,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        seed=t.seed,
        data_seed=t.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=world()[0] != 0,
        **({} if t.optimizer == "auto" else {"optim": t.optimizer}),  # auto: fused AdamW
        **_distributed_arguments(profile, model),
    )
    from tasks.training.speed import compile_decoder_layers, use_torch_compile

    if use_torch_compile(profile, torch.cuda.is_available(), world()[2]):
        compile_decoder_layers(model)
    collator = data_collator(profile.model.task, tokenizer, model)  # labels padded with -100
    if t.packing:
        from tasks.training.packing import PackingCollator

        collator = PackingCollator(profile.data.max_length, tokenizer.pad_token_id)
    from tasks.training.progress import TrainingProgress
    callbacks = [TrainingProgress(out.name)]  # the run directory is named by the train key
    if args.gradient_checkpointing and t.checkpoint_layers is not None:
        from tasks.training.speed import partial_checkpointing_callback

        callbacks.append(partial_checkpointing_callback(t.checkpoint_layers))
    return Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                   data_collator=collator, callbacks=callbacks), eval_ds


def uses_fsdp(profile: Profile) -> bool:
    """4-bit QLoRA over several processes shards with FSDP (the quantized weights are
    stored as quantization.quant_storage so they can be flattened); 16/32-bit LoRA uses
    DDP, whose replicas are cheap next to the activations."""
    return world()[2] > 1 and profile.quantization.mode in ("nf4", "fp4")


def _distributed_arguments(profile: Profile, model) -> dict:
    if world()[2] == 1:
        return {}
    if not uses_fsdp(profile):
        # LoRA leaves most parameters frozen: no unused-parameter search each step.
        return {"ddp_find_unused_parameters": False}
    layer_cls = type(model.get_base_model().model.layers[0]).__name__
    # FSDP1, not transformers' default FSDP2: bitsandbytes documents FSDP2 losing the
    # 4-bit quant state, while FSDP1 with a float quant storage dtype is its tested QLoRA
    # path (the run record says "fsdp1").
    return {"fsdp": "full_shard auto_wrap",
            "fsdp_config": {"version": 1, "transformer_layer_cls_to_wrap": [layer_cls],
                            "backward_prefetch": "backward_pre", "forward_prefetch": False,
                            "use_orig_params": False, "sync_module_states": True,
                            "cpu_ram_efficient_loading": True,
                            "activation_checkpointing": profile.training.gradient_checkpointing,
                            "state_dict_type": "FULL_STATE_DICT"}}


def _checkpoint_complete(path: Path, step: int) -> bool:
    """Trainer writes trainer_state.json last: a checkpoint is complete when it parses
    and names this step, and the weights, optimizer and scheduler are there."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    has_weights = any((path / n).is_file() for n in ("adapter_model.safetensors",
                                                     "model.safetensors")) \
        or adapter_weights_path(path) is not None  # a named adapter: in its sub-folder
    return (state.get("global_step") == step and has_weights
            and all((path / n).is_file() for n in CHECKPOINT_FILES))


def _last_checkpoint(out: Path, prune: bool = True) -> Optional[str]:
    """The newest complete checkpoint; newer ones cut short by a kill are removed with
    `prune` (the run saves under those names again)."""
    ckpt_dir = out / "checkpoints"
    if not ckpt_dir.is_dir():
        return None
    found = []
    for p in ckpt_dir.iterdir():
        name, _, step = p.name.partition("-")
        if p.is_dir() and name == "checkpoint" and step.isdigit():
            found.append((int(step), p))
    for step, path in sorted(found, reverse=True):
        if _checkpoint_complete(path, step):
            return str(path)
        if prune:
            shutil.rmtree(path, ignore_errors=True)
    return None


class _StepLog:
    """Appends one JSON line per event of this attempt to the run's train_log.jsonl."""

    def __init__(self, path: Path, resume_from: int):
        self.path, self.attempt = path, uuid.uuid4().hex[:12]
        self.file = open(path, "a", buffering=1)
        self.write("start", resume_from, resume_from=resume_from)

    def write(self, event: str, step: int, **extra) -> None:
        self.file.write(json.dumps({"event": event, "step": step, "attempt": self.attempt,
                                    "pid": os.getpid(), "time": round(time.time(), 3),
                                    **extra}) + "\n")

    def close(self) -> None:
        self.file.close()


def read_step_log(run_dir: Path) -> list[dict]:
    """The events of every attempt, oldest first (see _StepLog)."""
    path = Path(run_dir) / STEP_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _StopRequest:
    signum: Optional[int] = None


@contextmanager
def _stop_on_signals(stop: _StopRequest):
    """While training: SIGTERM or SIGINT asks for a checkpoint and a stop at the end of
    the current step (see _training_callback). The previous handlers — Prefect's
    SIGTERM bridge, Python's KeyboardInterrupt — come back at once, so a second signal
    acts as it would have without us. Signals can only be caught on the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        stop.signum = signum
        signal.signal(signum, previous.get(signum) or signal.SIG_DFL)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, old if old is not None else signal.SIG_DFL)


def _training_callback(stop: _StopRequest, steps: _StepLog):
    from transformers import TrainerCallback

    class SaveAndStop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.write("step", state.global_step)
            if stop.signum is not None:
                control.should_save = True
                control.should_training_stop = True
            if control.should_save:
                # Log at every checkpoint: the checkpoint's log history then accounts for
                # every step's loss up to it, so a resumed run can report the mean loss
                # over all steps (_mean_train_loss), not only those after the resume.
                control.should_log = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                steps.write("loss", state.global_step, loss=logs["loss"])

        def on_save(self, args, state, control, **kwargs):
            steps.write("checkpoint", state.global_step)

    return SaveAndStop()


def _finished_checkpoint(resume: Optional[str]) -> Optional[dict]:
    """The checkpoint's trainer state when it is the last step of the run, else None."""
    if resume is None:
        return None
    state = json.loads((Path(resume) / "trainer_state.json").read_text())
    done = state.get("max_steps") and state["global_step"] >= state["max_steps"]
    return state if done else None


def _restore_finished(trainer, model, resume: str, state: dict):
    """Load a final checkpoint's adapter weights and trainer state; a TrainOutput whose
    training_loss is the step-weighted mean of the logged losses."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    set_peft_model_state_dict(model, load_file(str(adapter_weights_path(Path(resume)))),
                              adapter_name=model.active_adapter)
    trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
    total, last = 0.0, 0
    for h in trainer.state.log_history:
        if "loss" in h:
            total, last = total + h["loss"] * (h["step"] - last), h["step"]
    return TrainOutput(trainer.state.global_step, total / last if last else 0.0, {})


def _mean_train_loss(result, resumed_at: int, log_history: list[dict]) -> float:
    """The mean loss over every step of the run, resumed or not.

    transformers' TrainOutput.training_loss averages only the steps this attempt ran.
    The steps before the resume are taken from the checkpoint's log history: each logged
    loss is the mean over the steps since the previous log, and a log is forced at every
    checkpoint (_training_callback), so those logs cover steps 1..resumed_at exactly.
    """
    if not resumed_at:
        return result.training_loss
    total, last = 0.0, 0
    for h in log_history:
        if "loss" in h and last < h["step"] <= resumed_at:
            total, last = total + h["loss"] * (h["step"] - last), h["step"]
    after = result.global_step - resumed_at
    steps = last + after
    return (total + result.training_loss * after) / steps if steps else result.training_loss


def _save_tokenizer(tokenizer, adapter_dir: Path, chat_template: Optional[str],
                    padding_side: str) -> dict:
    """Save the tokenizer as training used it next to the adapter, so the adapter repo
    loads on its own (AutoTokenizer / pipeline(model=adapter_repo)) with the pad token
    training chose (EOS where the base has none) and the chat template the data was
    rendered with. The padding side saved is the base tokenizer's (data.padding_side is
    a training choice; generation wants the base's). transformers' save_pretrained
    writes the files; the record lists them, so publishing sends exactly these.

    Returns:
        The record's "tokenizer" entry: files, pad token and id, chat template sha256.
    """
    import hashlib

    trained_side = tokenizer.padding_side
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.padding_side = padding_side
    try:
        saved = tokenizer.save_pretrained(str(adapter_dir))
    finally:
        tokenizer.padding_side = trained_side
    names = sorted({Path(f).name for f in saved if Path(f).is_file()}
                   - set(ADAPTER_FILES))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return {"files": names, "pad_token": tokenizer.pad_token,
            "pad_token_id": tokenizer.pad_token_id, "padding_side": padding_side,
            "chat_template_sha256": template and hashlib.sha256(template.encode()).hexdigest()}


def _dataset_counts(dataset: DatasetManifest) -> dict:
    """What the dataset step read, dropped (reason → rows) and truncated, for the run
    summary and the card."""
    return {"rows_read": dataset.rows_read, "dropped": dict(dataset.dropped),
            "truncated": dataset.truncated}


def _adopt(out: Path) -> Optional[TrainResult]:
    """The result of a finished, unchanged run directory (its cache record was lost,
    e.g. another result storage), without importing torch."""
    manifest = read_manifest(out)
    if manifest is None or changed_files(out, manifest) != []:
        return None
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        return None
    adapter = record["adapter"]
    return TrainResult(run_dir=str(out), adapter_dir=str(out / "adapter"),
                       adapter_sha256=adapter["sha256"],
                       trainable_params=adapter["trainable_params"],
                       total_params=adapter["total_params"], metrics=record["metrics"])


WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _save_gathered_adapter(model, full_state: dict, initial: dict, adapter_dir: Path) -> None:
    """Write the adapter from FSDP's gathered full state dict, as save_pretrained would.

    The gathered names carry FSDP / activation-checkpoint wrapper segments and the
    adapter name; each adapter tensor (named as in `initial`, i.e. as peft saves it) is
    found by its name with those removed. A name that cannot be found is an error that
    shows both sides, instead of an adapter with tensors missing.
    """
    from safetensors.torch import save_file

    name = model.active_adapter
    cleaned = {}
    for key, value in full_state.items():
        for segment in WRAPPER_SEGMENTS:
            key = key.replace(segment, "")
        cleaned[key.replace(f".{name}.", ".")] = value
    missing = [k for k in initial if k not in cleaned]
    if missing:
        sample = [k for k in cleaned if "lora" in k][:3] or list(cleaned)[:3]
        raise errors.TrainingError(
            f"the gathered FSDP state dict lacks {len(missing)} adapter tensors (e.g. "
            f"{missing[0]}); it has names like {sample}. Fix: report this with the log; "
            "train on one GPU (training.launcher single) meanwhile.")
    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: cleaned[k].detach().cpu().contiguous() for k in initial},
              str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = model.peft_config[name]
    config.inference_mode = True
    config.save_pretrained(str(adapter_dir))


def with_memory_plan(profile: Profile, preflight: PreflightReport) -> Profile:
    """The profile with the batch and checkpointing preflight chose under
    training.memory_cap_gib (tasks/memory/ fit_to_cap); the profile itself otherwise.
    The cache key stays that of the profile as given: the choice follows from it."""
    plan = preflight.memory.training if preflight.memory else None
    if not plan:
        return profile
    return profile.model_copy(update={"training": profile.training.model_copy(update=plan)})


def run_train(profile: Profile, preflight: PreflightReport, snapshot: SnapshotManifest,
              dataset: DatasetManifest, flow_run_id: Optional[str] = None) -> TrainResult:
    """Train the adapter into LORAFLOW_HOME/runs/<key>/, resuming from a checkpoint.

    Raises:
        TrainingInterrupted: SIGTERM/SIGINT arrived; a checkpoint was saved first.
        OutOfMemoryError, TrainingError: as named.
    """
    key = train_key(profile, snapshot, dataset)
    out = run_dir_for(key)
    adopted = _adopt(out)
    if adopted is not None:
        return adopted
    given, profile = profile, with_memory_plan(profile, preflight)
    rank, local_rank, world_size = world()
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, set_seed

    from tasks.model_tasks import prepare_tokenizer
    from tasks.training.adapters import (
        adapter_notes,
        converts_on_save,
        name_base,
        save_adapter,
        save_initial_adapter,
        unchanged_tensors,
    )
    from tasks.training.modeling import inject_adapter, load_base_model
    from tasks.training.speed import apply_liger, use_liger

    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        # What keyed this run, readable while it is partial (`loraflow cache ls`).
        (out / "inputs.json").write_text(json.dumps(train_inputs(given, snapshot, dataset),
                                                    indent=1, sort_keys=True))
    set_seed(profile.training.seed)
    # pad = EOS only where the tokenizer has no pad token; data.padding_side applied.
    tokenizer = AutoTokenizer.from_pretrained(snapshot.local_dir)
    base_padding_side = tokenizer.padding_side
    tokenizer = prepare_tokenizer(tokenizer, profile.data.padding_side)
    model_section = profile.model
    if world_size > 1 and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        if profile.quantization.mode != "none":
            # bitsandbytes quantizes at load: each rank loads onto its own GPU.
            model_section = model_section.model_copy(update={"device_map": {"": local_rank}})
    sharded = uses_fsdp(profile)
    quant = profile.quantization
    if sharded and quant.quant_storage == "uint8":
        # FSDP shards 4-bit weights only when they are stored in a float dtype; the
        # storage dtype does not change the numbers, so the compute dtype is used.
        quant = quant.model_copy(update={"quant_storage": quant.compute_dtype})
    base = load_base_model(model_section, quant, snapshot.local_dir, labels=dataset.labels)
    # Liger's fused cross-entropy multiplies by the whole lm_head weight, which FSDP holds
    # sharded: FSDP runs without Liger.
    liger = use_liger(profile, base.config.model_type) and not sharded
    if liger:
        apply_liger(base)
    continued = snapshot.adapter  # model.id is an adapter repo: train it on, not a fresh one
    model = inject_adapter(base, profile.lora, quant,
                           profile.training.gradient_checkpointing and not sharded, sharded,
                           task=profile.model.task,
                           continue_from=continued.local_dir if continued else None)
    # pissa / olora: the adapter as initialised, which the saved one is converted against.
    init_peft = out / "adapter_init_peft" if converts_on_save(profile.lora) else None
    if init_peft is not None and rank == 0 and not (init_peft / "adapter_config.json").exists():
        save_initial_adapter(model, profile.lora, init_peft)
    init_path = out / "adapter_init.safetensors"
    initial = _adapter_weights(model)
    if not init_path.exists():
        if rank == 0:
            save_file(initial, str(init_path))
    else:  # resuming: the "before" weights are those of the first attempt
        initial = load_file(str(init_path))
    trainable, total = model.get_nb_trainable_parameters()

    trainer, eval_ds = build_trainer(profile, model, tokenizer, dataset, out)
    resume = _last_checkpoint(out, prune=rank == 0)
    stop = _StopRequest()
    log_name = STEP_LOG if rank == 0 else f"train_log.rank{rank}.jsonl"
    steps = _StepLog(out / log_name, int(Path(resume).name.split("-")[1]) if resume else 0)
    trainer.add_callback(_training_callback(stop, steps))
    try:
        finished = _finished_checkpoint(resume)
        if finished is not None:
            # Killed after the last checkpoint, before the adapter was saved: Trainer
            # would train one step too many from here, so take the weights as they are.
            result = _restore_finished(trainer, model, resume, finished)
        else:
            if torch.cuda.is_available():  # peak memory of training, weights included
                torch.cuda.reset_peak_memory_stats()
            with _stop_on_signals(stop):
                result = trainer.train(resume_from_checkpoint=resume)
        if stop.signum is not None:
            import signal

            name = signal.Signals(stop.signum).name
            steps.write("interrupted", trainer.state.global_step, signal=name)
            raise errors.TrainingInterrupted(
                f"training stopped by {name} at step {trainer.state.global_step} of "
                f"{trainer.state.max_steps}; a checkpoint was saved in {out / 'checkpoints'}. "
                "Fix: run the same profile again: it resumes from that step.")
        steps.write("end", trainer.state.global_step)
    except torch.OutOfMemoryError:
        raise errors.OutOfMemoryError(
            "out of memory while training. Fix: lower training.per_device_batch_size, "
            "turn on training.gradient_checkpointing, or quantize (quantization.mode nf4)."
        ) from None
    finally:
        steps.close()
    eval_metrics = trainer.evaluate() if eval_ds is not None else {}
    resumed_at = int(Path(resume).name.split("-")[1]) if resume else 0

    adapter_dir = out / "adapter"
    name_base(model, profile.lora.adapter_name, snapshot.repo_id, snapshot.commit)
    if uses_fsdp(profile):
        # Every rank joins the gather of the sharded weights; rank 0 saves them.
        full_state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if rank == 0:
            _save_gathered_adapter(model, full_state, initial, adapter_dir)
    elif rank == 0:
        save_adapter(model, adapter_dir, profile.lora.adapter_name,
                     initial=str(init_peft) if init_peft else None)
    distributed = None
    if world_size > 1:
        # Say which engine ran; under DDP every rank must hold the adapter rank 0 saved.
        distributed = {"world_size": world_size, "strategy": "fsdp1" if sharded else "ddp",
                       "replicas_identical": None if sharded else _replicas_agree(model)}
        if distributed["replicas_identical"] is False:
            raise errors.TrainingError(
                "the DDP ranks finished with different adapter weights. Fix: report this "
                "with the log; train on one GPU (training.launcher single) meanwhile.")
    if rank != 0:
        return None  # rank 0 writes the record; the parent reads it from the run dir
    # A converted (pissa / olora) adapter is saved with other shapes: compare the
    # trained tensors themselves.
    unchanged = (unchanged_tensors(_adapter_weights(model), initial) if init_peft
                 else _unchanged_tensors(adapter_dir, initial))
    if unchanged:
        raise errors.TrainingError(
            f"{len(unchanged)} LoRA tensors did not change during training (e.g. "
            f"{unchanged[0]}): the adapter learned nothing. Fix: check the learning rate and "
            "data; on CPU, 4-bit bitsandbytes weights stop passing gradients after an "
            "evaluation forward — use quantization.mode int8 or none there.")

    # peft's save writes a stub README.md naming the local download folder: the card is
    # rendered at publish time, and the training's outputs must not depend on where they are.
    (adapter_dir / "README.md").unlink(missing_ok=True)
    tokenizer_entry = _save_tokenizer(tokenizer, adapter_dir,
                                      resolve_chat_template(profile.data, tokenizer),
                                      base_padding_side)
    losses, eval_loss = _log_losses(trainer.state.log_history)
    train_loss = (result.training_loss if finished is not None
                  else _mean_train_loss(result, resumed_at, trainer.state.log_history))
    metrics = {"train_loss": train_loss, "first_loss": losses[0]["loss"],
               "last_loss": losses[-1]["loss"], "eval_loss": eval_metrics.get("eval_loss",
                                                                               eval_loss),
               "steps": trainer.state.global_step, "resumed_from": resume and Path(resume).name,
               "train_runtime_s": result.metrics.get("train_runtime"),
               "peak_gpu_mem_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                    if torch.cuda.is_available() else None)}
    adapter_sha = sha256_file(adapter_dir / "adapter_model.safetensors")
    record = {
        "train_key": key, "flow_run_id": flow_run_id, "flow_run_url": _flow_run_url(flow_run_id),
        # Without the publish section: where the adapter goes is said at publish time.
        "profile": given.model_dump(mode="json", exclude={"publish"}),
        "memory_plan": preflight.memory.training if preflight.memory else None,
        "base_model": {"repo_id": snapshot.repo_id, "commit": snapshot.commit,
                       "license": preflight.base_model.license,
                       "files": snapshot.file_hashes()},
        "dataset": {**preflight.dataset.model_dump(mode="json"), "prepared_key": dataset.key,
                    "num_train": dataset.num_train, "num_eval": dataset.num_eval,
                    "labels": dataset.labels, **_dataset_counts(dataset)},
        "adapter": {"sha256": adapter_sha, "trainable_params": trainable,
                    "total_params": total,
                    # Card sentences: lm_head / tied embeddings / modules_to_save cost.
                    "notes": adapter_notes(model, profile.lora) or None},
        "tokenizer": tokenizer_entry,
        "continued_from": continued and {
            "repo_id": continued.repo_id, "commit": continued.commit,
            "files": continued.file_hashes(),
            "base_revision_from": preflight.adapter and preflight.adapter.base_revision_from},
        "metrics": metrics, "loss_history": losses,
        "versions": _library_versions(), "hardware": _hardware(),
        "distributed": distributed,
        # The speed levers as this run resolved them ("auto" in the profile).
        "speed": {"liger_kernel": liger, "torch_compile": any(
            getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())},
    }
    (out / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
    write_manifest(out, {"step": "train", "inputs": train_inputs(given, snapshot, dataset)},
                   include=_in_result)
    return TrainResult(run_dir=str(out), adapter_dir=str(adapter_dir), adapter_sha256=adapter_sha,
                       trainable_params=trainable, total_params=total, metrics=metrics)


def train_is_cached_and_intact(profile, snapshot, dataset, **_) -> bool:
    return changed_files(run_dir_for(train_key(profile, snapshot, dataset))) == []


@task(name="train", **TRANSIENT_RETRIES)
def train_adapter(profile: Profile, preflight: PreflightReport, snapshot: SnapshotManifest,
                  dataset: DatasetManifest, flow_run_id: Optional[str] = None) -> TrainResult:
    """Prefect task: run_train (in this process, or as a torchrun job), cached by
    train_key; a retry resumes from the last checkpoint."""
    launcher, nproc = resolve_launcher(profile.training)
    if launcher == "single":
        from tasks.training.speed import undo_module_patches

        try:
            return run_train(profile, preflight, snapshot, dataset, flow_run_id)
        finally:
            undo_module_patches()  # later steps of this process load models unpatched
    from prefect.logging import get_run_logger

    out = run_dir_for(train_key(profile, snapshot, dataset))
    inputs = {"profile": profile.model_dump(mode="json"),
              "preflight": preflight.model_dump(mode="json"),
              "snapshot": snapshot.model_dump(mode="json"),
              "dataset": dataset.model_dump(mode="json"), "flow_run_id": flow_run_id}
    run_torchrun(out, inputs, nproc, log=get_run_logger().info)
    result = _adopt(out)
    if result is None:
        raise errors.TrainingError(f"the torchrun job exited cleanly but left no finished "
                                   f"run in {out}. Fix: check the job's log above.")
    return result
