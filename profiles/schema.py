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
from typing import Annotated, ClassVar, Literal, Optional, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # a quick shape test (preflight)
# The Hub's rule as a JSON-schema pattern, so the Prefect UI and the API refuse a bad id in
# a deployment's parameters before a run exists; the authority is _hub_repo_id below.
REPO_ID_PATTERN = r"^(?!.*(--|\.\.))(?!.*\.git$)\w(?:[\w.-]*\w)?/\w(?:[\w.-]*\w)?$"


def _hub_repo_id(value: str) -> str:
    """huggingface_hub's own repo-id rule (validate_repo_id: characters, length, no `--`
    or `..`, no `.git` end) plus a namespace, which create_repo needs to know whose repo
    it is. The message leaves the field name to the caller (pydantic's location)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        raise ValueError(f"'{value}' is not a repo id the Hub accepts ({exc}). Fix: use "
                         "namespace/name with letters, digits, '-', '_' or '.', not starting "
                         "or ending with '-' or '.', without '--' or '..', at most 96 "
                         "characters, e.g. my-user/my-adapter.") from None
    if "/" not in value:
        raise ValueError(f"'{value}' has no namespace. Fix: write it as namespace/name "
                         f"(your user or organisation), e.g. my-user/{value}.")
    return value


RepoId = Annotated[str, AfterValidator(_hub_repo_id),
                   Field(json_schema_extra={"pattern": REPO_ID_PATTERN})]

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
ComputeDtype = Literal["float32", "float16", "bfloat16"]
# model.task → the data.format values whose rows fit it (tasks/model_tasks.py says what each
# task means to transformers and peft; this table is the profile's rule).
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "causal-lm": ("alpaca", "chat", "prompt-completion", "text"),
    "seq-classification": ("text-label",),
    "token-classification": ("tokens-tags",),
    "seq2seq-lm": ("input-target",),
}
# A size as accelerate's max_memory takes it: 20GiB, 500MB, 1.5TB, 1024 (bytes).
SIZE_RE = re.compile(r"^\d+(\.\d+)?\s*(B|[KMGT]i?B)?$", re.IGNORECASE)
DEVICE_RE = re.compile(r"^(cpu|disk|cuda|cuda:\d+)$")


def _is_device(value) -> bool:
    """A device_map value: a GPU index, cuda / cuda:N, cpu or disk."""
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) and value >= 0) or (
        isinstance(value, str) and bool(DEVICE_RE.match(value)))


# Prefect's run form (the deployment's "Run" page) is rendered from the flow's JSON schema
# by Prefect's UI, which has its own reading of a few JSON-schema shapes (prefect 3.8's
# SchemaFormProperty*, in prefect/server/ui/assets): a `{"type": "null"}` branch of an
# anyOf renders as 'Property is type "None"', a `const` as '… is a const and cannot be
# changed' (and a disabled field), descriptions are Markdown (a bare `<repo_id>` is an
# HTML tag the renderer drops: placeholders go in backticks), and properties are laid out
# by their `position` key. It has no collapsible groups, so advanced fields are grouped by
# position after the common ones and titled "Advanced: …". `_form_schema` reshapes only
# the schema; what validates (pydantic) is untouched.
ADVANCED_PREFIX = "Advanced: "
# An anyOf branch that accepts only null without being null-typed, for a field whose other
# branches are several (an Optional with one branch is inlined instead; see _form_schema).
UNSET_BRANCH = {"enum": [None], "title": "unset"}


def _branch_title(branch: dict) -> Optional[str]:
    """A readable label for an anyOf branch (the form's buttons); None: Prefect's own."""
    if branch.get("type") == "boolean":
        return "true / false"
    if branch.get("type") == "string" and branch.get("enum"):
        return " / ".join(str(v) for v in branch["enum"])
    return None


def _form_property(prop: dict) -> dict:
    """One property reshaped for Prefect's run form; accepts the same values.

    - `const` (pydantic's Literal of one value, e.g. "auto" beside a bool) becomes a
      one-value `enum`: a dropdown, not a disabled "is a const" field.
    - Optional[X] (anyOf [X, null], default null) becomes X without a default: Prefect's
      own parameter validation (schema_tools.validation.preprocess_schema, on the server
      and in the UI) lets null through for a property with a `type` and no default, and
      the form shows an empty X input instead of a "type None" branch. An Optional of
      several branches keeps them, with null accepted by UNSET_BRANCH.
    """
    if "const" in prop:
        prop["enum"] = [prop.pop("const")]
    branches = prop.get("anyOf")
    if not branches:
        return prop
    kept = [_form_property(dict(b)) for b in branches if b.get("type") != "null"]
    nullable = len(kept) < len(branches)
    for branch in kept:
        title = _branch_title(branch)
        if title and "title" not in branch:
            branch["title"] = title
    if nullable and prop.get("default", ...) is None:
        del prop["default"]
    if nullable and len(kept) == 1 and "type" in kept[0]:
        del prop["anyOf"]
        kept[0].pop("title", None)
        return {**kept[0], **prop}
    prop["anyOf"] = kept + ([dict(UNSET_BRANCH)] if nullable else [])
    return prop


def _form_schema(schema: dict, cls) -> None:
    """pydantic's json_schema_extra hook of every section: reshape its properties for
    Prefect's run form (see _form_property) and lay them out — the fields a person sets
    first, the section's `form_advanced` ones after, titled "Advanced: …"."""
    advanced = getattr(cls, "form_advanced", ())
    order = getattr(cls, "form_order", ())
    names = list(schema.get("properties", {}))
    ranked = [n for n in order if n in names] + [n for n in names if n not in order]
    ranked = ([n for n in ranked if n not in advanced] + [n for n in ranked if n in advanced])
    for name, prop in schema.get("properties", {}).items():
        prop = schema["properties"][name] = _form_property(prop)
        prop["position"] = ranked.index(name)
        if name in advanced and "title" in prop:
            prop["title"] = ADVANCED_PREFIX + prop["title"]


class _Section(BaseModel):
    # Unknown keys are typos: refuse them instead of silently ignoring a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              json_schema_extra=_form_schema)
    # The run form's layout (_form_schema): fields listed in form_order first (the rest
    # in declaration order), then the form_advanced ones.
    form_order: ClassVar[tuple[str, ...]] = ()
    form_advanced: ClassVar[tuple[str, ...]] = ()


class ModelSection(_Section):
    """The base model and how it is loaded."""

    form_order = ("id", "revision", "task", "dtype", "attn_implementation")
    form_advanced = ("device_map", "max_memory", "offload_folder", "low_cpu_mem_usage",
                     "trust_remote_code", "base_id", "base_revision")

    id: RepoId = Field(description="Hub repo id of the base model (from_pretrained's "
                    "pretrained_model_name_or_path), e.g. meta-llama/Llama-3.2-1B.")
    revision: str = Field("main", description="Branch, tag or commit of the base model "
                          "(from_pretrained's revision). Resolved to a commit sha by preflight.")
    task: Literal["causal-lm", "seq-classification", "token-classification", "seq2seq-lm"] = Field(
        "causal-lm", description="What the model is trained for: picks the Auto class and "
        "peft's task_type (tasks.model_tasks.py): causal-lm (AutoModelForCausalLM, CAUSAL_LM), "
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
    base_id: Optional[RepoId] = Field(
        None, description="Only when model.id is an adapter repo (adapter_config.json, no "
        "config.json), whose training then continues: the base model it must sit on. null: "
        "the base that adapter_config.json names; set: must equal it (a guard against "
        "continuing an adapter made for another base).")
    base_revision: Optional[str] = Field(
        None, description="Only when model.id is an adapter repo: the base's branch, tag or "
        "commit. null: the revision adapter_config.json names, else main; set: when the "
        "adapter names a revision, both must resolve to the same commit. (model.revision is "
        "then the adapter repo's revision.)")

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

    form_advanced = ("quant_storage", "upcast_non_quantized")

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
    upcast_non_quantized: bool = Field(
        False, description="peft's prepare_model_for_kbit_training upcast of the weights "
        "left unquantized (norms, embeddings, lm_head) to float32. false: they stay in the "
        "model dtype (faster, less memory; the adapter still trains in float32).")


PeftMethod = Literal["lora", "ia3", "loha", "lokr"]
# Which lora.* fields each method takes; any other field must keep its default value.
COMMON_LORA_FIELDS = {"method", "target_modules", "exclude_modules", "modules_to_save",
                      "adapter_name", "autocast_adapter_dtype", "low_cpu_mem_usage"}
METHOD_FIELDS = {
    "lora": COMMON_LORA_FIELDS | {"r", "alpha", "dropout", "bias", "use_rslora", "use_dora",
                                  "init", "layers_to_transform", "rank_pattern",
                                  "alpha_pattern"},
    "ia3": COMMON_LORA_FIELDS | {"feedforward_modules"},
    "loha": COMMON_LORA_FIELDS | {"r", "alpha", "dropout", "module_dropout",
                                  "layers_to_transform", "rank_pattern", "alpha_pattern"},
    "lokr": COMMON_LORA_FIELDS | {"r", "alpha", "dropout", "module_dropout",
                                  "layers_to_transform", "rank_pattern", "alpha_pattern"},
}
# A dropout of 0 is what a method without dropout does anyway: not refused.
NEUTRAL = {"dropout": 0.0, "module_dropout": 0.0}
METHOD_CONFIG = {"lora": "LoraConfig", "ia3": "IA3Config", "loha": "LoHaConfig",
                 "lokr": "LoKrConfig"}
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def _modules_value(value, field: str):
    """A module selector: a non-empty list of names, or a regex string that compiles."""
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise ValueError(f"lora.{field}: {value!r} is not a list of module names. Fix: "
                             "give names such as [q_proj, v_proj], or a regex string.")
        return value
    if isinstance(value, str) and value != "all-linear":
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"lora.{field}: '{value}' is not a valid regular expression "
                             f"({exc}). Fix: escape the dots (\\.) or give a list of names."
                             ) from None
    return value


class LoraSection(_Section):
    """The adapter: which peft method, where it goes and how it is initialised.

    The section keeps the name `lora` for every method. Fields that a method has no use
    for must keep their default value (a set one is refused, naming the method).
    """

    form_advanced = ("module_dropout", "exclude_modules", "feedforward_modules", "bias",
                     "use_rslora", "use_dora", "init", "modules_to_save",
                     "layers_to_transform", "rank_pattern", "alpha_pattern", "adapter_name",
                     "autocast_adapter_dtype", "low_cpu_mem_usage")

    method: PeftMethod = Field(
        "lora", description="The peft method: lora (LoraConfig), ia3 (IA3Config: learned "
        "scaling vectors), loha (LoHaConfig: Hadamard product), lokr (LoKrConfig: Kronecker "
        "product).")
    r: int = Field(8, gt=0, le=1024, description="LoraConfig.r / LoHaConfig.r / LoKrConfig.r: "
                   "the adapter rank (lora, loha, lokr).")
    alpha: int = Field(16, gt=0, description="LoraConfig.lora_alpha / LoHaConfig.alpha / "
                       "LoKrConfig.alpha: scaling is alpha / r (alpha / sqrt(r) with "
                       "use_rslora).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoraConfig.lora_dropout (lora); "
                           "LoHaConfig/LoKrConfig.rank_dropout (loha, lokr). ia3 has none.")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoHaConfig/LoKrConfig."
                                  "module_dropout (loha, lokr): the chance of skipping an "
                                  "adapted module for a step.")
    target_modules: Union[list[str], str] = Field(
        "all-linear", description="target_modules: 'all-linear' (every linear layer of the "
        "blocks, not the output head), a list of module names (e.g. [q_proj, v_proj]: a "
        "module whose path ends with one), or a regex string matched against the full "
        r"module path (e.g. `.*\.layers\.[01]\.self_attn\.(q|v)_proj`).")
    exclude_modules: Optional[Union[list[str], str]] = Field(
        None, description="exclude_modules: modules left out of target_modules, as a list of "
        "names or a regex string (same rules as target_modules).")
    feedforward_modules: Optional[list[str]] = Field(
        None, description="IA3Config.feedforward_modules (ia3): targeted modules whose input "
        "(not output) is scaled; each must be a target. null: peft's default for the "
        "architecture (down_proj for Llama).")
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="LoraConfig.bias (lora): which biases train too: none, all, or "
        "lora_only (those of the adapted layers).")
    use_rslora: bool = Field(False, description="LoraConfig.use_rslora (lora): rank-stabilized "
                             "scaling alpha / sqrt(r).")
    use_dora: bool = Field(False, description="LoraConfig.use_dora (lora): weight-decomposed "
                           "LoRA (a trained magnitude vector per adapted layer).")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default", description="LoraConfig.init_lora_weights (lora): default (True: B = 0, "
        "the adapter starts as a no-op), gaussian, pissa or olora (start from the weights' "
        "principal directions / QR; they modify the base weights in memory, and the saved "
        "adapter is converted to a plain LoRA of rank 2r that loads on the original base).")
    modules_to_save: Optional[list[str]] = Field(
        None, description="modules_to_save: modules trained in full and saved with the "
        "adapter (e.g. [lm_head]).")
    layers_to_transform: Optional[list[int]] = Field(
        None, description="layers_to_transform (lora, loha, lokr): only adapt these block "
        "indices, e.g. [0, 1]. Needs target_modules 'all-linear' or a list.")
    rank_pattern: Optional[dict[str, int]] = Field(
        None, description="rank_pattern (lora, loha, lokr): a rank per module, {name or "
        "regex: r}, e.g. {q_proj: 16}; other modules get r.")
    alpha_pattern: Optional[dict[str, int]] = Field(
        None, description="alpha_pattern (lora, loha, lokr): an alpha per module, {name or "
        "regex: alpha}; other modules get alpha.")
    adapter_name: str = Field(
        "default", description="get_peft_model's adapter_name: the adapter's name inside the "
        "model (several named adapters can live on one model). The saved files do not "
        "depend on it.")
    autocast_adapter_dtype: bool = Field(
        True, description="get_peft_model's autocast_adapter_dtype: keep the adapter in "
        "float32 over a float16/bfloat16 base (false: the base's dtype).")
    low_cpu_mem_usage: bool = Field(
        False, description="low_cpu_mem_usage of PeftModel.from_pretrained: create the "
        "adapter's weights empty and fill them from the file. Only when model.id is an "
        "adapter repo being continued (a fresh adapter has no file to fill them from).")

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _check_modules(cls, value, info):
        return value if value is None else _modules_value(value, info.field_name)

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _check_pattern(cls, value, info):
        for key, v in (value or {}).items():
            if v <= 0:
                raise ValueError(f"lora.{info.field_name}: {key}: {v} is not positive. Fix: "
                                 "give each module a value above 0.")
            try:
                re.compile(key)
            except re.error as exc:
                raise ValueError(f"lora.{info.field_name}: key '{key}' is not a valid regular "
                                 f"expression ({exc}). Fix: a module name or a regex.") from None
        return value

    @field_validator("adapter_name")
    @classmethod
    def _check_adapter_name(cls, value):
        if not ADAPTER_NAME_RE.match(value):
            raise ValueError(f"lora.adapter_name: '{value}' is not a plain name (it becomes "
                             "a module attribute and a folder name). Fix: letters, digits, "
                             "_ and -, starting with a letter or _.")
        return value

    @model_validator(mode="after")
    def _method_checks(self) -> "LoraSection":
        allowed = METHOD_FIELDS[self.method]
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if name not in allowed and value != field.default and value != NEUTRAL.get(name):
                users = [m for m, f in METHOD_FIELDS.items() if name in f]
                raise ValueError(
                    f"lora.{name}: not an option of method {self.method} (peft's "
                    f"{METHOD_CONFIG[self.method]} has no such setting; it belongs to "
                    f"{', '.join(users)}). Fix: remove lora.{name}, or set lora.method to "
                    f"{users[0]}.")
        if self.layers_to_transform is not None:
            if not self.layers_to_transform or any(i < 0 for i in self.layers_to_transform):
                raise ValueError("lora.layers_to_transform: give block indices 0, 1, … (a "
                                 "non-empty list). Fix: e.g. [0, 1], or null for all blocks.")
            if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
                raise ValueError("lora.layers_to_transform: peft ignores it when "
                                 "target_modules is a regex. Fix: put the layer indices in "
                                 "the regex (e.g. '.*\\.layers\\.(0|1)\\..*_proj'), or give "
                                 "target_modules as a list.")
        if self.feedforward_modules is not None and isinstance(self.target_modules, list):
            missing = [m for m in self.feedforward_modules if m not in self.target_modules]
            if missing:
                raise ValueError(f"lora.feedforward_modules: {missing} are not in "
                                 "lora.target_modules (IA3 scales only targeted modules). "
                                 "Fix: add them to target_modules or remove them here.")
        if self.init in ("pissa", "olora"):
            if self.use_dora or self.modules_to_save:
                what = "use_dora" if self.use_dora else "modules_to_save"
                raise ValueError(
                    f"lora.init: {self.init} adapters are saved converted to plain LoRA (so "
                    f"they load on the unmodified base), and the conversion drops {what} "
                    f"weights. Fix: set lora.init to default or gaussian, or remove lora.{what}.")
            if self.use_rslora and (self.rank_pattern or self.alpha_pattern):
                raise ValueError(
                    f"lora.init: peft cannot convert a {self.init} adapter back to plain LoRA "
                    "with use_rslora and rank_pattern/alpha_pattern together. Fix: drop "
                    "use_rslora or the patterns, or set lora.init to default.")
        return self


