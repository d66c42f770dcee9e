"""The four task types: for each, the Auto class, peft's TaskType, the data formats that
fit it, the collator and the Hub pipeline tag. The one table every step reads.

Importing this module imports neither torch nor transformers: preflight uses it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Task = Literal["causal-lm", "seq-classification", "token-classification", "seq2seq-lm"]


@dataclass(frozen=True)
class TaskType:
    """What one `model.task` value means to each library."""
    name: str
    auto_class: str          # transformers Auto class name
    peft_task_type: str      # peft.TaskType member name
    formats: tuple[str, ...]  # data.format values that fit this task
    collator: str            # transformers collator class name
    pipeline_tag: str        # the model card's pipeline_tag


TASKS: dict[str, TaskType] = {
    "causal-lm": TaskType("causal-lm", "AutoModelForCausalLM", "CAUSAL_LM",
                          ("alpaca", "chat", "prompt-completion", "text"),
                          "DataCollatorForSeq2Seq", "text-generation"),
    "seq-classification": TaskType("seq-classification", "AutoModelForSequenceClassification",
                                   "SEQ_CLS", ("text-label",), "DataCollatorWithPadding",
                                   "text-classification"),
    "token-classification": TaskType("token-classification", "AutoModelForTokenClassification",
                                     "TOKEN_CLS", ("tokens-tags",),
                                     "DataCollatorForTokenClassification",
                                     "token-classification"),
    "seq2seq-lm": TaskType("seq2seq-lm", "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM",
                           ("input-target",), "DataCollatorForSeq2Seq",
                           "text2text-generation"),
}


def task_type(task: str) -> TaskType:
    """The TaskType of a `model.task` value (KeyError for an unknown one: the schema's
    Literal refuses those first)."""
    return TASKS[task]


def peft_task_type(task: str):
    """peft.TaskType for a `model.task` value, e.g. 'seq2seq-lm' → TaskType.SEQ_2_SEQ_LM."""
    from peft import TaskType as PeftTaskType

    return getattr(PeftTaskType, TASKS[task].peft_task_type)
