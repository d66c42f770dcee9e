"""The four task types: for each, the Auto class, peft's TaskType, the data formats that
fit it, the collator and the Hub pipeline tag. The one table every step reads, and the
small helpers that differ by task (the base config check, the classification head, the
tokenizer's padding, the collator, the probe that verification runs).

Importing this module imports neither torch nor transformers: preflight uses it.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional

from profiles.schema import TASK_FORMATS
from tasks import errors

Task = Literal["causal-lm", "seq-classification", "token-classification", "seq2seq-lm"]


@dataclass(frozen=True)
class TaskType:
    """What one `model.task` value means to each library."""
    name: str
    auto_class: str           # transformers Auto class name
    peft_task_type: str       # peft.TaskType member name
    formats: tuple[str, ...]  # data.format values that fit this task
    collator: str             # transformers collator class name
    pipeline_tag: str         # the model card's pipeline_tag
    mapping: str              # transformers' MODEL_FOR_…_MAPPING_NAMES: the model types it has

    @property
    def classifies(self) -> bool:
        """Whether the head is sized by label names collected from the data."""
        return self.name in ("seq-classification", "token-classification")


TASKS: dict[str, TaskType] = {
    "causal-lm": TaskType(
        "causal-lm", "AutoModelForCausalLM", "CAUSAL_LM",
        TASK_FORMATS["causal-lm"], "DataCollatorForSeq2Seq",
        "text-generation", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "seq-classification": TaskType(
        "seq-classification", "AutoModelForSequenceClassification", "SEQ_CLS",
        TASK_FORMATS["seq-classification"], "DataCollatorWithPadding", "text-classification",
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    "token-classification": TaskType(
        "token-classification", "AutoModelForTokenClassification", "TOKEN_CLS",
        TASK_FORMATS["token-classification"], "DataCollatorForTokenClassification",
        "token-classification",
        "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    "seq2seq-lm": TaskType(
        "seq2seq-lm", "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM",
        TASK_FORMATS["seq2seq-lm"], "DataCollatorForSeq2Seq",
        "text2text-generation", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
}
# Labels of padding positions and of sub-word pieces after a word's first: the loss skips them.
IGNORE_INDEX = -100


def task_type(task: str) -> TaskType:
    """The TaskType of a `model.task` value (KeyError for an unknown one: the schema's
    Literal refuses those first)."""
    return TASKS[task]


def peft_task_type(task: str):
    """peft.TaskType for a `model.task` value, e.g. 'seq2seq-lm' → TaskType.SEQ_2_SEQ_LM."""
    from peft import TaskType as PeftTaskType

    return getattr(PeftTaskType, TASKS[task].peft_task_type)


# ------------------------------------------------------------------ base config check

@lru_cache(maxsize=1)
def _auto_mappings() -> dict[str, dict[str, str]]:
    """transformers' model_type → class name tables, read from the source of
    transformers/models/auto/modeling_auto.py without importing it (importing it imports
    torch). {} when transformers is not installed or the file has another layout."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "auto" / "modeling_auto.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return {}
    wanted = {t.mapping for t in TASKS.values()}
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id in wanted:
            value = node.value.args[0] if isinstance(node.value, ast.Call) and node.value.args \
                else node.value
            try:
                out[node.targets[0].id] = dict(ast.literal_eval(value))
            except ValueError:
                continue
    return out


def check_config(task: str, config: dict, repo_id: str = "the base model") -> None:
    """Refuse a task the base model's config.json cannot do, before any weight is read.

    The model type must be one transformers has the task's Auto class for (its
    MODEL_FOR_…_MAPPING_NAMES); seq2seq-lm also needs an encoder-decoder config.

    Raises:
        ProfileError: naming model.task, the model's type and what would fit.
    """
    spec = TASKS[task]
    model_type = config.get("model_type")
    arch = (config.get("architectures") or [model_type])[0]
    mappings = _auto_mappings()
    table = mappings.get(spec.mapping)
    can = None if table is None or model_type is None else model_type in table
    if task == "seq2seq-lm" and not config.get("is_encoder_decoder", False):
        can = False
    if can is False:
        fits = [t.name for t in TASKS.values()
                if model_type in mappings.get(t.mapping, {})
                and (t.name != "seq2seq-lm" or config.get("is_encoder_decoder", False))]
        hint = (" an encoder-decoder base (e.g. a T5 or BART)" if task == "seq2seq-lm"
                else f" a base whose type transformers has {spec.auto_class} for")
        raise errors.ProfileError(
            f"model.task: {task} needs {spec.auto_class}, which transformers does not have "
            f"for {repo_id} ({arch}, model_type {model_type!r}). Fix: set model.task to "
            f"{' or '.join(fits) or 'a task this model supports'}, or pick{hint} as model.id.")


def check_local_config(task: str, local_dir: str) -> None:
    """check_config over a downloaded snapshot's config.json."""
    path = Path(local_dir) / "config.json"
    if path.is_file():
        check_config(task, json.loads(path.read_text()), str(local_dir))