class DataSection(_Section):
    """The training data and how it becomes token sequences."""

    form_order = ("dataset", "format")
    form_advanced = ("padding_side",)

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
                              "(labels = -100), so only responses are learned. format chat: "
                              "false puts labels on every token of the rendered conversation "
                              "(data.train_on is then moot).")
    max_length: int = Field(512, gt=8, description="Tokens per example; longer ones are "
                            "truncated (tokenizer truncation max_length).")
    eval_split: float = Field(0.1, ge=0.0, lt=0.5, description="Fraction held out for "
                              "evaluation (Dataset.train_test_split test_size); 0 = none.")
    padding_side: Literal["right", "left"] = Field(
        "right", description="The tokenizer's padding_side when batches are padded: right "
        "(the usual for training), or left.")
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant", description="format chat: which assistant turns carry labels — every "
        "one (all_assistant) or only the conversation's last (last_assistant). A turn's labels "
        "are exactly what the chat template renders for it: its content (or rendered tool call) "
        "and its end-of-turn token, never the role header; tool, user and system turns are "
        "never trained.")
    chat_template: Optional[str] = Field(
        None, description="format chat: null = the tokenizer's own template; a name of one "
        "of the tokenizer's named templates (e.g. tool_use); or a path to a Jinja file "
        "(its content keys the prepared dataset, not its path).")
    system_message: Literal["keep", "merge", "drop"] = Field(
        "keep", description="format chat: what to do with system turns — keep them; merge "
        "their text into the next user turn (for templates that refuse a system role, e.g. "
        "Gemma's); or drop them.")


