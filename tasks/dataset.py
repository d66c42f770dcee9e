"""prepare_dataset: rows → (prompt, completion) → token ids with prompt masking, chat
conversations → the template's own rendering with labels on the assistant turns, or the
rows of the other task types (tasks.model_tasks.py) → inputs and labels.

Formats: alpaca {instruction, input, output}; chat {messages[, tools]} rendered by the
chat template (tasks.data.chat.py); prompt-completion {prompt, completion}; text {text} —
causal-lm, all four. text-label {text, label} (seq-classification: the label's index),
tokens-tags {tokens, tags} (token-classification: word-level tags on each word's first
sub-word token, -100 on the others), input-target {input, target} (seq2seq-lm: the
target's ids, ending with EOS, as labels). Label and tag names are collected from the rows
(sorted) and travel in the manifest, where training sizes the classification head from
them. The result (train + optional eval split) is saved with `save_to_disk` under
LORAFLOW_HOME/datasets/<key>/, written aside and moved into place whole, so a run killed
while tokenizing leaves nothing that looks finished.

The key is content: the rows (Hub dataset commit, or a local file's sha256 — not its
path), the tokenizer's files (chat template included), a `data.chat_template` file's text
(not its path), the data settings, the split seed and this step's code. Every `datasets`
transform (map, filter, train_test_split) is given a fingerprint derived from that key
(`new_fingerprint`, `train_new_fingerprint` / `test_new_fingerprint`): `datasets`' own
fingerprint hashes the map function with dill, which misses edits to the helpers the
function calls (and, under Prefect's log_prints, prints a bytecode listing into the logs
and misses module constants), so it could serve rows tokenized by older code.

Bad data fails before any row is tokenized, with one DatasetError that names the file,
the line or row, and the fix (tasks.data.reading.py).
"""
from __future__ import annotations

import hashlib
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import Optional

from prefect import task

from profiles.schema import DataSection
from tasks import errors, settings
from tasks.cache.keys import cache_key, code_inputs
from tasks.cache.manifest import changed_files, read_manifest, write_manifest
from tasks.cache.policy import cache_options
from tasks.contracts import DatasetManifest, DatasetRef, SnapshotManifest
from tasks.data.chat import (
    TemplateFailure,
    chat_example,
    chat_messages,
    chat_template_file,
    template_error,
    template_override,
)
from tasks.data.prompt_formats import alpaca_prompt
from tasks.data.reading import REQUIRED_COLUMNS, check_columns, load_rows
from tasks.model_tasks import IGNORE_INDEX
from tasks.retry import TRANSIENT_RETRIES

CAUSAL_FORMATS = ("alpaca", "chat", "prompt-completion", "text")
# Per-row bookkeeping columns of the tokenize map, counted and removed before saving.
_DROP, _TRUNCATED = "_loraflow_drop", "_loraflow_truncated"


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith("tokenizer") or name in ("special_tokens_map.json",
                                                    "chat_template.jinja") \
        or name.startswith("additional_chat_templates/") \
        or name.endswith(".model") or name.startswith("vocab.") or name == "merges.txt"


# ------------------------------------------------------------------------ keys

def dataset_inputs(data: DataSection, source: DatasetRef, snapshot: SnapshotManifest,
                   seed: int) -> dict:
    """What keys a prepared dataset. A local file counts by its bytes (sha256) and its
    kind (suffix), not its path; a Hub dataset by repo and commit, not the moving
    revision name; a chat template file by its text's sha256, not its path."""
    rows = ({"hub": source.id, "commit": source.commit} if source.source == "hub"
            else {"file_sha256": source.sha256, "kind": Path(source.id).suffix})
    settings_ = data.model_dump(mode="json", exclude={"dataset", "revision"})
    template_file = chat_template_file(data)
    if template_file is not None:
        settings_["chat_template"] = {"file_sha256": hashlib.sha256(
            template_file.read_bytes()).hexdigest()}
    return {"rows": rows, "tokenizer": snapshot.file_hashes(_is_tokenizer_file),
            "data": settings_, "seed": seed, "code": code_inputs("tasks.dataset")}


