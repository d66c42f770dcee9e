"""The records steps hand each other: what each step returns and the next one takes.

A step module imports these and helpers, never another step, so `tasks/` is a row of
siblings and a step's cache key (tasks/cache/keys.py) is not moved by code it only
imports for a type. This module imports pydantic and nothing of loraflow's.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field

GiB = 1024 ** 3
# What torch's CUDA context takes on a GPU before any tensor (measured ~0.5-1 GiB).
CUDA_CONTEXT_BYTES = 1 * GiB

# ------------------------------------------------------------ preflight
# Files a training run needs from the base repo: weights as safetensors (never pickle),
# configs and tokenizer files.
SNAPSHOT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json",
                     "generation_config.json", "tokenizer*", "special_tokens_map.json",
                     "chat_template.jinja", "*.model", "vocab.*", "merges.txt"]


# model.id may name an adapter repo: training then continues that adapter on the base its
# adapter_config.json names. The contract (checked here, before any weight is read):
# - the base is adapter_config.json's base_model_name_or_path; model.base_id, when set,
#   must equal it (or stands in for it when the adapter names a local path, not a repo);
# - the base revision is adapter_config.json's revision, else model.base_revision, else
#   main; when both name one, they must resolve to the same commit;
# - the lora section describes the adapter: same method and task type, same adapted
#   modules and shape (r, alpha, …; checked against the base's headers in check_memory);
#   lora.init stays default (a trained adapter keeps its weights).
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors"]


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


class AdapterRef(BaseModel):
    """The adapter a run continues, pinned: model.id when it is an adapter repo
    (adapter_config.json and no config.json). Its base is the run's base_model."""
    repo_id: str
    revision: str
    commit: str
    method: str                 # lora.method of the adapter (from its peft_type)
    base_id: str                # the base it sits on
    base_revision: str          # the base revision preflight resolved
    base_revision_from: Literal["adapter_config", "model.base_revision", "default"]
    config: dict                # its adapter_config.json
    download_bytes: int = 0


# ------------------------------------------------------------ memory
class MemoryEstimate(BaseModel):
    """Peak memory of one training step, by part, in bytes."""
    parameters: int
    quantized_parameters: int
    adapter_parameters: int
    layers: int
    tokens_per_step: int
    activation_mode: str
    loaded_weights_bytes: int      # right after from_pretrained (get_memory_footprint)
    weights_bytes: int             # while training (after k-bit preparation)
    adapter_bytes: int             # adapter weights, grads and AdamW states
    activation_bytes: int
    loss_bytes: int
    peak_bytes: int

    def describe(self) -> str:
        g = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
        return (f"{g(self.peak_bytes)} (weights {g(self.weights_bytes)}, adapter+optimizer "
                f"{g(self.adapter_bytes)}, activations {g(self.activation_bytes)}, loss "
                f"{g(self.loss_bytes)}; {self.parameters / 1e9:.2f}B params, "
                f"{self.tokens_per_step} tokens/step)")


class Gpu(BaseModel):
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    bf16: bool = True
    compute_capability: Optional[float] = None  # nvidia-smi's compute_cap, e.g. 9.0

    @property
    def usable_bytes(self) -> int:
        return max(0, self.free_bytes - CUDA_CONTEXT_BYTES)


class MemoryReport(BaseModel):
    """What preflight found: the estimate and, where there are GPUs, whether it fits."""
    estimate: MemoryEstimate
    placement: str                   # "cpu", "gpu:0", "auto over gpu:0,gpu:1 (+cpu)"
    capacity_bytes: Optional[int] = None
    fits: Optional[bool] = None      # None: nothing compared (training on CPU)
    gpus: list[Gpu] = []
    # Under training.memory_cap_gib: the training fields chosen to fit the cap.
    training: Optional[dict] = None
    # Over several processes: the data-parallel engine ("ddp" | "fsdp") and why.
    data_parallel: Optional[str] = None
    data_parallel_reason: Optional[str] = None


# ------------------------------------------------------------ preflight
class PreflightReport(BaseModel):
    user: str
    base_model: ModelRef
    dataset: DatasetRef
    target_repo: str
    memory: Optional[MemoryReport] = None
    adapter: Optional[AdapterRef] = None  # set when training continues an adapter


# ------------------------------------------------------------ download
class SnapshotManifest(BaseModel):
    """What was downloaded: repo@commit, where, and each file's size and sha256."""
    repo_id: str
    commit: str
    local_dir: str
    files: dict[str, dict]
    # The adapter the run continues (model.id is an adapter repo), downloaded beside.
    adapter: Optional["SnapshotManifest"] = None

    def file_hashes(self, predicate=lambda name: True) -> dict[str, str]:
        return {n: m["sha256"] for n, m in sorted(self.files.items()) if predicate(n)}


# ------------------------------------------------------------ dataset
class DatasetManifest(BaseModel):
    """The prepared dataset: where it is, what it holds, and what was left out."""
    path: str
    key: str
    num_train: int
    num_eval: int
    train_tokens: int
    labels: Optional[list[str]] = None  # label / tag names (index = class id), classification
    rows_read: int = 0  # rows in the source split, before anything was dropped
    dropped: dict[str, int] = Field(default_factory=dict)  # reason → rows
    truncated: int = 0  # rows kept but cut at data.max_length


# ------------------------------------------------------------ train
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


RECORD = "record.json"


class TrainResult(BaseModel):
    """What training produced: the run directory, the adapter and its fingerprint."""
    run_dir: str
    adapter_dir: str
    adapter_sha256: str
    trainable_params: int
    total_params: int
    metrics: dict


# ------------------------------------------------------------ publish
class PublishResult(BaseModel):
    repo_id: str
    commit: str
    tag: Optional[str]
    url: str
    new_commit: bool


# ------------------------------------------------------------ local_check
class LocalCheckResult(BaseModel):
    adapter_dir: str
    adapter_sha256: str
    max_abs_diff_vs_base: float


# ------------------------------------------------------------ verify
class VerifyResult(BaseModel):
    repo_id: str
    commit: str
    max_abs_diff_vs_local: float
    max_abs_diff_vs_base: float


# ------------------------------------------------------------ samples
class Sample(BaseModel):
    """One held-out prompt and what the base and the adapter make of it (greedy)."""
    prompt: str
    reference: str          # the rest of the held-out row: what training would have taught
    base: str
    adapter: str


class SamplesResult(BaseModel):
    """Generations from a few held-out prompts, base and adapter side by side.

    `skipped` says why there are none (not a causal LM, no held-out rows)."""
    adapter_sha256: str
    max_new_tokens: int = 0
    source: str = ""        # where the prompts came from, e.g. "first 3 eval rows"
    samples: list[Sample] = []
    skipped: Optional[str] = None
