"""The loraflow profile: one YAML file that says everything about a fine-tuning run.

Field names are the public contract. Each field's description names the library
argument it maps to; the mapping itself lives in one place per library
(tasks/train.py for transformers/peft/bitsandbytes, tasks/dataset.py for datasets).
Closed choices are Literals so that the Prefect UI renders dropdowns and a bad value
fails before any infrastructure starts.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
ComputeDtype = Literal["float32", "float16", "bfloat16"]
# A size as accelerate's max_memory takes it: 20GiB, 500MB, 1.5TB, 1024 (bytes).
SIZE_RE = re.compile(r"^\d+(\.\d+)?\s*(B|[KMGT]i?B)?$", re.IGNORECASE)
DEVICE_RE = re.compile(r"^(cpu|disk|cuda|cuda:\d+)$")


def _is_device(value) -> bool:
    """A device_map value: a GPU index, cuda / cuda:N, cpu or disk."""
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) and value >= 0) or (
        isinstance(value, str) and bool(DEVICE_RE.match(value)))


class _Section(BaseModel):
    # Unknown keys are typos: refuse them instead of silently ignoring a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    """The base model and how it is loaded."""

    id: str = Field(description="Hub repo id of the base model (from_pretrained's "
                    "pretrained_model_name_or_path), e.g. meta-llama/Llama-3.2-1B.")
    revision: str = Field("main", description="Branch, tag or commit of the base model "
                          "(from_pretrained's revision). Resolved to a commit sha by preflight.")
    task: Literal["causal-lm", "seq-classification", "token-classification", "seq2seq-lm"] = Field(
        "causal-lm", description="What the model is trained for: picks the Auto class and "
        "peft's task_type (tasks/task_types.py): causal-lm (AutoModelForCausalLM, CAUSAL_LM), "
        "seq-classification (AutoModelForSequenceClassification, SEQ_CLS), "
        "token-classification (AutoModelForTokenClassification, TOKEN_CLS), seq2seq-lm "
        "(AutoModelForSeq2SeqLM, SEQ_2_SEQ_LM). data.format must fit it.")
    dtype: Dtype = Field("auto", description="Weight dtype (from_pretrained's dtype). "
                         "auto: bfloat16 on a GPU that supports it, float32 on CPU.")
    device_map: Optional[Union[Literal["auto", "cpu", "cuda"], dict[str, Union[int, str]]]] = Field(
        None, description="from_pretrained's device_map: auto (accelerate spreads the layers "
        "over the visible GPUs, then CPU, then disk), cpu, cuda, {'': 1} (all on GPU 1), or "
        "an explicit module map {module name: GPU index | cpu | disk}. null: the Trainer "
        "places the model on the first accelerator, or the CPU.")
    max_memory: Optional[dict[Union[int, str], Union[int, str]]] = Field(
        None, description="from_pretrained's max_memory, with device_map auto: the most "
        "each device may hold, e.g. {0: 70GiB, cpu: 200GiB} (keys: GPU index or cpu; values: "
        "bytes or a size like 20GiB).")
    offload_folder: Optional[str] = Field(
        None, description="from_pretrained's offload_folder: where weights placed on 'disk' "
        "by device_map are kept. Needed when device_map sends modules to disk.")
    attn_implementation: Literal["eager", "sdpa", "flex_attention", "flash_attention_2"] = Field(
        "sdpa", description="from_pretrained's attn_implementation. flash_attention_2 needs "
        "the flash-attn package, a CUDA GPU and float16/bfloat16; flex_attention needs "
        "torch >= 2.5.")
    low_cpu_mem_usage: bool = Field(
        True, description="from_pretrained's low_cpu_mem_usage: load the weights without a "
        "second full copy in RAM. transformers >= 5 always loads this way (the argument is "
        "gone), so false is refused there.")
    trust_remote_code: bool = Field(
        False, description="from_pretrained's trust_remote_code. Only with a pinned "
        "40-hex model.revision, so the code that runs is the code you reviewed.")

    @field_validator("device_map")
    @classmethod
    def _check_device_map(cls, value):
        if isinstance(value, dict):
            if not value:
                raise ValueError("model.device_map: an empty module map places nothing. Fix: "
                                 "use {'': 0} for one GPU, auto, or list modules.")
            bad = {k: v for k, v in value.items() if not _is_device(v)}
            if bad:
                raise ValueError(f"model.device_map: {bad} are not devices. Fix: map each "
                                 "module to a GPU index (0, 1, …), cuda:N, cpu or disk.")
        return value

    @field_validator("max_memory")
    @classmethod
    def _check_max_memory(cls, value):
        for key, size in (value or {}).items():
            if not (str(key).isdigit() or key == "cpu"):
                raise ValueError(f"model.max_memory: key '{key}' is not a device. Fix: use "
                                 "GPU indices (0, 1, …) or cpu as keys.")
            if not (isinstance(size, int) and size > 0) and not (
                    isinstance(size, str) and SIZE_RE.match(size.strip())):
                raise ValueError(f"model.max_memory: '{size}' for device {key} is not a size. "
                                 "Fix: give bytes or a size such as 20GiB or 500MB.")
        return value

    @model_validator(mode="after")
    def _placement_checks(self) -> "ModelSection":
        if self.max_memory and self.device_map != "auto":
            raise ValueError("model.max_memory: it only limits device_map auto (accelerate "
                             f"ignores it for device_map {self.device_map!r}). Fix: set "
                             "model.device_map to auto, or remove model.max_memory.")
        sends_to_disk = isinstance(self.device_map, dict) and "disk" in self.device_map.values()
        if sends_to_disk and not self.offload_folder:
            raise ValueError("model.offload_folder: model.device_map sends modules to disk, "
                             "which needs a folder for them. Fix: set model.offload_folder.")
        if self.offload_folder and not (self.device_map == "auto"
                                        or isinstance(self.device_map, dict)):
            raise ValueError("model.offload_folder: only used when device_map can offload "
                             "(auto or a module map). Fix: set model.device_map to auto, or "
                             "remove model.offload_folder.")
        if self.attn_implementation == "flash_attention_2" and self.dtype == "float32":
            raise ValueError("model.attn_implementation: flash_attention_2 runs in float16 or "
                             "bfloat16 only. Fix: set model.dtype to bfloat16, or use sdpa.")
        return self


class QuantizationSection(_Section):
    """bitsandbytes quantization of the base model (QLoRA)."""

    mode: Literal["none", "nf4", "fp4", "int8"] = Field(
        "none", description="none; nf4/fp4: BitsAndBytesConfig(load_in_4bit=True, "
        "bnb_4bit_quant_type=mode); int8: BitsAndBytesConfig(load_in_8bit=True).")
    double_quant: bool = Field(True, description="bnb_4bit_use_double_quant (4-bit modes): "
                               "quantize the quantization constants too (≈0.4 bit/param saved).")
    compute_dtype: ComputeDtype = Field(
        "bfloat16", description="bnb_4bit_compute_dtype (4-bit modes): the dtype the "
        "dequantized weights are multiplied in.")
    quant_storage: Literal["uint8", "float16", "bfloat16", "float32"] = Field(
        "uint8", description="bnb_4bit_quant_storage (4-bit modes): the dtype the packed "
        "4-bit weights are stored as; bfloat16 lets FSDP shard them with bf16 weights.")


class LoraSection(_Section):
    """The LoRA adapter (peft.LoraConfig)."""

    r: int = Field(8, gt=0, le=1024, description="LoraConfig.r: the adapter rank.")
    alpha: int = Field(16, gt=0, description="LoraConfig.lora_alpha: scaling is alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoraConfig.lora_dropout.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="LoraConfig.target_modules: 'all-linear' or a list of "
        "module names (e.g. [q_proj, v_proj]).")


class DataSection(_Section):
    """The training data and how it becomes token sequences."""

    dataset: str = Field(description="A Hub dataset repo id (datasets.load_dataset's path) "
                         "or a local .json/.jsonl/.csv/.parquet file.")
    revision: str = Field("main", description="Branch, tag or commit of a Hub dataset "
                          "(load_dataset's revision). Resolved to a commit sha by preflight.")
    data_files: Optional[str] = Field(
        None, description="load_dataset's data_files inside a Hub dataset repo, e.g. "
        "data/chat.jsonl. null: the repo's default configuration.")
    split: str = Field("train", description="load_dataset's split.")
    format: Literal["alpaca", "chat", "prompt-completion", "text", "text-label", "tokens-tags",
                    "input-target"] = Field(
        "alpaca", description="Row layout: alpaca {instruction, input, output}; chat "
        "{messages} rendered with the tokenizer's chat template; prompt-completion "
        "{prompt, completion}; text {text} (these four for causal-lm); text-label {text, label} for seq-classification; tokens-tags "
        "{tokens: [word, …], tags: [tag, …]} for token-classification; input-target "
        "{input, target} for seq2seq-lm. Label and tag names are collected from the data.")
    mask_prompt: bool = Field(True, description="Exclude prompt tokens from the loss "
                              "(labels = -100), so only responses are learned.")
    max_length: int = Field(512, gt=8, description="Tokens per example; longer ones are "
                            "truncated (tokenizer truncation max_length).")
    eval_split: float = Field(0.1, ge=0.0, lt=0.5, description="Fraction held out for "
                              "evaluation (Dataset.train_test_split test_size); 0 = none.")
    padding_side: Literal["right", "left"] = Field(
        "right", description="The tokenizer's padding_side when batches are padded: right "
        "(the usual for training), or left.")


class TrainingSection(_Section):
    """The training loop (transformers.TrainingArguments)."""

    learning_rate: float = Field(2e-4, gt=0, description="TrainingArguments.learning_rate.")
    max_steps: Optional[int] = Field(None, gt=0, description="TrainingArguments.max_steps; "
                                     "null: train num_epochs epochs.")
    num_epochs: float = Field(1.0, gt=0, description="TrainingArguments.num_train_epochs.")
    per_device_batch_size: int = Field(4, gt=0, description=
                                       "TrainingArguments.per_device_train_batch_size.")
    gradient_accumulation_steps: int = Field(1, gt=0, description=
                                             "TrainingArguments.gradient_accumulation_steps.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="TrainingArguments.lr_scheduler_type.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description=
                                "Fraction of steps spent warming up (TrainingArguments.warmup_steps).")
    weight_decay: float = Field(0.0, ge=0.0, description="TrainingArguments.weight_decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="TrainingArguments.max_grad_norm.")
    gradient_checkpointing: bool = Field(False, description=
                                         "TrainingArguments.gradient_checkpointing.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N steps "
                            "(TrainingArguments.save_steps); a re-run resumes from the last.")
    save_total_limit: int = Field(2, gt=0, description="TrainingArguments.save_total_limit.")
    eval_steps: Optional[int] = Field(None, gt=0, description="Evaluate every N steps "
                                      "(TrainingArguments.eval_steps); null: once at the end.")
    logging_steps: int = Field(5, gt=0, description="TrainingArguments.logging_steps.")
    seed: int = Field(42, description="TrainingArguments.seed; also the eval split's seed.")
    launcher: Literal["auto", "single", "torchrun"] = Field(
        "auto", description="How training runs: single (in the task's process), torchrun "
        "(torch.distributed.run over nproc_per_node processes: DDP for 16/32-bit LoRA, FSDP "
        "for 4-bit QLoRA), auto (torchrun when more than one GPU is visible).")
    nproc_per_node: Optional[int] = Field(
        None, gt=0, description="torchrun --nproc_per_node; null: every visible GPU.")
    global_batch_size: Optional[int] = Field(
        None, gt=0, description="Examples per optimizer step over all processes: "
        "gradient_accumulation_steps is derived as global / (per_device_batch_size × "
        "processes), so one profile means the same training on 1 or N GPUs. null: use "
        "gradient_accumulation_steps as given.")


class PublishSection(_Section):
    """Where the adapter is published."""

    repo_id: str = Field(description="Target Hub repo id, namespace/name (create_repo's "
                         "repo_id); the token's user must be able to write to the namespace.")
    private: bool = Field(True, description="create_repo's private: private unless you opt out.")
    tag: Optional[str] = Field(None, description="Tag for this version (create_tag's tag); "
                               "null: the next vN.")
    license: Optional[str] = Field(None, description="The card's license (ModelCardData."
                                   "license); null: inherited from the base model's card.")
    merged: bool = Field(False, description="Also push the base with the adapter merged in, "
                         "as 16-bit safetensors (merge_and_unload), to <repo_id>-merged.")
    when: Literal["inline", "on_approval"] = Field(
        "inline", description="inline: the run publishes the adapter right after training "
        "and verifies the Hub copy. on_approval: it stops after training and a check of "
        "the local adapter; publish it later with `loraflow publish RUN_DIR` or the "
        "loraflow-publish deployment.")


class Profile(_Section):
    """A complete fine-tuning run: base model, quantization, adapter, data, training, publish."""

    model: ModelSection
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    publish: PublishSection

    @model_validator(mode="after")
    def _cross_field_checks(self) -> "Profile":
        if self.model.trust_remote_code and not SHA_RE.match(self.model.revision):
            raise ValueError("model.trust_remote_code: remote code runs only from a pinned "
                             "commit. Fix: set model.revision to a 40-hex commit sha, or "
                             "set model.trust_remote_code to false.")
        if not REPO_ID_RE.match(self.publish.repo_id):
            raise ValueError(f"publish.repo_id: '{self.publish.repo_id}' is not namespace/name."
                             " Fix: use e.g. my-user/my-adapter.")
        if not REPO_ID_RE.match(self.model.id):
            raise ValueError(f"model.id: '{self.model.id}' is not a Hub repo id "
                             "(namespace/name). Fix: use e.g. meta-llama/Llama-3.2-1B.")
        if self.training.eval_steps and self.data.eval_split == 0:
            raise ValueError("training.eval_steps: evaluation needs held-out data. Fix: set "
                             "data.eval_split above 0, or training.eval_steps to null.")
        if self.quantization.mode in ("nf4", "fp4") and self.model.dtype == "float32" \
                and self.quantization.compute_dtype != "float32":
            raise ValueError("quantization.compute_dtype: float32 weights with a "
                             f"{self.quantization.compute_dtype} compute dtype. Fix: set "
                             "model.dtype to bfloat16/auto or compute_dtype to float32.")
        return self

    @model_validator(mode="after")
    def _task_fits_format(self) -> "Profile":
        from tasks.task_types import TASKS

        fits = TASKS[self.model.task].formats
        if self.data.format not in fits:
            users = [t.name for t in TASKS.values() if self.data.format in t.formats]
            raise ValueError(
                f"data.format: '{self.data.format}' rows do not fit model.task "
                f"{self.model.task}, which trains on {' or '.join(fits)} rows. Fix: set "
                f"data.format to {' or '.join(fits)}, or model.task to {' or '.join(users)}.")
        return self


def presets_dir() -> Path:
    return Path(__file__).parent