def dataset_key(data: DataSection, source: DatasetRef, snapshot: SnapshotManifest,
                seed: int, **_) -> str:
    return cache_key("dataset", dataset_inputs(data, source, snapshot, seed))


def dataset_dir(data: DataSection, source: DatasetRef, snapshot: SnapshotManifest,
                seed: int) -> Path:
    return settings.loraflow_home() / "datasets" / dataset_key(data, source, snapshot, seed)


def transform_fingerprint(key: str, transform: str) -> str:
    """The `datasets` fingerprint of one transform of the dataset keyed `key`.

    `datasets` names its cache files by fingerprint (≤ 64 characters), and reuses a cache
    file whose fingerprint matches: deriving it from loraflow's key alone means a change
    to anything the key covers (code included) never meets an older cache file.

    Args:
        key: the dataset step's cache key.
        transform: which transform (tokenize, keep, train, eval, …).

    Returns:
        A 32-hex-digit fingerprint.
    """
    return hashlib.sha256(f"{key}/{transform}".encode()).hexdigest()[:32]


# ------------------------------------------------------------------------ text formats

def format_example(row: dict, fmt: str, tokenizer) -> tuple[str, str]:
    """One alpaca / prompt-completion / text row → (prompt, completion) text. The
    completion is what the loss sees (chat rows go through chat_example instead)."""
    if fmt == "alpaca":
        inp = (row.get("input") or "").strip()
        return alpaca_prompt(row["instruction"].strip(), inp), row["output"].strip()
    if fmt == "prompt-completion":
        return row["prompt"], row["completion"]
    return "", row["text"]


def _leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer's post-processor puts before a text (BOS for Llama, nothing
    for Qwen), found by tokenizing a probe with and without special tokens: unlike
    `[bos_token_id]` this follows what the tokenizer really does, and unlike
    `add_special_tokens=True` on the prompt it never brings trailing specials (EOS)."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def tokenize_example(prompt: str, completion: str, tokenizer, max_length: int,
                     mask_prompt: bool) -> dict:
    """Token ids for [BOS] + prompt + completion + EOS; prompt labels masked if asked.

    The leading special tokens are the tokenizer's own (see _leading_special_ids), added
    once: a prompt whose text already starts with the BOS token does not get a second.

    Args:
        prompt: the text the model is given.
        completion: the text it learns to produce.
        tokenizer: the base model's tokenizer.
        max_length: tokens kept per example (the rest is cut).
        mask_prompt: -100 labels on the prompt (and the leading specials).

    Returns:
        {"input_ids", "labels", "attention_mask"}, at most max_length long each.
    """
    lead = _leading_special_ids(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    if lead and prompt_ids[:len(lead)] == lead:
        lead = []  # the prompt's text already begins with BOS
    prompt_ids = lead + prompt_ids
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) if mask_prompt else list(prompt_ids)) \
        + completion_ids
    return {"input_ids": input_ids, "labels": labels[:max_length],
            "attention_mask": [1] * len(input_ids)}


# ------------------------------------------------------------------------ other formats

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


def _untruncated_length(row: dict, fmt: str, tokenizer) -> int:
    """Tokens a non-causal row would take uncut (its longest side), to count truncation."""
    if fmt == "text-label":
        return len(tokenizer(row["text"])["input_ids"])
    if fmt == "tokens-tags":
        return len(tokenizer(list(row["tokens"]), is_split_into_words=True)["input_ids"])
    return max(len(tokenizer(row["input"])["input_ids"]),
               len(tokenizer(text_target=row["target"])["input_ids"]))


# ------------------------------------------------------------------------ one row

