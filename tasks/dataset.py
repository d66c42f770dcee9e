"""prepare_dataset: rows → (prompt, completion) → token ids with prompt masking, or the
rows of the other task types (tasks/task_types.py) → inputs and labels.

Formats: alpaca {instruction, input, output}; chat {messages} through the tokenizer's
chat template (the last assistant turn is the completion); prompt-completion
{prompt, completion}; text {text} — causal-lm, all four. text-label {text, label}
(seq-classification: the label's index), tokens-tags {tokens, tags} (token-classification:
word-level tags on each word's first sub-word token, -100 on the others), input-target
{input, target} (seq2seq-lm: the target's ids, ending with EOS, as labels). Label and tag
names are collected from the rows (sorted) and travel in the manifest, where training
sizes the classification head from them. The result (train + optional eval split) is saved
with `save_to_disk` under LORAFLOW_HOME/datasets/<key>/, written aside and moved into
place whole, so a run killed while tokenizing leaves nothing that looks finished.

The key is content: the rows (Hub dataset commit, or a local file's sha256 — not its
path), the tokenizer's files (chat template included), the data settings, the split
seed and this step's code.
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Optional

from prefect import task
from pydantic import BaseModel

from profiles.schema import DataSection
from tasks import errors, settings
from tasks.caching import cache_key, changed_files, code_inputs, read_manifest, write_manifest
from tasks.download import SnapshotManifest
from tasks.preflight import DatasetRef
from tasks.retry import TRANSIENT_RETRIES
from tasks.task_types import IGNORE_INDEX

ALPACA_PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response "
                 "that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                 "{input_block}### Response:\n")
REQUIRED_COLUMNS = {"alpaca": {"instruction", "output"}, "chat": {"messages"},
                    "prompt-completion": {"prompt", "completion"}, "text": {"text"},
                    "text-label": {"text", "label"}, "tokens-tags": {"tokens", "tags"},
                    "input-target": {"input", "target"}}
CAUSAL_FORMATS = ("alpaca", "chat", "prompt-completion", "text")


class DatasetManifest(BaseModel):
    """The prepared dataset: where it is and what it holds."""
    path: str
    key: str
    num_train: int
    num_eval: int
    train_tokens: int
    labels: Optional[list[str]] = None  # label / tag names (index = class id), classification


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith("tokenizer") or name in ("special_tokens_map.json",
                                                    "chat_template.jinja") \
        or name.endswith(".model") or name.startswith("vocab.") or name == "merges.txt"


def dataset_inputs(data: DataSection, source: DatasetRef, snapshot: SnapshotManifest,
                   seed: int) -> dict:
    """What keys a prepared dataset. A local file counts by its bytes (sha256) and its
    kind (suffix), not its path; a Hub dataset by repo and commit, not the moving
    revision name."""
    rows = ({"hub": source.id, "commit": source.commit} if source.source == "hub"
            else {"file_sha256": source.sha256, "kind": Path(source.id).suffix})
    return {"rows": rows, "tokenizer": snapshot.file_hashes(_is_tokenizer_file),
            "data": data.model_dump(mode="json", exclude={"dataset", "revision"}),
            "seed": seed, "code": code_inputs("tasks.dataset")}


def dataset_key(data: DataSection, source: DatasetRef, snapshot: SnapshotManifest,
                seed: int, **_) -> str:
    return cache_key("dataset", dataset_inputs(data, source, snapshot, seed))


def dataset_dir(data: DataSection, source: DatasetRef, snapshot: SnapshotManifest,
                seed: int) -> Path:
    return settings.loraflow_home() / "datasets" / dataset_key(data, source, snapshot, seed)


def format_example(row: dict, fmt: str, tokenizer) -> tuple[str, str]:
    """One row → (prompt, completion) text. The completion is what the loss sees."""
    if fmt == "alpaca":
        inp = (row.get("input") or "").strip()
        prompt = ALPACA_PROMPT.format(
            with_input=", paired with an input that provides further context" if inp else "",
            instruction=row["instruction"].strip(),
            input_block=f"### Input:\n{inp}\n\n" if inp else "")
        return prompt, row["output"].strip()
    if fmt == "chat":
        messages = row["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise errors.DatasetError("data.format chat: every row's last message must be "
                                      "the assistant's (it is the completion to learn).")
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                               add_generation_prompt=True)
        return prompt, messages[-1]["content"]
    if fmt == "prompt-completion":
        return row["prompt"], row["completion"]
    return "", row["text"]


def tokenize_example(prompt: str, completion: str, tokenizer, max_length: int,
                     mask_prompt: bool) -> dict:
    """Token ids for prompt + completion + EOS; prompt labels masked with -100 if asked."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else (
        [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    completion_ids = completion_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) if mask_prompt else list(prompt_ids)) + completion_ids
    return {"input_ids": input_ids, "labels": labels[:max_length],
            "attention_mask": [1] * len(input_ids)}