# ------------------------------------------------------------------ model head

def head_kwargs(task: str, labels: Optional[list[str]]) -> dict:
    """from_pretrained arguments that size a classification head from the label names
    collected from the data: num_labels, id2label, label2id. {} for the other tasks."""
    if not TASKS[task].classifies or not labels:
        return {}
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


# The heads peft trains whole (modules_to_save) for SEQ_CLS and TOKEN_CLS.
CLASSIFIER_HEADS = ("classifier", "score")


# Set by tasks.training.modeling.load_base_model on the loaded model: the modules whose weights the
# checkpoint lacked, which transformers initialised at random (a new head, a pooler).
FRESH_MODULES_ATTR = "loraflow_fresh_modules"


def fresh_modules(missing_keys) -> list[str]:
    """The module paths of the parameters from_pretrained reported missing (its
    output_loading_info), i.e. initialised at random on this load."""
    return sorted({k.rsplit(".", 1)[0] for k in missing_keys if "." in k})


def adapter_for_task(base, lora, task: str):
    """The lora section as model.task needs it on this model.

    A classification head starts random and peft trains it whole (modules_to_save), so
    'all-linear' must not wrap it in an adapter too: peft leaves it out for SEQ_CLS but
    not for TOKEN_CLS, and then fails ("modules_to_save cannot be applied to modules of
    type lora.Linear"). The head is added to lora.exclude_modules in both cases.

    Any other module the checkpoint lacked (DistilBERT's pre_classifier, the pooler of
    a BERT saved without one) is drawn at random on every load: unless the adapter
    carries it, the published adapter reproduces nothing on another machine. It is
    added to lora.modules_to_save (trained and saved whole) and left out of
    'all-linear' like a head.
    """
    from tasks.training.adapters import model_modules, resolved_targets

    present = [h for h in CLASSIFIER_HEADS if getattr(base, h, None) is not None] \
        if TASKS[task].classifies else []
    fresh = [m for m in getattr(base, FRESH_MODULES_ATTR, None) or []
             if not any(m == h or m.startswith(h + ".") for h in present)]
    if fresh:
        have = list(lora.modules_to_save or [])
        lora = lora.model_copy(update={"modules_to_save": have + [
            m for m in fresh if m not in have
            and not any(m.startswith(p + ".") for p in fresh)]})
    if lora.target_modules != "all-linear" or not (present or fresh):
        return lora
    linears, out_heads = model_modules(base)[:2] if hasattr(base, "named_modules") else ([], [])
    # A head may be one linear (BERT's classifier) or a block of them (RoBERTa's
    # classifier.dense / classifier.out_proj): every linear in it is left out.
    heads = [name for h in present
             for name in ([n for n in linears if n.startswith(h + ".")] or [h])]
    targets = set(resolved_targets(lora, linears, out_heads))
    heads += [n for n in linears if n.rsplit(".", 1)[-1] in targets and n not in heads
              and any(n == f or n.startswith(f + ".") for f in fresh)]
    current = lora.exclude_modules
    if not heads:
        return lora
    if current is None:
        exclude = heads
    elif isinstance(current, str):  # a regex over full module paths
        exclude = f"(?:{current})|{'|'.join(re.escape(h) for h in heads)}"
    else:
        exclude = list(current) + [h for h in heads if h not in current]
    return lora.model_copy(update={"exclude_modules": exclude})


# ------------------------------------------------------------------ tokenizer and collator

def prepare_tokenizer(tokenizer, padding_side: str = "right"):
    """Padding for training: the tokenizer's own pad token; only when it has none, EOS
    (labels never mask pad_token_id: the collators pad labels with -100, so a real EOS in
    the labels stays learned). `padding_side` is data.padding_side.

    Raises:
        ProfileError: the tokenizer has neither a pad nor an EOS token.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise errors.ProfileError(
                "model.id: its tokenizer has neither a pad token nor an EOS token, so "
                "batches cannot be padded. Fix: use a base whose tokenizer defines one "
                "(tokenizer_config.json pad_token or eos_token).")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def data_collator(task: str, tokenizer, model=None):
    """The task's collator: pads inputs with the tokenizer (its padding side) and labels
    with -100. A classification base without a pad token id learns the tokenizer's (a
    sequence classifier reads the last non-pad token)."""
    import transformers

    spec = TASKS[task]
    cls = getattr(transformers, spec.collator)
    if model is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if spec.collator == "DataCollatorWithPadding":
        return cls(tokenizer, padding=True, pad_to_multiple_of=8)
    return cls(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8)


# ------------------------------------------------------------------ verification probe

def probe_inputs(task: str, tokenizer, model, text: str) -> dict:
    """Model inputs for one fixed text, for comparing logits: the text itself, and for a
    seq2seq model also as the decoder's input (teacher forcing, shifted right)."""
    import torch

    inputs = dict(tokenizer(text, return_tensors="pt"))
    if task == "seq2seq-lm":
        ids = inputs["input_ids"][0].tolist()
        start = model.config.decoder_start_token_id
        inputs["decoder_input_ids"] = torch.tensor([[start] + ids[:-1]])
    return {k: v.to(model.device) for k, v in inputs.items()}