def prepare_row(row: dict, index: int, data: DataSection, tokenizer,
                template: Optional[str], label2id: dict) -> dict:
    """One source row → its training example, plus why it is dropped ("" if kept) and
    whether it was cut at data.max_length.

    Args:
        row: the source row.
        index: its index in the source split (for error messages).
        data: the data section.
        tokenizer: the base model's tokenizer.
        template: the chat template override text (or None).
        label2id: label / tag name → class id (classification formats).

    Returns:
        The example's columns plus the bookkeeping columns _DROP and _TRUNCATED.

    Raises:
        DatasetError: a row the format or the chat template cannot take.
    """
    fmt, max_length = data.format, data.max_length
    if fmt not in CAUSAL_FORMATS:
        out = encode_row(row, fmt, tokenizer, max_length, label2id)
        truncated = _untruncated_length(row, fmt, tokenizer) > max_length
        learnable = fmt == "text-label" or any(x != IGNORE_INDEX for x in out["labels"])
        reason = "" if learnable else ("no_label_after_truncation" if truncated else "no_label")
        return {**out, _DROP: reason, _TRUNCATED: truncated and not reason}
    if fmt == "chat":
        messages, tools = chat_messages(row, data.system_message, index)
        if not messages:
            full = {"input_ids": [], "labels": [], "attention_mask": []}
            return {**full, _DROP: "empty_conversation", _TRUNCATED: False}
        if data.mask_prompt and not any(m.get("role") == "assistant" for m in messages):
            full = {"input_ids": [], "labels": [], "attention_mask": []}
            return {**full, _DROP: "no_assistant_turn", _TRUNCATED: False}
        try:
            full = chat_example(messages, tools, tokenizer, template, data.train_on,
                                data.mask_prompt, index)
        except TemplateFailure as exc:
            raise template_error(exc, row, data, tokenizer, template, index) from None
    else:
        prompt, completion = format_example(row, fmt, tokenizer)
        full = tokenize_example(prompt, completion, tokenizer, 1 << 62,
                                data.mask_prompt and fmt != "text")
    truncated = len(full["input_ids"]) > max_length
    out = {k: v[:max_length] for k, v in full.items()}
    reason = ""
    if not any(x != IGNORE_INDEX for x in out["labels"]):
        reason = ("no_label_after_truncation" if any(x != IGNORE_INDEX for x in full["labels"])
                  else "no_label")
    return {**out, _DROP: reason, _TRUNCATED: truncated and not reason}


# ------------------------------------------------------------------------ the step

def _causal_features(fmt: str):
    """Column types of a causal format's examples, given to map so that a dropped row's
    empty lists cannot make `datasets` infer a null element type; None: inferred."""
    if fmt not in CAUSAL_FORMATS:
        return None
    import datasets

    ids = datasets.Sequence(datasets.Value("int64"))
    return datasets.Features({"input_ids": ids, "labels": ids, "attention_mask": ids,
                              _DROP: datasets.Value("string"),
                              _TRUNCATED: datasets.Value("bool")})


def _result(out: Path, manifest: dict) -> DatasetManifest:
    return DatasetManifest(path=str(out), key=out.name, num_train=manifest["num_train"],
                           num_eval=manifest["num_eval"], train_tokens=manifest["train_tokens"],
                           labels=manifest.get("labels"),
                           rows_read=manifest.get("rows_read", 0),
                           dropped=manifest.get("dropped") or {},
                           truncated=manifest.get("truncated", 0))


def _nothing_left(source: DatasetRef, dropped: dict[str, int]) -> errors.DatasetError:
    reason = max(dropped, key=dropped.get) if dropped else "no_label"
    fix = {"no_label_after_truncation": ("data.max_length", "every example is all prompt "
                                         "at this length", "raise data.max_length"),
           "no_assistant_turn": ("data.format", "no conversation has an assistant turn",
                                 "give every row at least one assistant message"),
           "empty_conversation": ("data.format", "every conversation is empty",
                                  "give every row its messages")}.get(
        reason, ("data.format", "no example has anything to learn",
                 "check that the rows fit data.format"))
    return errors.DatasetError(f"{fix[0]}: {fix[1]} in {source.id} (dropped: {dropped}). "
                               f"Fix: {fix[2]}.", field=fix[0])