class TrainingSection(_Section):
    """The training loop (transformers.TrainingArguments)."""

    form_advanced = ("weight_decay", "max_grad_norm", "checkpoint_layers", "memory_cap_gib",
                     "liger_kernel", "torch_compile", "activation_memory_budget",
                     "offload_activations", "fp8", "fp8_target_modules", "fp8_backward",
                     "optimizer", "save_total_limit", "seed", "launcher", "nproc_per_node",
                     "global_batch_size", "data_parallel")

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
    checkpoint_layers: Optional[int] = Field(
        None, ge=0, description="With gradient_checkpointing: checkpoint only the first N "
        "decoder layers (the rest keep their activations: faster, more memory). null: all.")
    memory_cap_gib: Optional[float] = Field(
        None, gt=0, description="A memory budget per GPU in GiB: preflight picks the "
        "per-device batch (a divisor of the global batch) and how many layers to checkpoint "
        "so that the estimated peak stays under it — as few checkpointed layers as fit, then "
        "the largest batch — and training uses that choice (same global batch). null: train "
        "with the batch and checkpointing as given.")
    packing: bool = Field(
        False, description="Pack each micro-batch's examples into rows of data.max_length "
        "tokens (position_ids restart per example, attention never crosses examples) "
        "instead of padding them: the same loss on far fewer padding tokens.")
    liger_kernel: Union[Literal["auto", "loss"], bool] = Field(
        "auto", description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused "
        "linear cross-entropy; package liger-kernel, extra loraflow[fast]). loss: only the "
        "fused linear cross-entropy, the decoder layers left as they are (for "
        "torch.compile to fuse). auto: on when installed and a CUDA GPU is present; only "
        "the loss when the decoder layers are compiled (measured faster: Liger's layer "
        "kernels break the compiled graph; docs/benchmarks.md).")
    torch_compile: Union[Literal["auto"], bool] = Field(
        "auto", description="torch.compile each decoder layer (regional compilation, "
        "inductor): fuses the elementwise work around the matmuls, LoRA's among it, for "
        "the price of compiling one layer at the first step and again for every new batch "
        "shape. auto: on with training.packing (fixed row length) for a causal-lm (16-bit "
        "or 4-bit) trained by one process on a CUDA GPU; off for padded batches, whose "
        "length changes.")
    activation_memory_budget: float = Field(
        1.0, title="Activation memory budget (compiled layers)", description="Only with "
        "compiled layers (torch_compile true, or auto with packing on one CUDA GPU); "
        "ignored otherwise. Below 1, compiled layers keep that fraction of their activations "
        "for the backward and recompute the cheapest rest (SwiGLU's product, norms, casts): "
        "less memory, a little slower (1B: 22.4 → 14.3 GiB, −8% speed at 0.5). 1 = torch's "
        "default (torch._functorch.config.activation_memory_budget).")
    offload_activations: bool = Field(
        False, title="Offload checkpointed activations to CPU", description="With "
        "gradient_checkpointing: each checkpointed layer's input (batch × sequence × hidden, "
        "16-bit) waits for the backward in pinned CPU memory instead of on the GPU, copied "
        "out and back on a side stream while other layers compute — saves that much GPU "
        "memory per checkpointed layer for little time. One process. With compiled layers "
        "on transformers ≥ 5.23 (which checkpoints inside the compiled forward) the layers "
        "checkpoint on the GPU instead; the run's record says how many offloaded. "
        "memory_cap_gib turns it on when nothing else fits.")
    fp8: bool = Field(
        False, title="FP8 base matmuls", description="FP8 matmuls for the frozen base "
        "weights of LoRA layers (e4m3, row-wise scales, torch._scaled_mm); the adapter "
        "itself trains in 16/32 bits. Changes the base's matmul precision, so it is opt-in: "
        "on the 1B learnable check all seven projections moved the loss 3.4–3.8% from "
        "16-bit training (the bound is 2%), fp8_target_modules [gate_proj, up_proj] with "
        "fp8_backward dequantized 0.6% (one seed; 16 bits: 0.7%) — set both fields for "
        "that recipe, their defaults give the first. Needs a GPU with FP8 tensor cores "
        "(compute capability ≥ 8.9), lora.method lora without DoRA, and no quantization.")
    fp8_target_modules: Optional[list[str]] = Field(
        None, title="FP8: which LoRA layers", description="With fp8: the leaf names of the "
        "LoRA layers whose base runs in FP8, e.g. [gate_proj, up_proj] (a Llama MLP's input "
        "projections: with fp8_backward dequantized, the recipe that trained as 16 bits do "
        "on the learnable check); null: every LoRA layer FP8 can take.")
    fp8_backward: Literal["fp8", "dequantized"] = Field(
        "fp8", title="FP8: input gradient", description="With fp8: fp8 quantizes the "
        "gradient and multiplies it with a transposed fp8 copy of the weight (both matmuls "
        "on FP8 tensor cores; weight memory as in 16 bits); dequantized keeps the gradient "
        "in 16 bits against the fp8 weight dequantized per layer (one fp8 copy: half the "
        "weight memory of the converted layers; the backward matmul in 16 bits, so slower: "
        "8B, batch 2 × 2, all seven projections: 14,938 tok/s against 18,097 with fp8).")
    optimizer: Literal["auto", "adamw_torch", "adamw_torch_fused", "adamw_8bit",
                       "paged_adamw_8bit"] = Field(
        "auto", description="TrainingArguments.optim. auto: transformers' default (fused "
        "AdamW). The 8-bit / paged ones (bitsandbytes, GPU) save optimizer memory.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N steps "
                            "(TrainingArguments.save_steps); a re-run resumes from the last.")
    save_total_limit: int = Field(2, gt=0, description="TrainingArguments.save_total_limit.")
    eval_steps: Optional[int] = Field(None, gt=0, description="Evaluate every N steps "
                                      "(TrainingArguments.eval_steps); null: once at the end.")
    logging_steps: int = Field(5, gt=0, description="TrainingArguments.logging_steps.")
    seed: int = Field(42, description="TrainingArguments.seed; also the eval split's seed.")
    launcher: Literal["auto", "single", "torchrun"] = Field(
        "auto", description="How training runs: single (in the task's process), torchrun "
        "(torch.distributed.run over nproc_per_node processes, data-parallel as "
        "training.data_parallel says), auto (torchrun when more than one GPU is visible).")
    nproc_per_node: Optional[int] = Field(
        None, gt=0, description="torchrun --nproc_per_node; null: every visible GPU.")
    global_batch_size: Optional[int] = Field(
        None, gt=0, description="Examples per optimizer step over all processes: "
        "gradient_accumulation_steps is derived as global / (per_device_batch_size × "
        "processes), so one profile means the same training on 1 or N GPUs. null: use "
        "gradient_accumulation_steps as given.")
    data_parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="How several training processes share the work: ddp (each "
        "holds the whole model, gradients are averaged: fastest when it fits), fsdp (the "
        "weights are sharded over the processes: for a model that does not fit one GPU; "
        "a 4-bit base needs quantization.quant_storage bfloat16, float16 or float32), auto "
        "(the launcher chooses from the memory plan: ddp when the model, quantized or not, "
        "plus its activations fit one GPU, fsdp only when they do not). One process: "
        "ignored.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = Field(
        default_factory=list, description="TrainingArguments.report_to: where transformers' "
        "own integrations also send the logged metrics — tensorboard (event files in the "
        "run directory), mlflow, wandb, trackio; each needs its package installed (loraflow "
        "extras). Empty: none (loss and the other metrics still go to the Prefect logs and "
        "the progress artifact).")

    @field_validator("activation_memory_budget")
    @classmethod
    def _check_activation_memory_budget(cls, value):
        if not 0 < value <= 1:
            raise ValueError(f"training.activation_memory_budget: a fraction of the "
                             f"activations, above 0 and at most 1; got {value}. Fix: set it "
                             "in (0, 1] (1 = torch's default; 0.5–0.6 measured).")
        return value

    @field_validator("report_to")
    @classmethod
    def _check_report_to(cls, value):
        repeated = sorted({v for v in value if value.count(v) > 1})
        if repeated:
            raise ValueError(f"training.report_to: {', '.join(repeated)} listed more than "
                             "once. Fix: name each integration once, e.g. [tensorboard, "
                             "mlflow].")
        return value


