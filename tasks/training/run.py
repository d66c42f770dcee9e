"""run_train: one training as named phases — setup → resume → fit → save → record.

The shape of torchtune's recipes (recipes/lora_finetune_single_device.py: `setup`,
`train`, `save_checkpoint`): run_train reads as the sequence, each phase is a function
below, and the infrastructure they use lives beside this module — checkpoints.py
(resume, signals, step log), distributed.py (DDP/FSDP), record.py (record.json).

The same run_train runs in the train step's process or in every rank of a torchrun job
(tasks.training.worker); only rank 0 writes the run's outputs. The model is loaded and
the adapter injected here, inside the step: GPU objects never cross a task boundary.
Imports torch lazily: a fully cached run never gets here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from profiles.schema import Profile
from tasks import errors
from tasks.cache.keys import cache_key
from tasks.cache.manifest import sha256_file
from tasks.contracts import (
    ADAPTER_FILES,
    DatasetManifest,
    PreflightReport,
    SnapshotManifest,
    TrainResult,
)
from tasks.data.chat import resolve_chat_template
from tasks.training.checkpoints import (
    STEP_LOG,
    StepLog,
    StopRequest,
    checkpoint_step,
    finished_checkpoint,
    last_checkpoint,
    restore_finished,
    save_and_stop_callback,
    stop_on_signals,
)
from tasks.training.distributed import (
    distributed_arguments,
    distributed_summary,
    rank_loading,
    save_gathered_adapter,
    uses_fsdp,
)
from tasks.training.launch import accumulation_steps, world
from tasks.training.modeling import adapter_weights
from tasks.training.record import (
    build_record,
    finished_run,
    train_metrics,
    write_record,
)


def run_train(profile: Profile, preflight: PreflightReport, snapshot: SnapshotManifest,
              dataset: DatasetManifest, run_dir: Path, key_inputs: dict,
              flow_run_id: Optional[str] = None) -> Optional[TrainResult]:
    """Train the adapter into `run_dir`, resuming from its last complete checkpoint.

    Args:
        profile: the profile as given (the record keeps it); training uses it with
            preflight's memory plan applied (with_memory_plan).
        preflight: the preflight report (memory plan, license, dataset source).
        snapshot: the downloaded base (and continued adapter, if any).
        dataset: the prepared dataset.
        run_dir: LORAFLOW_HOME/runs/<train key>.
        key_inputs: what keyed this run (tasks.train.train_inputs), saved as inputs.json
            and in the manifest.
        flow_run_id: the flow run that trains, for the record.

    Returns:
        The result on rank 0 (also when `run_dir` holds a finished run); None on the
        other ranks of a torchrun job.

    Raises:
        TrainingInterrupted: SIGTERM/SIGINT arrived; a checkpoint was saved first.
        OutOfMemoryError, TrainingError: as named.
    """
    done = finished_run(run_dir)
    if done is not None:
        return done
    rank = world().rank
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # what keyed this run, readable while it is partial (`loraflow cache ls`)
        (run_dir / "inputs.json").write_text(json.dumps(key_inputs, indent=1, sort_keys=True))
    run = setup(with_memory_plan(profile, preflight), snapshot, dataset, run_dir)
    resume = last_checkpoint(run_dir, prune=rank == 0)
    output, restored = fit(run, run_dir, resume)
    eval_metrics = run.trainer.evaluate() if run.eval_ds is not None else {}
    adapter_dir = save(run, snapshot, run_dir)
    why = preflight.memory.data_parallel_reason if preflight.memory else None
    distributed = distributed_summary(run.profile, run.model, why)  # every rank takes part
    if rank != 0:
        return None  # rank 0 writes the record; the parent reads it from the run dir
    check_learned(run, adapter_dir)
    tokenizer = save_tokenizer(run, adapter_dir)
    metrics, losses = train_metrics(run.trainer, output, resume, eval_metrics, restored)
    adapter = adapter_entry(run, adapter_dir)
    write_record(run_dir, build_record(
        profile, preflight, snapshot, dataset, train_key=cache_key("train", key_inputs),
        flow_run_id=flow_run_id, adapter=adapter, tokenizer=tokenizer, metrics=metrics,
        loss_history=losses, distributed=distributed, speed=speed_entry(run)), key_inputs)
    return TrainResult(run_dir=str(run_dir), adapter_dir=str(adapter_dir),
                       adapter_sha256=adapter["sha256"], trainable_params=run.trainable,
                       total_params=run.total, metrics=metrics)


def with_memory_plan(profile: Profile, preflight: PreflightReport) -> Profile:
    """The profile with what preflight's memory plan chose: the batch and checkpointing
    under training.memory_cap_gib (tasks.memory.fit.fit_to_cap) and, over several
    processes, the data-parallel engine (choose_data_parallel); the profile itself
    otherwise. The cache key stays that of the profile as given: the choice follows from it."""
    memory = preflight.memory
    plan = dict(memory.training or {}) if memory else {}
    if memory and memory.data_parallel:
        plan["data_parallel"] = memory.data_parallel
    if not plan:
        return profile
    return profile.model_copy(update={"training": profile.training.model_copy(update=plan)})


# --- setup ------------------------------------------------------------------------------

@dataclass
class TrainingRun:
    """What setup builds for the later phases."""
    profile: Profile  # with the memory plan applied
    tokenizer: Any  # as training uses it (pad token, data.padding_side)
    base_padding_side: str  # the base tokenizer's, saved with the adapter
    model: Any  # the PeftModel
    liger: list  # the Liger kernels applied to the base ([]: none)
    init_peft: Optional[Path]  # pissa / olora: the adapter as initialised
    initial: dict  # adapter tensor name → its value before training (CPU)
    trainable: int  # parameter counts
    total: int
    trainer: Any
    eval_ds: Any  # the eval split, or None


def setup(profile: Profile, snapshot: SnapshotManifest, dataset: DatasetManifest,
          run_dir: Path) -> TrainingRun:
    """Seed, tokenizer, base model, adapter, its initial weights and the Trainer.

    Args:
        profile: with the memory plan applied.
        snapshot, dataset: the step's manifests.
        run_dir: where the initial weights and checkpoints go.
    """
    from transformers import AutoTokenizer, set_seed

    from tasks.model_tasks import prepare_tokenizer

    set_seed(profile.training.seed)
    tokenizer = AutoTokenizer.from_pretrained(snapshot.local_dir)
    base_padding_side = tokenizer.padding_side
    # pad = EOS only where the tokenizer has no pad token; data.padding_side applied.
    tokenizer = prepare_tokenizer(tokenizer, profile.data.padding_side)
    model, liger = setup_model(profile, snapshot, dataset)
    init_peft, initial = initial_adapter(profile, model, run_dir)
    trainable, total = model.get_nb_trainable_parameters()
    if profile.training.fp8:  # after counting: the FP8 weights are buffers, not parameters
        use_fp8(profile, model)
    trainer, eval_ds = build_trainer(profile, model, tokenizer, dataset, run_dir)
    return TrainingRun(profile, tokenizer, base_padding_side, model, liger, init_peft,
                       initial, trainable, total, trainer, eval_ds)


def setup_model(profile: Profile, snapshot: SnapshotManifest, dataset: DatasetManifest):
    """The base model with the adapter injected (a continued one when model.id is an
    adapter repo).

    Returns:
        (the PeftModel, the names of the Liger kernels applied: [] for none).
    """
    import torch

    from tasks.training.modeling import inject_adapter, load_base_model
    from tasks.training.speed import (
        apply_liger,
        keep_adapter_inputs_16bit,
        liger_layer_kernels,
        use_liger,
        use_torch_compile,
    )

    model_section, quant = rank_loading(profile)
    sharded = uses_fsdp(profile)
    base = load_base_model(model_section, quant, snapshot.local_dir, labels=dataset.labels)
    # Liger's fused cross-entropy multiplies by the whole lm_head weight, which FSDP holds
    # sharded: FSDP runs without Liger.
    liger = []
    if use_liger(profile, base.config.model_type) and not sharded:
        compiled = use_torch_compile(profile, torch.cuda.is_available(), world().size)
        kernels = liger_layer_kernels(profile, compiled)
        apply_liger(base, kernels)
        liger = ["fused_linear_cross_entropy"] + [k for k, on in kernels.items() if on]
    continued = snapshot.adapter  # model.id is an adapter repo: train it on, not a fresh one
    model = inject_adapter(base, profile.lora, quant,
                           profile.training.gradient_checkpointing and not sharded, sharded,
                           task=profile.model.task,
                           continue_from=continued.local_dir if continued else None)
    if not sharded:  # FSDP's own mixed precision decides dtypes there (untested on GPU)
        keep_adapter_inputs_16bit(model)  # the same values, without a copy per LoRA layer
    return model, liger


def use_fp8(profile: Profile, model) -> int:
    """training.fp8: the frozen base weights of the LoRA layers in FP8 (tasks.training.fp8).

    Raises:
        ProfileError: no GPU with FP8 tensor cores, or no layer that FP8 can take.
    """
    from tasks.training.fp8 import convert_base_layers_to_float8, float8_supported

    if not float8_supported():
        raise errors.ProfileError(
            "training.fp8: FP8 matmuls need a CUDA GPU with FP8 tensor cores (compute "
            "capability 8.9 or newer: Ada, Hopper, Blackwell), and this machine has none. "
            "Fix: set training.fp8 to false.")
    try:
        converted = convert_base_layers_to_float8(model, profile.training.fp8_target_modules,
                                                  profile.training.fp8_backward)
    except ValueError as exc:
        raise errors.ProfileError(str(exc)) from None
    if converted == 0:
        raise errors.ProfileError(
            "training.fp8: no LoRA-wrapped linear layer FP8 can take (plain nn.Linear, sizes "
            "multiples of 16). Fix: " + ("name other layers in training.fp8_target_modules, or "
            if profile.training.fp8_target_modules else "") + "set training.fp8 to false.")
    return converted


def initial_adapter(profile: Profile, model, run_dir: Path) -> tuple[Optional[Path], dict]:
    """The adapter before training, to prove every tensor moved: saved by the first
    attempt (RUN_DIR/adapter_init.safetensors), read back by a resumed one.

    Returns:
        (RUN_DIR/adapter_init_peft for pissa / olora — the initialised adapter the saved
         one is converted against — else None; tensor name → initial value).
    """
    from safetensors.torch import load_file, save_file

    from tasks.training.adapters import converts_on_save, save_initial_adapter

    rank = world().rank
    init_peft = run_dir / "adapter_init_peft" if converts_on_save(profile.lora) else None
    if init_peft is not None and rank == 0 and not (init_peft / "adapter_config.json").exists():
        save_initial_adapter(model, profile.lora, init_peft)
    init_path = run_dir / "adapter_init.safetensors"
    initial = adapter_weights(model)
    if not init_path.exists():
        if rank == 0:
            save_file(initial, str(init_path))
    else:  # resuming: the "before" weights are those of the first attempt
        initial = load_file(str(init_path))
    return init_peft, initial


def build_trainer(profile: Profile, model, tokenizer, dataset: DatasetManifest, out: Path):
    """transformers.Trainer with the profile's TrainingArguments (the one mapping).

    Returns:
        (the Trainer, the eval split or None).
    """
    import datasets
    import torch
    from transformers import Trainer, TrainingArguments

    from tasks.model_tasks import data_collator
    from tasks.training.progress import TrainingProgress, log_line
    from tasks.training.speed import (
        compile_decoder_layers,
        offloads_activations,
        partial_checkpointing_callback,
        set_activation_memory_budget,
        use_torch_compile,
    )

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
        gradient_accumulation_steps=accumulation_steps(t, world().size),
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        # Under FSDP, its own activation checkpointing replaces the Trainer's.
        **checkpointing_arguments(t.gradient_checkpointing and not uses_fsdp(profile)),
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if (eval_ds is not None and t.eval_steps) else "no",
        eval_steps=t.eval_steps,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        # The filter reads every step's loss on the host (a GPU sync per micro-batch) to
        # leave NaN/inf out of the logged mean; a NaN loss had better show in the log.
        logging_nan_inf_filter=False,
        seed=t.seed,
        data_seed=t.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        # transformers' own integrations (tensorboard, mlflow, wandb, trackio); [] is none.
        report_to=list(t.report_to),
        remove_unused_columns=False,
        # No bar: TrainingProgress logs one metric line per logging step instead (a bar
        # in a log is a stream of carriage returns).
        disable_tqdm=True,
        **tensorboard_arguments(out),
        **({} if t.optimizer == "auto" else {"optim": t.optimizer}),  # auto: fused AdamW
        **distributed_arguments(profile, model),
    )
    compiled = use_torch_compile(profile, torch.cuda.is_available(), world().size)
    if compiled:
        set_activation_memory_budget(t.activation_memory_budget)
        compile_decoder_layers(model)
    elif t.activation_memory_budget < 1:
        log_line(f"training.activation_memory_budget {t.activation_memory_budget} applies "
                 "to compiled layers only, and these run eager (training.torch_compile): "
                 "it changes nothing here.", warning=True)
    if t.offload_activations and t.gradient_checkpointing and not offloads_activations(
            profile, torch.cuda.is_available(), world().size):
        log_line("training.offload_activations: this transformers checkpoints inside the "
                 "compiled layers' forward, where the inputs cannot be offloaded: the layers "
                 "checkpoint on the GPU (torch's checkpoint). Set training.torch_compile to "
                 "false to offload.", warning=True)
    collator = data_collator(profile.model.task, tokenizer, model)  # labels padded with -100
    if t.packing:
        from tasks.training.packing import PackingCollator

        collator = PackingCollator(profile.data.max_length, tokenizer.pad_token_id)
    callbacks = [TrainingProgress(out.name)]  # the run directory is named by the train key
    if args.gradient_checkpointing and t.checkpoint_layers is not None:
        callbacks.append(partial_checkpointing_callback(t.checkpoint_layers))
    if args.gradient_checkpointing and t.offload_activations:  # after partial checkpointing
        if world().size > 1:
            raise errors.ProfileError(
                "training.offload_activations: the offloaded checkpointing runs its own "
                "backward per layer, which data-parallel gradient hooks do not expect; it "
                f"runs in one process and this training has {world().size}. Fix: set "
                "training.offload_activations to false, or train in one process "
                "(training.launcher: single).")
        from tasks.training.offload import offload_callback

        callbacks.append(offload_callback())
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=collator, callbacks=callbacks)
    quiet_trainer(trainer, out)
    if eval_ds is not None:  # run_train evaluates once more after training
        end_tracking_runs_after_final_eval(trainer)
    return trainer, eval_ds


TENSORBOARD_DIR = "tensorboard"  # RUN_DIR/tensorboard: transformers' TensorBoard event files


def end_tracking_runs_after_final_eval(trainer) -> None:
    """Keep transformers' MLflow / Trackio runs open until the evaluation run_train does
    after training. Their callbacks end the tracking run at on_train_end; the eval
    metrics logged after that would start a second run (MLflow's fluent API starts one
    for a metric logged with none active), splitting one training in two. Their
    on_train_end is moved to the on_evaluate that follows training.

    Args:
        trainer: the Trainer, its callbacks built from TrainingArguments.report_to.
    """
    import transformers.integrations as integrations
    from transformers import TrainerCallback

    closing = tuple(getattr(integrations, name) for name in ("MLflowCallback", "TrackioCallback")
                    if hasattr(integrations, name))

    class EndAfterFinalEval(TrainerCallback):
        def __init__(self, ends):
            self.ends, self.trained = ends, False

        def on_train_end(self, args, state, control, **kwargs):
            self.trained = True

        def on_evaluate(self, args, state, control, **kwargs):
            if self.trained:
                for end in self.ends:
                    end(args, state, control, **kwargs)
                self.ends = []

    ends = []
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, closing):
            ends.append(callback.on_train_end)
            callback.on_train_end = lambda *args, **kwargs: None
    if ends:
        trainer.add_callback(EndAfterFinalEval(ends))


def checkpointing_arguments(enabled: bool) -> dict:
    """TrainingArguments for activation checkpointing under the name this transformers
    takes: `activation_checkpointing*` where it exists (5.2x; the `gradient_checkpointing*`
    aliases there raise a FutureWarning on every run), `gradient_checkpointing*` before.

    Args:
        enabled: whether the Trainer checkpoints activations.
    Returns:
        The two TrainingArguments keywords (non-reentrant checkpointing).
    """
    from dataclasses import fields

    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": enabled,
            f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def tensorboard_arguments(out: Path) -> dict:
    """`logging_dir` = RUN_DIR/tensorboard where TrainingArguments still has it (older
    transformers); newer ones read the TensorBoard callback's own directory, which
    quiet_trainer sets.

    Args:
        out: the run directory.
    Returns:
        {"logging_dir": …} or {}.
    """
    from dataclasses import fields

    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    return {"logging_dir": str(out / TENSORBOARD_DIR)} if "logging_dir" in names else {}


def quiet_trainer(trainer, out: Path) -> None:
    """The Trainer's callbacks as loraflow wants them: without PrinterCallback (the
    Trainer adds it when the bar is off; it prints every log dict on stdout, which
    TrainingProgress's metric lines replace), and transformers' TensorBoardCallback
    (training.report_to tensorboard) writing to RUN_DIR/tensorboard rather than
    checkpoints/runs/<date_host>, so the event files stay with the run and are published
    with the adapter (tasks.publish.adapter_bundle).

    Args:
        trainer: the Trainer just built.
        out: the run directory.
    """
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(out / TENSORBOARD_DIR)


# --- fit --------------------------------------------------------------------------------

def fit(run: TrainingRun, run_dir: Path, resume: Optional[str]):
    """Train from `resume` (or the start) to the last step, logging each step to the
    run's step log; SIGTERM/SIGINT saves a checkpoint and stops.

    Returns:
        (transformers' TrainOutput, whether a finished checkpoint was restored instead of
         training).

    Raises:
        TrainingInterrupted: a stop signal arrived (a checkpoint was saved).
        OutOfMemoryError: torch ran out of memory.
    """
    import torch

    trainer, rank = run.trainer, world().rank
    stop = StopRequest()
    log_name = STEP_LOG if rank == 0 else f"train_log.rank{rank}.jsonl"
    steps = StepLog(run_dir / log_name, checkpoint_step(resume))
    trainer.add_callback(save_and_stop_callback(stop, steps))
    try:
        restored = finished_checkpoint(resume) is not None
        if restored:
            # Killed after the last checkpoint, before the adapter was saved: Trainer
            # would train one step too many from here, so take the weights as they are.
            output = restore_finished(trainer, run.model, resume)
        else:
            if torch.cuda.is_available():  # peak memory of training, weights included
                torch.cuda.reset_peak_memory_stats()
            with stop_on_signals(stop):
                output = trainer.train(resume_from_checkpoint=resume)
        if stop.signum is not None:
            import signal

            name = signal.Signals(stop.signum).name
            steps.write("interrupted", trainer.state.global_step, signal=name)
            raise errors.TrainingInterrupted(
                f"training stopped by {name} at step {trainer.state.global_step} of "
                f"{trainer.state.max_steps}; a checkpoint was saved in "
                f"{run_dir / 'checkpoints'}. Fix: run the same profile again: it resumes "
                "from that step.")
        steps.write("end", trainer.state.global_step)
    except torch.OutOfMemoryError:
        raise errors.OutOfMemoryError(
            "out of memory while training. Fix: lower training.per_device_batch_size, "
            "turn on training.gradient_checkpointing, or quantize (quantization.mode nf4)."
        ) from None
    finally:
        steps.close()
    return output, restored


# --- save -------------------------------------------------------------------------------

def save(run: TrainingRun, snapshot: SnapshotManifest, run_dir: Path) -> Path:
    """Write the trained adapter to RUN_DIR/adapter (rank 0; under FSDP every rank joins
    the gather of the sharded weights). Returns that directory."""
    from tasks.training.adapters import name_base, save_adapter

    adapter_dir = run_dir / "adapter"
    lora = run.profile.lora
    name_base(run.model, lora.adapter_name, snapshot.repo_id, snapshot.commit)
    if uses_fsdp(run.profile):
        full_state = run.trainer.accelerator.get_state_dict(run.trainer.model_wrapped)
        if world().rank == 0:
            save_gathered_adapter(run.model, full_state, run.initial, adapter_dir)
    elif world().rank == 0:
        save_adapter(run.model, adapter_dir, lora.adapter_name,
                     initial=str(run.init_peft) if run.init_peft else None)
    return adapter_dir


def check_learned(run: TrainingRun, adapter_dir: Path) -> None:
    """Refuse an adapter with a tensor that did not move from its initial value.

    After one optimizer step (a smoke run, training.max_steps 1) a factor whose partner
    started at zero legitimately has not moved: LoRA's update is B·A, so with B = 0
    (peft's default init) the gradient of A is zero on the first step, and Adam moves
    nothing by a zero gradient. Those are exempt on step 1 only
    (adapters.unchanged_tensors); every other tensor, and from step 2 every tensor,
    must have changed.

    Raises:
        TrainingError: naming how many tensors did not change and one of them.
    """
    from safetensors.torch import load_file

    from tasks.training.adapters import unchanged_tensors

    # A converted (pissa / olora) adapter is saved with other shapes: compare the trained
    # tensors themselves.
    current = (adapter_weights(run.model) if run.init_peft
               else load_file(str(adapter_dir / "adapter_model.safetensors")))
    unchanged = unchanged_tensors(current, run.initial, steps=run.trainer.state.global_step)
    if unchanged:
        raise errors.TrainingError(
            f"{len(unchanged)} LoRA tensors did not change during training (e.g. "
            f"{unchanged[0]}): the adapter learned nothing. Fix: check the learning rate and "
            "data; on CPU, 4-bit bitsandbytes weights stop passing gradients after an "
            "evaluation forward — use quantization.mode int8 or none there.")


def save_tokenizer(run: TrainingRun, adapter_dir: Path) -> dict:
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

    # peft's save writes a stub README.md naming the local download folder: the card is
    # rendered at publish time, and the training's outputs must not depend on where they are.
    (adapter_dir / "README.md").unlink(missing_ok=True)
    tokenizer = run.tokenizer
    chat_template = resolve_chat_template(run.profile.data, tokenizer)
    trained_side = tokenizer.padding_side
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.padding_side = run.base_padding_side
    try:
        saved = tokenizer.save_pretrained(str(adapter_dir))
    finally:
        tokenizer.padding_side = trained_side
    names = sorted({Path(f).name for f in saved if Path(f).is_file()}
                   - set(ADAPTER_FILES))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return {"files": names, "pad_token": tokenizer.pad_token,
            "pad_token_id": tokenizer.pad_token_id, "padding_side": run.base_padding_side,
            "chat_template_sha256": template and hashlib.sha256(template.encode()).hexdigest()}


# --- record -----------------------------------------------------------------------------

def adapter_entry(run: TrainingRun, adapter_dir: Path) -> dict:
    """The record's "adapter" entry: the weights' sha256, parameter counts and the card's
    notes (lm_head / tied embeddings / modules_to_save cost)."""
    from tasks.training.adapters import adapter_notes

    return {"sha256": sha256_file(adapter_dir / "adapter_model.safetensors"),
            "trainable_params": run.trainable, "total_params": run.total,
            "notes": adapter_notes(run.model, run.profile.lora) or None}


def speed_entry(run: TrainingRun) -> dict:
    """The speed levers as this run resolved them ("auto" in the profile)."""
    from tasks.training.offload import offloading_layers

    modules = list(run.model.modules())
    return {"liger_kernel": bool(run.liger), "liger_kernels": run.liger,
            "torch_compile": any(getattr(m, "_compiled_call_impl", None) is not None
                                 for m in modules),
            "offloaded_layers": offloading_layers(run.model),
            "fp8_layers": sum(1 for m in modules if type(m).__name__ == "Float8FrozenLinear"),
            "fp8_backward": next((m.backward for m in modules
                                  if type(m).__name__ == "Float8FrozenLinear"), None)}