def record_labels(record_path) -> Optional[list[str]]:
    """The label / tag names a finished training sized its head with, from its record
    (tasks.train.RECORD in the run directory), for loading the base again the same way
    (verification, the local check, the merge). None when there are none."""
    try:
        record = json.loads(Path(record_path).read_text())
    except (OSError, ValueError):
        return None
    return (record.get("dataset") or {}).get("labels")


# ------------------------------------------------------------------ module layout from the source
# Preflight knows a model only by its config.json and safetensors headers. Two facts of
# its layout are in neither: which weights are transformers' Conv1D (GPT-2 family: stored
# [in, out], the transpose of nn.Linear) and which output head the class ties to an
# embedding (a tied model's files hold no lm_head weight, yet the module exists). Both are
# read here from transformers' own modeling source, without importing it (importing it
# imports torch), so a new architecture needs no table of ours.

def _transformers_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=None)
def _modeling_tree(model_type: str):
    """The parsed models/<module>/modeling_<module>.py of a model_type, or None."""
    root = _transformers_dir()
    if root is None or not model_type:
        return None
    module = model_type.replace("-", "_")
    if not (root / "models" / module).is_dir():
        module = _special_module_names().get(model_type, module)
    path = root / "models" / module / f"modeling_{module}.py"
    try:
        return ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return None


@lru_cache(maxsize=1)
def _special_module_names() -> dict[str, str]:
    """transformers' SPECIAL_MODEL_TYPE_TO_MODULE_NAME (e.g. openai-gpt → openai)."""
    root = _transformers_dir()
    out: dict[str, str] = {}
    for name in ("auto_mappings.py", "configuration_auto.py"):
        try:
            tree = ast.parse((root / "models" / "auto" / name).read_text())
        except (OSError, SyntaxError, TypeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "SPECIAL_MODEL_TYPE_TO_MODULE_NAME"
                    for t in node.targets):
                value = node.value.args[0] if isinstance(node.value, ast.Call) \
                    and node.value.args else node.value
                try:
                    out.update(dict(ast.literal_eval(value)))
                except ValueError:
                    continue
    return out


@lru_cache(maxsize=None)
def conv1d_modules(model_type: str) -> frozenset[str]:
    """Leaf names of the modules a model_type builds as transformers' Conv1D
    (`self.c_attn = Conv1D(...)` in its modeling file), e.g. gpt2 → c_attn, c_fc,
    c_proj, q_attn. Their weights are stored [in_features, out_features]."""
    tree = _modeling_tree(model_type)
    if tree is None:
        return frozenset()
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                and isinstance(node.value.func, ast.Name) and node.value.func.id == "Conv1D":
            out |= {t.attr for t in node.targets if isinstance(t, ast.Attribute)}
    return frozenset(out)


def tied_weight_keys(task: str, config: dict) -> dict[str, str]:
    """{tied weight: the weight it shares} of the class `model.task` loads for this
    config (its `_tied_weights_keys`, e.g. lm_head.weight → model.embed_tokens.weight),
    when the config ties word embeddings; {} otherwise or when unknown.

    transformers' PreTrainedConfig ties by default: a config.json without
    `tie_word_embeddings` counts as tied (the files then lack the head's weight)."""
    cfg = config.get("text_config", config)
    if not cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", True)):
        return {}
    model_type = config.get("model_type")
    cls = _auto_mappings().get(TASKS[task].mapping, {}).get(model_type)
    tree = _modeling_tree(model_type) if cls else None
    if tree is None:
        return {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id == "_tied_weights_keys"
                        for t in item.targets):
                    try:
                        value = ast.literal_eval(item.value)
                    except ValueError:
                        return {}
                    return dict(value) if isinstance(value, dict) else {}
    return {}


@lru_cache(maxsize=None)
def config_attribute_map(model_type: str) -> dict[str, str]:
    """The config class's `attribute_map` (standard name → this model's own key, e.g.
    distilbert: hidden_size → dim, num_hidden_layers → n_layers), read from
    transformers' configuration source without importing it; {} when unknown."""
    root = _transformers_dir()
    if root is None or not model_type:
        return {}
    module = model_type.replace("-", "_")
    if not (root / "models" / module).is_dir():
        module = _special_module_names().get(model_type, module)
    try:
        tree = ast.parse((root / "models" / module / f"configuration_{module}.py").read_text())
    except (OSError, SyntaxError):
        return {}
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "attribute_map" for t in targets) \
                    and node.value is not None:
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                if isinstance(value, dict):
                    out.update(value)
    return out
