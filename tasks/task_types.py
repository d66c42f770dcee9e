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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional

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
        ("alpaca", "chat", "prompt-completion", "text"), "DataCollatorForSeq2Seq",
        "text-generation", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "seq-classification": TaskType(
        "seq-classification", "AutoModelForSequenceClassification", "SEQ_CLS",
        ("text-label",), "DataCollatorWithPadding", "text-classification",
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    "token-classification": TaskType(
        "token-classification", "AutoModelForTokenClassification", "TOKEN_CLS",
        ("tokens-tags",), "DataCollatorForTokenClassification", "token-classification",
        "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    "seq2seq-lm": TaskType(
        "seq2seq-lm", "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM",
        ("input-target",), "DataCollatorForSeq2Seq",
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


def adapter_for_task(base, lora, task: str):
    """The lora section as model.task needs it on this model.

    A classification head starts random and peft trains it whole (modules_to_save), so
    'all-linear' must not wrap it in an adapter too: peft leaves it out for SEQ_CLS but
    not for TOKEN_CLS, and then fails ("modules_to_save cannot be applied to modules of
    type lora.Linear"). The head is added to lora.exclude_modules in both cases.
    """
    if not TASKS[task].classifies or lora.target_modules != "all-linear":
        return lora
    heads = [n for n in CLASSIFIER_HEADS if getattr(base, n, None) is not None]
    current = lora.exclude_modules
    if not heads:
        return lora
    if current is None:
        exclude = heads
    elif isinstance(current, str):  # a regex over full module paths
        exclude = f"(?:{current})|{'|'.join(heads)}"
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