def label_names(values) -> list[str]:
    """The distinct labels as strings, in a fixed order: numerically when all are
    integers (0, 1, 2, … keep their ids), else alphabetically."""
    distinct = set(values)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in distinct):
        return [str(v) for v in sorted(distinct)]
    return sorted(str(v) for v in distinct)


def _ensure_eos(ids: list[int], tokenizer, max_length: int) -> list[int]:
    """Target ids that end with EOS (within max_length), so generation learns to stop."""
    eos = tokenizer.eos_token_id
    if eos is None or (ids and ids[-1] == eos):
        return ids
    return ids[:max_length - 1] + [eos]


def encode_row(row: dict, fmt: str, tokenizer, max_length: int, label2id: dict) -> dict:
    """One row of a non-causal format → input_ids, attention_mask and labels.

    Raises:
        DatasetError: a tokens-tags row whose tokens and tags differ in length.
    """
    if fmt == "text-label":
        enc = tokenizer(row["text"], truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": label2id[str(row["label"])]}
    if fmt == "tokens-tags":
        words, tags = list(row["tokens"]), list(row["tags"])
        if len(words) != len(tags):
            raise errors.DatasetError(
                f"data.format tokens-tags: a row has {len(words)} tokens and {len(tags)} "
                f"tags ({words[:5]}…). Fix: give exactly one tag per token in every row.")
        enc = tokenizer(words, is_split_into_words=True, truncation=True,
                        max_length=max_length)
        labels, previous = [], None
        for word in enc.word_ids():
            # The tag goes on a word's first piece; later pieces and specials are skipped.
            labels.append(IGNORE_INDEX if word is None or word == previous
                          else label2id[str(tags[word])])
            previous = word
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": labels}
    enc = tokenizer(row["input"], truncation=True, max_length=max_length)
    target = tokenizer(text_target=row["target"], truncation=True,
                       max_length=max_length)["input_ids"]
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": _ensure_eos(target, tokenizer, max_length)}


def load_rows(data: DataSection, source: DatasetRef):
    """The raw rows through `datasets`: a Hub repo at its commit, or a local file."""
    settings.prepare_client_environment()
    import datasets

    cache_dir = str(settings.loraflow_home() / "datasets-cache")
    if source.source == "file":
        kind = {".jsonl": "json", ".json": "json", ".csv": "csv",
                ".parquet": "parquet"}[Path(source.id).suffix]
        return datasets.load_dataset(kind, data_files=source.id, split="train",
                                     cache_dir=cache_dir)
    from huggingface_hub import errors as hf

    try:
        return datasets.load_dataset(source.id, revision=source.commit,
                                     data_files=data.data_files, split=data.split,
                                     cache_dir=cache_dir, token=settings.hub_token())
    except hf.HfHubHTTPError as exc:
        raise errors.translate_hub_error(exc, repo_id=source.id, repo_type="dataset",
                                         revision=source.commit,
                                         endpoint=settings.hub_endpoint()) from None


def _result(out: Path, manifest: dict) -> DatasetManifest:
    return DatasetManifest(path=str(out), key=out.name, num_train=manifest["num_train"],
                           num_eval=manifest["num_eval"], train_tokens=manifest["train_tokens"],
                           labels=manifest.get("labels"))


def run_prepare_dataset(data: DataSection, source: DatasetRef, snapshot: SnapshotManifest,
                        seed: int) -> DatasetManifest:
    """Load, format, tokenize, split and save. Raises DatasetError on unusable rows."""
    out = dataset_dir(data, source, snapshot, seed)
    existing = read_manifest(out)
    if existing is not None and changed_files(out, existing) == []:
        return _result(out, existing)  # finished earlier, its cache record lost: adopt
    from transformers import AutoTokenizer

    rows = load_rows(data, source)
    missing = REQUIRED_COLUMNS[data.format] - set(rows.column_names)
    if missing:
        raise errors.DatasetError(
            f"data.format: '{data.format}' needs columns {sorted(REQUIRED_COLUMNS[data.format])}"
            f" but {source.id} has {rows.column_names} (missing {sorted(missing)}). Fix: set "
            "data.format to the layout of your rows, or convert the data.")
    tokenizer = AutoTokenizer.from_pretrained(snapshot.local_dir)
    if data.format == "chat" and not tokenizer.chat_template:
        raise errors.DatasetError("data.format chat: the base model's tokenizer has no chat "
                                  "template. Fix: use format alpaca or prompt-completion.")

    if data.format == "tokens-tags" and not tokenizer.is_fast:
        raise errors.DatasetError("data.format tokens-tags: aligning word tags to sub-word "
                                  "tokens needs a fast tokenizer (tokenizer.json), and the "
                                  "base model has none. Fix: use a base with tokenizer.json.")
    labels = None
    if data.format == "text-label":
        labels = label_names(rows["label"])
    elif data.format == "tokens-tags":
        labels = label_names(t for tags in rows["tags"] for t in tags)
    label2id = {name: i for i, name in enumerate(labels or [])}

    def encode(row: dict) -> dict:
        if data.format not in CAUSAL_FORMATS:
            return encode_row(row, data.format, tokenizer, data.max_length, label2id)
        prompt, completion = format_example(row, data.format, tokenizer)
        return tokenize_example(prompt, completion, tokenizer, data.max_length,
                                data.mask_prompt and data.format != "text")

    tokenized = rows.map(encode, remove_columns=rows.column_names, desc="tokenize")
    if data.format != "text-label":  # a class label is always learned
        tokenized = tokenized.filter(
            lambda r: any(label != IGNORE_INDEX for label in r["labels"]),
            desc="drop rows with nothing to learn")
    if len(tokenized) == 0:
        raise errors.DatasetError(f"data.max_length: every example of {source.id} is all "
                                  "prompt at this length. Fix: raise data.max_length.")
    split = None
    if data.eval_split > 0 and len(tokenized) >= 10:
        split = tokenized.train_test_split(test_size=data.eval_split, seed=seed)
    train = split["train"] if split else tokenized
    # Written aside and moved into place whole: a killed run leaves only a `.partial`.
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f"{out.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run (we hold the lock)
    tmp = out.parent / f"{out.name}.partial-{uuid.uuid4().hex[:8]}"
    train.save_to_disk(str(tmp / "train"))
    if split:
        split["test"].save_to_disk(str(tmp / "eval"))
    train_tokens = sum(len(ids) for ids in train["input_ids"])
    info = {"num_train": len(train), "num_eval": len(split["test"]) if split else 0,
            "train_tokens": train_tokens, "labels": labels}
    manifest = write_manifest(tmp, {"step": "dataset", **info,
                                    "inputs": dataset_inputs(data, source, snapshot, seed)})
    if out.exists():
        shutil.rmtree(out)  # damaged outputs of an earlier run
    tmp.rename(out)
    return _result(out, manifest)


def dataset_is_cached_and_intact(data, source, snapshot, seed, **_) -> bool:
    return changed_files(dataset_dir(data, source, snapshot, seed)) == []


@task(name="dataset", **TRANSIENT_RETRIES)
def prepare_dataset(data: DataSection, source: DatasetRef, snapshot: SnapshotManifest,
                    seed: int) -> DatasetManifest:
    """Prefect task: run_prepare_dataset, cached by dataset_key."""
    return run_prepare_dataset(data, source, snapshot, seed)