class PublishSection(_Section):
    """Where the adapter is published."""

    form_order = ("repo_id", "when", "tag", "private")

    repo_id: RepoId = Field(description="Target Hub repo id, namespace/name (create_repo's "
                         "repo_id); the token's user must be able to write to the namespace.")
    private: bool = Field(True, description="create_repo's private: private unless you opt out.")
    tag: Optional[str] = Field(None, description="Tag for this version (create_tag's tag); "
                               "null: the next vN.")
    license: Optional[str] = Field(None, description="The card's license (ModelCardData."
                                   "license); null: inherited from the base model's card.")
    merged: bool = Field(False, description="Also push the base with the adapter merged in, "
                         "as 16-bit safetensors (merge_and_unload), to `<repo_id>-merged`.")
    when: Literal["inline", "on_approval"] = Field(
        "inline", description="inline: the run publishes the adapter right after training "
        "and verifies the Hub copy. on_approval: it stops after training and a check of "
        "the local adapter; publish it later with `loraflow publish RUN_DIR` or the "
        "loraflow-publish deployment.")


class Profile(_Section):
    """A complete fine-tuning run: base model, quantization, adapter, data, training, publish."""

    # The form asks for what has no default first (model, data, publish).
    form_order = ("model", "data", "publish", "lora", "training", "quantization")

    model: ModelSection
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    publish: PublishSection

    @model_validator(mode="after")
    def _cross_field_checks(self) -> "Profile":
        if self.training.packing and self.model.task != "causal-lm":
            raise ValueError(f"training.packing: packing is for causal-lm; model.task is "
                             f"{self.model.task}, whose collator pads per example. Fix: set "
                             "training.packing to false.")
        if self.training.checkpoint_layers is not None \
                and not self.training.gradient_checkpointing:
            raise ValueError("training.checkpoint_layers: it chooses which layers are "
                             "checkpointed, but training.gradient_checkpointing is false. Fix: "
                             "set gradient_checkpointing to true, or checkpoint_layers to null.")
        if self.training.offload_activations and not self.training.gradient_checkpointing:
            raise ValueError("training.offload_activations: it moves the inputs of "
                             "checkpointed layers to CPU memory, but training."
                             "gradient_checkpointing is false. Fix: set training."
                             "gradient_checkpointing to true, or training.offload_activations "
                             "to false.")
        if self.training.fp8 and self.quantization.mode != "none":
            raise ValueError(f"training.fp8: FP8 matmuls replace 16-bit base weights, but "
                             f"quantization.mode is {self.quantization.mode}. Fix: set "
                             "training.fp8 to false, or quantization.mode to none.")
        fp8_options = [f"training.{name}" for name, default in
                       (("fp8_target_modules", None), ("fp8_backward", "fp8"))
                       if getattr(self.training, name) != default]
        if fp8_options and not self.training.fp8:
            several = len(fp8_options) > 1
            raise ValueError(f"{', '.join(fp8_options)}: {'they shape' if several else 'it shapes'}"
                             f" FP8 matmuls, but training.fp8 is false. Fix: set training.fp8 "
                             f"to true, or leave {' and '.join(fp8_options)} at "
                             f"{'their defaults' if several else 'its default'}.")
        if self.training.fp8_target_modules == []:
            raise ValueError("training.fp8_target_modules: an empty list converts no layer. "
                             "Fix: name LoRA layers, e.g. [gate_proj, up_proj], or set it to "
                             "null for all of them.")
        lora_targets = self.lora.target_modules
        if self.training.fp8_target_modules and isinstance(lora_targets, list):
            leaves = {t.rsplit(".", 1)[-1] for t in lora_targets}
            outside = [m for m in self.training.fp8_target_modules if m not in leaves]
            if outside:
                raise ValueError(f"training.fp8_target_modules: {outside} name no LoRA layer "
                                 f"by its leaf name (lora.target_modules is {lora_targets}; "
                                 "this field takes the last part of a module name, e.g. "
                                 "v_proj), and FP8 converts only the base of LoRA layers. Fix: "
                                 "name layers from lora.target_modules by their leaf name, or "
                                 "add these to it.")
        if self.training.fp8 and self.lora.method != "lora":
            raise ValueError(f"training.fp8: FP8 replaces the base of LoRA layers, and "
                             f"lora.method is {self.lora.method}. Fix: set training.fp8 to "
                             "false, or lora.method to lora.")
        if self.training.offload_activations and self.training.launcher == "torchrun" \
                and self.training.nproc_per_node != 1:
            raise ValueError("training.offload_activations: offloaded checkpointing runs in "
                             "one process, and training.launcher is torchrun. Fix: set "
                             "training.launcher to single or auto, or training."
                             "offload_activations to false.")
        if self.training.fp8 and self.lora.use_dora:
            raise ValueError("training.fp8: DoRA reads the base weight itself, which FP8 "
                             "replaces. Fix: set training.fp8 to false, or lora.use_dora to "
                             "false.")
        if self.model.trust_remote_code and not SHA_RE.match(self.model.revision):
            raise ValueError("model.trust_remote_code: remote code runs only from a pinned "
                             "commit. Fix: set model.revision to a 40-hex commit sha, or "
                             "set model.trust_remote_code to false.")
        if self.training.data_parallel != "auto" and self.training.launcher == "single":
            raise ValueError(f"training.data_parallel: {self.training.data_parallel} shares "
                             "the work of several processes, but training.launcher is single "
                             "(one process). Fix: set training.launcher to torchrun or auto, "
                             "or training.data_parallel to auto.")
        if self.training.data_parallel == "fsdp" and self.quantization.mode in ("nf4", "fp4") \
                and self.quantization.quant_storage == "uint8":
            raise ValueError("training.data_parallel: FSDP shards a 4-bit base only when its "
                             "packed weights are stored as a float dtype (peft's FSDP-QLoRA "
                             "recipe), and quantization.quant_storage is uint8. Fix: set "
                             "quantization.quant_storage to bfloat16, or training."
                             "data_parallel to auto or ddp.")
        if self.training.eval_steps and self.data.eval_split == 0:
            raise ValueError("training.eval_steps: evaluation needs held-out data. Fix: set "
                             "data.eval_split above 0, or training.eval_steps to null.")
        if self.lora.init in ("pissa", "olora") and self.quantization.mode != "none":
            raise ValueError(f"lora.init: {self.lora.init} rewrites the base weights, and over a "
                             f"{self.quantization.mode} base the adapter converted back to plain "
                             "LoRA no longer reproduces the trained model. Fix: set lora.init "
                             "to default or gaussian, or quantization.mode to none.")
        if self.quantization.mode in ("nf4", "fp4") and self.model.dtype == "float32" \
                and self.quantization.compute_dtype != "float32":
            raise ValueError("quantization.compute_dtype: float32 weights with a "
                             f"{self.quantization.compute_dtype} compute dtype. Fix: set "
                             "model.dtype to bfloat16/auto or compute_dtype to float32.")
        return self

    @model_validator(mode="after")
    def _task_fits_format(self) -> "Profile":
        fits = TASK_FORMATS[self.model.task]
        if self.data.format not in fits:
            users = [task for task, formats in TASK_FORMATS.items() if self.data.format in formats]
            raise ValueError(
                f"data.format: '{self.data.format}' rows do not fit model.task "
                f"{self.model.task}, which trains on {' or '.join(fits)} rows. Fix: set "
                f"data.format to {' or '.join(fits)}, or model.task to {' or '.join(users)}.")
        return self


def presets_dir() -> Path:
    return Path(__file__).parent