def run_prepare_dataset(data: DataSection, source: DatasetRef, snapshot: SnapshotManifest,
                        seed: int) -> DatasetManifest:
    """Load, format, tokenize, split and save.

    Args:
        data: the data section.
        source: the rows, pinned (preflight's DatasetRef).
        snapshot: the base model's files (the tokenizer).
        seed: the split seed.

    Returns:
        The manifest: where the rows are, their counts, what was dropped and why.

    Raises:
        DatasetError: unusable rows, a template that refuses them, or an eval split
            that would leave no eval or no train row.
    """
    key = dataset_key(data, source, snapshot, seed)
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
    check_columns(rows, data, source)
    tokenizer = AutoTokenizer.from_pretrained(snapshot.local_dir)
    template = None
    if data.format == "chat":
        template = template_override(data, tokenizer)
        if template is None and not tokenizer.chat_template:
            raise errors.DatasetError("data.format chat: the base model's tokenizer has no "
                                      "chat template. Fix: set data.chat_template to a Jinja "
                                      "file, or use format alpaca or prompt-completion.",
                                      field="data.chat_template")
        if not tokenizer.is_fast:
            raise errors.DatasetError("data.format chat: finding the assistant turns' tokens "
                                      "needs a fast tokenizer (tokenizer.json), and the base "
                                      "model has none. Fix: use a base with tokenizer.json.",
                                      field="data.format")

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

    def encode(row: dict, index: int) -> dict:
        return prepare_row(row, index, data, tokenizer, template, label2id)

    # Fingerprints from loraflow's key, never datasets' hash of `encode` (module docstring).
    tokenized = rows.map(encode, with_indices=True, remove_columns=rows.column_names,
                         desc="tokenize", features=_causal_features(data.format),
                         new_fingerprint=transform_fingerprint(key, "tokenize"))
    reasons = Counter(r for r in tokenized[_DROP] if r)
    dropped = {r: reasons[r] for r in sorted(reasons)}
    truncated = sum(1 for t in tokenized[_TRUNCATED] if t)
    kept = tokenized.filter(lambda r: not r[_DROP], desc="drop rows with nothing to learn",
                            new_fingerprint=transform_fingerprint(key, "keep"))
    kept = kept.remove_columns([_DROP, _TRUNCATED],
                               new_fingerprint=transform_fingerprint(key, "columns"))
    if len(kept) == 0:
        raise _nothing_left(source, dropped)
    split = None
    if data.eval_split > 0:
        # train_test_split takes ceil(eval_split * n) rows for eval: ≥ 1 whenever n ≥ 1,
        # and (eval_split < 0.5) ≥ 1 train row whenever n ≥ 2.
        if len(kept) < 2:
            raise errors.DatasetError(
                f"data.eval_split: {data.eval_split} of {len(kept)} usable row leaves no row "
                "to train on after the evaluation split. Fix: set data.eval_split: 0, or "
                "add rows.", field="data.eval_split")
        split = kept.train_test_split(test_size=data.eval_split, seed=seed,
                                      train_new_fingerprint=transform_fingerprint(key, "train"),
                                      test_new_fingerprint=transform_fingerprint(key, "eval"))
    train = split["train"] if split else kept
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
            "train_tokens": train_tokens, "labels": labels, "rows_read": len(rows),
            "dropped": dropped, "truncated": truncated}
    manifest = write_manifest(tmp, {"step": "dataset", **info,
                                    "inputs": dataset_inputs(data, source, snapshot, seed)})
    if out.exists():
        shutil.rmtree(out)  # damaged outputs of an earlier run
    tmp.rename(out)
    return _result(out, manifest)


def dataset_is_cached_and_intact(data, source, snapshot, seed, **_) -> bool:
    return changed_files(dataset_dir(data, source, snapshot, seed)) == []


@task(name="dataset", **cache_options(dataset_key, dataset_is_cached_and_intact),
      **TRANSIENT_RETRIES)
def prepare_dataset(data: DataSection, source: DatasetRef, snapshot: SnapshotManifest,
                    seed: int) -> DatasetManifest:
    """Prefect task: run_prepare_dataset, cached by dataset_key."""
    return run_prepare_dataset(data, source, snapshot, seed)
