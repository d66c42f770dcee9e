"""prepare_dataset: rows → (prompt, completion) → token ids with prompt masking, chat
conversations → the template's own rendering with labels on the assistant turns, or the
rows of the other task types (tasks/task_types.py) → inputs and labels.

Formats: alpaca {instruction, input, output}; chat {messages[, tools]} rendered by the
chat template (see `chat_example`); prompt-completion {prompt, completion}; text {text} —
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

Bad data fails before any row is tokenized, with one DatasetError that names the file
(for a Hub dataset: the repo's file and commit), the line, byte offset or row, and the
fix: `load_rows` translates what `datasets` raises while reading, once, by type, and
scans the file for the place (`diagnose_file`); `check_columns` checks that every row's
format columns hold the right kind of value. docs/bad-input.md lists the cases.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from prefect import task
from pydantic import BaseModel, Field

from profiles.schema import DataSection
from tasks import errors, settings
from tasks.caching import cache_key, changed_files, code_inputs, read_manifest, write_manifest
from tasks.download import SnapshotManifest
from tasks.preflight import DatasetRef
from tasks.retry import TRANSIENT_RETRIES
from tasks.task_types import IGNORE_INDEX

log = logging.getLogger("loraflow.dataset")

ALPACA_PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response "
                 "that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                 "{input_block}### Response:\n")
REQUIRED_COLUMNS = {"alpaca": {"instruction", "output"}, "chat": {"messages"},
                    "prompt-completion": {"prompt", "completion"}, "text": {"text"},
                    "text-label": {"text", "label"}, "tokens-tags": {"tokens", "tags"},
                    "input-target": {"input", "target"}}
CAUSAL_FORMATS = ("alpaca", "chat", "prompt-completion", "text")
# Local file suffix → the `datasets` packaged reader.
READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Columns that hold text, per format: a CSV's are read as text (see load_rows).
TEXT_COLUMNS = {"alpaca": ("instruction", "input", "output"), "prompt-completion":
                ("prompt", "completion"), "text": ("text",), "text-label": ("text",),
                "input-target": ("input", "target")}
TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2")
# Per-row bookkeeping columns of the tokenize map, counted and removed before saving.
_DROP, _TRUNCATED = "_loraflow_drop", "_loraflow_truncated"


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


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith("tokenizer") or name in ("special_tokens_map.json",
                                                    "chat_template.jinja") \
        or name.startswith("additional_chat_templates/") \
        or name.endswith(".model") or name.startswith("vocab.") or name == "merges.txt"


# ------------------------------------------------------------------------ chat template

def chat_template_file(data: DataSection) -> Optional[Path]:
    """The Jinja file `data.chat_template` names, or None when it is unset or a name.

    A value is a file when it ends in .jinja/.jinja2/.j2, contains a path separator, or
    names an existing file; anything else is the name of one of the tokenizer's templates.

    Args:
        data: the profile's data section.

    Returns:
        The file's path (resolved against the working directory, as data.dataset is).

    Raises:
        DatasetError: the value looks like a file and there is none.
    """
    value = data.chat_template
    if not value:
        return None
    path = Path(value).expanduser()
    looks_like_file = value.endswith(TEMPLATE_SUFFIXES) or "/" in value or "\\" in value
    if path.is_file():
        return path.resolve()
    if looks_like_file:
        raise errors.DatasetError(
            f"data.chat_template: no file {value} (resolved from {Path.cwd()}). Fix: give "
            "the path of a Jinja chat template file, a name of one of the tokenizer's "
            "templates, or null for the tokenizer's own.", field="data.chat_template")
    return None


def resolve_chat_template(data: DataSection, tokenizer) -> Optional[str]:
    """The chat template text chat rows are rendered with, for saving with the adapter.

    Args:
        data: the profile's data section (`data.chat_template`).
        tokenizer: the base model's tokenizer.

    Returns:
        The Jinja file's text, or the named template's text, when data.chat_template is
        set; else the tokenizer's own template (its `default` one when it has several);
        None when the tokenizer has none and none is given.

    Raises:
        DatasetError: a file that is missing, or a name the tokenizer does not have.
    """
    path = chat_template_file(data)
    if path is not None:
        return path.read_text(encoding="utf-8")
    own = tokenizer.chat_template
    if data.chat_template:
        named = own if isinstance(own, dict) else {}
        if data.chat_template not in named:
            raise errors.DatasetError(
                f"data.chat_template: '{data.chat_template}' is neither a file nor one of the "
                f"tokenizer's named templates ({sorted(named) or 'it has none'}). Fix: give a "
                "Jinja file's path, one of those names, or null.", field="data.chat_template")
        return named[data.chat_template]
    if isinstance(own, dict):
        return own.get("default")
    return own


def _template_override(data: DataSection, tokenizer) -> Optional[str]:
    """What to pass as apply_chat_template's chat_template: None leaves the choice to
    transformers (the tokenizer's template, or its `tool_use` one for rows with tools)."""
    return resolve_chat_template(data, tokenizer) if data.chat_template else None


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
        prompt = ALPACA_PROMPT.format(
            with_input=", paired with an input that provides further context" if inp else "",
            instruction=row["instruction"].strip(),
            input_block=f"### Input:\n{inp}\n\n" if inp else "")
        return prompt, row["output"].strip()
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


# ------------------------------------------------------------------------ chat

def _without_nulls(value):
    """Drop None-valued keys, recursively. Arrow stores a column of dicts as one struct
    type, so a tool schema comes back with every other row's tool properties as None and
    a call's arguments with every other call's argument names; templates render them
    (`tools | tojson`). transformers drops the None keys of a message itself (e.g.
    `tool_calls: None`), not the nested ones."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _parsed_arguments(message: dict) -> dict:
    """A tool call's `arguments` stored as JSON text (the usual way to keep varying
    argument types in one Arrow column) → the object chat templates expect (they apply
    `tojson` to it: text would come out quoted twice). Text that is not a JSON object is
    left as it is."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        args = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(args, str):
            try:
                parsed = json.loads(args)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                call = {**call, "function": {**function, "arguments": parsed}}
        out.append(call)
    return {**message, "tool_calls": out}


def chat_messages(row: dict, policy: str, index: int) -> tuple[list[dict], Optional[list]]:
    """A chat row's messages (system turns handled per data.system_message) and tools.

    What Arrow did to the row is undone first: keys it filled with None are dropped
    (_without_nulls) and tool-call arguments kept as JSON text are parsed
    (_parsed_arguments).

    Args:
        row: the row ({"messages": [...], "tools": optional list or JSON text}).
        policy: data.system_message — keep, merge (a system turn's text is prepended to
            the next user turn, with a blank line between) or drop.
        index: the row's index, for error messages.

    Returns:
        (messages, tools or None).

    Raises:
        DatasetError: tools that are text but not JSON.
    """
    messages = [_parsed_arguments(_without_nulls(dict(m)))
                for m in (row.get("messages") or [])]
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except ValueError:
            raise errors.DatasetError(
                f"data.dataset: row {index}: its tools column is text that is not JSON. "
                "Fix: store tools as a list of JSON schemas (or JSON text of one).",
                field="data.dataset", row=index) from None
    tools = _without_nulls(tools) or None
    if policy == "keep":
        return messages, tools
    out, pending = [], []
    for message in messages:
        if message.get("role") == "system":
            if policy == "merge" and message.get("content"):
                pending.append(str(message["content"]))
            continue
        if pending and message.get("role") == "user":
            message = {**message, "content": "\n\n".join(pending + [message.get("content")
                                                                    or ""])}
            pending = []
        out.append(message)
    if pending:  # a system turn with no user turn after it: keep its text as a user turn
        out.insert(0, {"role": "user", "content": "\n\n".join(pending)})
    return out, tools


class _TemplateFailure(Exception):
    """A jinja error while rendering a chat row, with the row it came from."""

    def __init__(self, exc: Exception):
        super().__init__(str(exc))
        self.exc = exc


def _render(tokenizer, messages, tools, template, add_generation_prompt=False) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template,
                                             add_generation_prompt=add_generation_prompt,
                                             tokenize=False)
    # A template fails with jinja's errors (raise_exception, undefined names) or with the
    # Python errors its expressions raise on unexpected values (`None | length`).
    except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise _TemplateFailure(exc) from exc


def assistant_spans(tokenizer, messages: list[dict], tools, template: Optional[str],
                    rendering: str, train_on: str, index: int) -> list[tuple[int, int]]:
    """Character spans of `rendering` that are the trained assistant turns.

    A turn's span runs from the end of the rendering of the turns before it with the
    generation prompt (so the role header is outside) to the end of the rendering
    through it, less trailing whitespace (what a template writes after the end-of-turn
    token, e.g. ChatML's newline, is not what the model must produce). Both renderings
    must be prefixes of the whole conversation's rendering.

    Why a rendering diff: transformers' `return_assistant_tokens_mask` needs
    `{% generation %}` markers, which the Llama-3, ChatML (Qwen) and Gemma templates do
    not have; TRL is not a dependency of loraflow (and its assistant-only loss relies on
    the same markers).

    Args:
        tokenizer: the tokenizer whose template renders.
        messages: the conversation.
        tools: the row's tools (or None).
        template: a template text to use instead of the tokenizer's (or None).
        rendering: the whole conversation's rendering.
        train_on: data.train_on (all_assistant or last_assistant).
        index: the row's index, for error messages.

    Returns:
        (start, end) character offsets, one per trained turn, in order.

    Raises:
        DatasetError: the template renders earlier turns differently once later turns
            follow (e.g. it drops the reasoning of past turns), so a turn's tokens
            cannot be found in the whole rendering.
    """
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    spans = []
    for i in turns:
        before = _render(tokenizer, messages[:i], tools, template, add_generation_prompt=True)
        through = _render(tokenizer, messages[:i + 1], tools, template)
        if not (rendering.startswith(before) and rendering.startswith(through)
                and through.startswith(before)):
            raise errors.DatasetError(
                f"data.chat_template: row {index}: the template renders the conversation up "
                f"to assistant turn {i} differently from the same turns inside the whole "
                "conversation (it rewrites earlier turns, e.g. drops past reasoning), so the "
                "turn's tokens cannot be labelled. Fix: set data.train_on: last_assistant, "
                "or data.chat_template to a template that renders each turn the same way.",
                field="data.chat_template", row=index)
        end = len(through.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return spans


def chat_example(messages: list[dict], tools, tokenizer, template: Optional[str],
                 train_on: str, mask_prompt: bool, index: int) -> dict:
    """One conversation → ids of the template's rendering, labels on assistant turns.

    input_ids == tokenizer(rendering, add_special_tokens=False).input_ids, where rendering
    is apply_chat_template(messages, tools=tools, tokenize=False): one BOS when the
    template writes it, none when it does not. Labels are the ids of every token that
    overlaps a trained assistant turn's span (its rendered content or tool call and its
    end-of-turn token, see assistant_spans), found through the fast tokenizer's offsets
    of that one tokenization; -100 elsewhere. mask_prompt false: labels on every token.

    Args:
        messages: the conversation (chat_messages' output).
        tools: the row's tools, passed to the template (or None).
        tokenizer: a fast tokenizer.
        template: a template text to use instead of the tokenizer's (or None).
        train_on: data.train_on.
        mask_prompt: data.mask_prompt.
        index: the row's index, for error messages.

    Returns:
        {"input_ids", "labels", "attention_mask"}, untruncated.

    Raises:
        _TemplateFailure: the template raised (the caller names the field).
        DatasetError: see assistant_spans.
    """
    rendering = _render(tokenizer, messages, tools, template)
    enc = tokenizer(rendering, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if not mask_prompt:
        return {"input_ids": ids, "labels": list(ids), "attention_mask": [1] * len(ids)}
    spans = assistant_spans(tokenizer, messages, tools, template, rendering, train_on, index)
    labels = [IGNORE_INDEX] * len(ids)
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        if any(a < end and b > start for start, end in spans):
            labels[t] = ids[t]
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def _template_error(exc: _TemplateFailure, row: dict, data: DataSection, tokenizer,
                    template: Optional[str], index: int) -> errors.DatasetError:
    """Which setting a template's refusal is about: when the row has a system turn, kept,
    and the same row renders once that turn is merged, it is data.system_message; else
    data.chat_template. Decided by rendering again, not by reading the error's text."""
    messages, tools = chat_messages(row, data.system_message, index)
    if data.system_message == "keep" and any(m.get("role") == "system" for m in messages):
        merged, _ = chat_messages(row, "merge", index)
        try:
            _render(tokenizer, merged, tools, template)
        except _TemplateFailure:
            pass
        else:
            return errors.DatasetError(
                f"data.system_message: row {index}: the chat template refuses the system "
                f"turn ({exc.exc}). Fix: set data.system_message: merge (its text goes "
                "before the first user turn) or drop, or data.chat_template to a template "
                "that accepts a system role.", field="data.system_message", row=index)
    return errors.DatasetError(
        f"data.chat_template: row {index}: the chat template cannot render this "
        f"conversation ({type(exc.exc).__name__}: {exc.exc}). Fix: correct the row's "
        "messages (roles, order, content) or set data.chat_template to a template that "
        "renders them.", field="data.chat_template", row=index)


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
        except _TemplateFailure as exc:
            raise _template_error(exc, row, data, tokenizer, template, index) from None
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


# ------------------------------------------------------------------------ reading

@dataclass
class _Finding:
    """What is wrong with a data file, found by scanning it (see diagnose_file)."""
    problem: str  # completes "data.dataset: <file> …"
    fix: str
    line: Optional[int] = None
    offset: Optional[int] = None


def _kind(value) -> str:
    """A JSON-ish value's kind, as a user would name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _rows_hint(fmt: str) -> str:
    columns = ", ".join(f'"{c}": …' for c in sorted(REQUIRED_COLUMNS[fmt]))
    return f"{{{columns}}}"


def _scan_utf8(path: Path) -> Optional[_Finding]:
    """The first byte that is not UTF-8, with its offset and line, read in 1 MiB chunks."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed = newlines = 0
    with path.open("rb") as f:
        head = f.read(4)
        f.seek(0)
        while True:
            chunk = f.read(1 << 20)
            # Bytes of a character cut at the end of the last chunk, kept by the decoder:
            # positions in its error count from them.
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                offset = consumed - pending + exc.start
                bad = exc.object[exc.start]
                # Pending bytes are ≥ 0x80, never a newline: count only this chunk's part.
                line = newlines + chunk[:max(0, offset - consumed)].count(b"\n") + 1
                break
            if not chunk:
                return None
            consumed += len(chunk)
            newlines += chunk.count(b"\n")
    utf16 = head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    return _Finding(
        f"is not UTF-8 text: byte {offset} (line {line}) is 0x{bad:02x}, which UTF-8 cannot "
        f"decode{' (the file starts with a UTF-16 byte-order mark)' if utf16 else ''}",
        "re-save the file as UTF-8 (e.g. `iconv -f <its encoding> -t UTF-8 in > out`, "
        "or your editor's 'save with encoding: UTF-8')", line=line, offset=offset)


class _Found(Exception):
    """Carries a finding out of a generator that scans rows (see _jsonl_rows)."""

    def __init__(self, finding: "_Finding"):
        super().__init__(finding.problem)
        self.finding = finding


def _jsonl_rows(path: Path, rows: str):
    """(line number, object) for each non-blank line, read one line at a time.

    Raises:
        _Found: at the first line that is not JSON, or not a JSON object.
    """
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _Found(_Finding(f"line {number} is not valid JSON ({exc.msg}: column "
                                      f"{exc.colno})", "correct that line: JSON Lines hold "
                                      f"{rows}, each on one line", line=number)) from None
            if not isinstance(value, dict):
                raise _Found(_Finding(f"line {number} is {_kind(value)}, not a row (a JSON "
                                      f"object)", f"make every line one JSON object: {rows}",
                                      line=number))
            yield number, value


def _scan_json(path: Path, fmt: str) -> Optional[_Finding]:
    """The first line that is not JSON, or the top-level shape that is not rows.

    A file that starts with `[` (or a .json file whose first line is not a JSON value on
    its own) is read as one JSON document, as `datasets` reads it; else as JSON Lines,
    one line at a time.
    """
    rows = (f"one JSON object per row with the columns of data.format {fmt} "
            f"({_rows_hint(fmt)})")
    with path.open(encoding="utf-8-sig") as f:
        first_line = next((line for line in f if line.strip()), None)
    if first_line is None:
        return _Finding("holds only whitespace: it has no rows",
                        f"give at least one row: {rows}")
    document = first_line.lstrip().startswith("[")
    if not document and path.suffix.lower() != ".jsonl":
        try:
            json.loads(first_line)
        except ValueError:
            document = True  # e.g. one object pretty-printed over several lines
    if not document:
        try:
            return _mixed_types(_jsonl_rows(path, rows), "line")
        except _Found as found:
            return found.finding
    text = path.read_text(encoding="utf-8-sig")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        ends = ", where the file ends: is it truncated?" if _cut_at(text, exc.pos) else ""
        return _Finding(f"line {exc.lineno} is not valid JSON ({exc.msg}: column "
                        f"{exc.colno}{ends})", f"correct that line; the file must hold "
                        f"{rows} (a JSON list of them, or JSON Lines)", line=exc.lineno)
    if isinstance(value, dict):
        return None
    if not isinstance(value, list):
        return _Finding(f"holds a single JSON value ({_kind(value)}), not rows",
                        f"give a JSON list of rows or JSON Lines: {rows}")
    if not value:
        return _Finding("is an empty JSON list: it has no rows",
                        f"give at least one row: {rows}")
    bad = next((i for i, v in enumerate(value) if not isinstance(v, dict)), None)
    if bad is not None:
        return _Finding(f"is a JSON list whose element {bad} is {_kind(value[bad])}, not a "
                        "row (an object)", f"make every element an object: {rows}")
    return _mixed_types(enumerate(value), "element")


def _mixed_types(rows, unit: str) -> Optional[_Finding]:
    """The first row whose column holds another kind of value than in the first row
    that has it (null aside): valid JSON that pyarrow cannot put in one column.

    Args:
        rows: (line number or element index, row object) pairs.
        unit: "line" or "element", for the message.
    """
    first: dict[str, tuple[int, str]] = {}
    for where, row in rows:
        for column, value in row.items():
            if value is None:
                continue
            kind = _kind(value)
            seen = first.setdefault(column, (where, kind))
            if seen[1] != kind:
                return _Finding(
                    f"{unit} {where}: '{column}' is {kind} where {unit} {seen[0]} has "
                    f"{seen[1]}", f"give '{column}' the same kind of value in every row",
                    line=where if unit == "line" else None)
    return None


def _cut_at(text: str, pos: int) -> bool:
    """True when a JSON parse error at `pos` means the text ends too early: nothing but
    whitespace follows, or a string opens there and never closes."""
    rest = text[pos:].rstrip()
    if not rest:
        return True
    if rest[0] != '"':
        return False
    i = 1
    while i < len(rest):
        if rest[i] == "\\":
            i += 2
            continue
        if rest[i] == '"':
            return False
        i += 1
    return True


def _scan_csv(path: Path, fmt: str) -> Optional[_Finding]:
    """A CSV with no header, no rows, or a line with more fields than its header."""
    import csv

    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next((r for r in reader if r), None)
            if header is None:
                return _Finding("holds only whitespace: no header line, no rows",
                                f"give a header line with the columns of data.format {fmt} "
                                f"({', '.join(sorted(REQUIRED_COLUMNS[fmt]))}) and a row "
                                "per example")
            count = 0
            for record in reader:
                if not record:
                    continue
                count += 1
                if len(record) > len(header):
                    return _Finding(
                        f"line {reader.line_num} has {len(record)} fields where the header "
                        f"has {len(header)}", "quote the fields that contain a comma "
                        '("a, b"), or remove the extra fields', line=reader.line_num)
        except csv.Error as exc:
            return _Finding(f"line {reader.line_num} is not valid CSV ({exc})",
                            "correct that line", line=reader.line_num)
    if count == 0:
        return _Finding("has a header line but no rows", "add at least one row under the "
                        "header")
    return None


def _scan_parquet(path: Path) -> Optional[_Finding]:
    """A Parquet file whose footer or row groups cannot be read, or that has no rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fix = ("re-export it (pandas DataFrame.to_parquet, datasets Dataset.to_parquet) and "
           "check that the copy is complete")
    try:
        parquet = pq.ParquetFile(path)
        if parquet.metadata.num_rows == 0:
            return _Finding("has no rows (a Parquet file with 0 rows)",
                            "write the rows into it")
        for group in range(parquet.num_row_groups):
            try:
                parquet.read_row_group(group)
            except (pa.ArrowException, OSError) as exc:
                return _Finding(f"is damaged: row group {group} cannot be read ({exc})", fix)
    except (pa.ArrowException, OSError) as exc:
        return _Finding(f"is not a readable Parquet file ({path.stat().st_size} bytes: "
                        f"{exc}); it is truncated, corrupt or not Parquet", fix)
    return None


def diagnose_file(path: Path, fmt: str) -> Optional[_Finding]:
    """What makes a data file unreadable, with its line or byte offset where there is one.

    Why a scan of our own: `datasets` reports these as ValueError("Expected object or
    value at position 35"), a bare StopIteration, pyarrow's ArrowInvalid or a
    DatasetGenerationError around them, none of which names the file or (for JSON) the
    line; and pyarrow's JSON reader takes bytes that are not UTF-8 inside strings
    without a word (the row fails later, when read). It runs only once reading has
    failed, so a good file is read once.

    Args:
        path: the file (a local file, or a Hub dataset's file downloaded).
        fmt: data.format, for the shape the fix describes.

    Returns:
        The finding, or None when the scan sees nothing wrong.
    """
    kind = path.suffix.lower()
    if path.stat().st_size == 0:
        return _Finding("is empty (0 bytes): it has no rows",
                        f"give a file with at least one row of data.format {fmt} "
                        f"({_rows_hint(fmt)})")
    if kind == ".parquet":
        return _scan_parquet(path)
    found = _scan_utf8(path)
    if found is None and kind in (".json", ".jsonl"):
        found = _scan_json(path, fmt)
    elif found is None and kind == ".csv":
        found = _scan_csv(path, fmt)
    return found


class _DropErrorRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextmanager
def _library_error_logs_dropped():
    """While `datasets` reads: drop the ERROR lines it logs ("Failed to load JSON from
    file …") just before it raises. The raise is translated into one line naming the
    file and the line (load_rows), so the library's line would be a second, rawer copy
    of the same error; its warnings still show."""
    drop = _DropErrorRecords()
    names = [n for n in list(logging.root.manager.loggerDict)
             if n == "datasets" or n.startswith("datasets.")]
    loggers = [logging.getLogger(n) for n in names]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def _read_error_types() -> tuple[type[BaseException], ...]:
    """What `datasets` raises for data it cannot read: its own errors (the
    DatasetGenerationError wrapping pyarrow's or pandas' error), pyarrow's, a bare
    StopIteration (an empty JSON Lines file), ValueError (pandas' JSON fallback,
    UnicodeDecodeError, "corresponds to no data"), and the FileNotFoundError it raises
    when data.data_files matches no file of a Hub dataset."""
    import pyarrow as pa
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DatasetsError

    return (DatasetsError, EmptyDatasetError, StopIteration, ValueError, pa.ArrowException)


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _where(source: DatasetRef, data: Optional[DataSection] = None) -> str:
    """How a message names the rows: the local file, or the Hub dataset (with the
    data files and split it was read with, when given)."""
    if source.source == "file":
        return source.id
    if data is None:
        return f"dataset '{source.id}'"
    files = f"data_files {data.data_files}, " if data.data_files else ""
    return f"dataset '{source.id}' ({files}split {data.split})"


def _hub_finding(data: DataSection, source: DatasetRef) -> Optional[tuple[str, _Finding]]:
    """Which file of a Hub dataset is unreadable, and why: the split's files as `datasets`
    resolves them (its builder's data_files), each downloaded at the pinned commit into a
    temporary directory and scanned (diagnose_file). Only called once reading failed.

    Returns:
        (the file, named by repo, path in the repo and commit; the finding), or None.
    """
    import tempfile

    import datasets
    from huggingface_hub import HfFileSystem, hf_hub_download

    token = settings.hub_token()
    builder = datasets.load_dataset_builder(
        source.id, revision=source.commit, data_files=data.data_files, token=token,
        cache_dir=str(settings.loraflow_home() / "datasets-cache"))
    files = builder.config.data_files or {}
    split = data.split.split("[")[0]
    urls = list(files.get(split) or [u for group in files.values() for u in group])
    fs = HfFileSystem(endpoint=settings.hub_endpoint(), token=token)
    with tempfile.TemporaryDirectory(prefix="loraflow-diagnose-") as tmp:
        for url in urls:
            in_repo = fs.resolve_path(str(url)).path_in_repo
            local = hf_hub_download(source.id, in_repo, repo_type="dataset",
                                    revision=source.commit, token=token, local_dir=tmp,
                                    endpoint=settings.hub_endpoint())
            found = diagnose_file(Path(local), data.format)
            if found is not None:
                return (f"{source.id} file {in_repo} (commit {source.commit[:12]})", found)
    return None


def _unreadable(exc: BaseException, data: DataSection, source: DatasetRef
                ) -> errors.LoraflowError:
    """The one error for rows `datasets` could not read (see _read_error_types): the
    Hub's own error when one is in the chain, else a DatasetError naming the file and
    what the scan found there (or, when it finds nothing, the library's reason).

    Args:
        exc: what `datasets` raised.
        data: the data section.
        source: the rows' source.

    Returns:
        The error to raise.

    Raises:
        Exception: a connection failure met while fetching a Hub file to scan, as it
            is (the retry policy's to handle).
    """
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DataFilesNotFoundError, DatasetsError
    from huggingface_hub import errors as hf

    chain = _chain(exc)
    hub = next((e for e in chain if isinstance(e, hf.HfHubHTTPError)), None)
    if hub is not None:
        return errors.translate_hub_error(hub, repo_id=source.id, repo_type="dataset",
                                          revision=source.commit,
                                          endpoint=settings.hub_endpoint())
    if source.source == "hub" and isinstance(exc, (DataFilesNotFoundError, EmptyDatasetError)):
        return _no_data_files(data, source)
    label, found = source.id, None
    try:
        if source.source == "file":
            found = diagnose_file(Path(source.id), data.format)
        else:
            label, found = _hub_finding(data, source) or (label, None)
    except hf.HfHubHTTPError as hub_exc:
        return errors.translate_hub_error(hub_exc, repo_id=source.id, repo_type="dataset",
                                          revision=source.commit,
                                          endpoint=settings.hub_endpoint())
    except Exception as diagnosis_exc:  # noqa: BLE001 - the scan only adds detail
        if errors.is_transient(diagnosis_exc):
            raise
        # Without the scan's detail the library's own reason is still given below.
        log.warning("could not pinpoint why %s is unreadable: %s: %s", label,
                    type(diagnosis_exc).__name__, diagnosis_exc)
    if found is not None:
        return errors.DatasetError(f"data.dataset: {label} {found.problem}. Fix: "
                                   f"{found.fix}.", field="data.dataset", file=label,
                                   line=found.line, offset=found.offset)
    root = next((e for e in chain if not isinstance(e, DatasetsError)), exc)
    said = " ".join(str(root).split())[:300] or "no message"
    kind = Path(source.id).suffix.lower().lstrip(".") if source.source == "file" \
        else "data files"
    return errors.DatasetError(
        f"data.dataset: {_where(source, data)} could not be read as {kind} "
        f"({type(root).__name__}: {said}). Fix: check that it holds rows of data.format "
        f"{data.format} ({_rows_hint(data.format)}) as valid UTF-8 JSON Lines, JSON, CSV "
        "or Parquet.", field="data.dataset", file=source.id)


def _value_is(*dtypes: str):
    import datasets

    return lambda f: isinstance(f, datasets.Value) and (not dtypes or f.dtype in dtypes) \
        and f.dtype != "null"


def _list_of(inner):
    import datasets

    # datasets < 4 has no List feature (Sequence instead): those columns go row by row.
    kind = getattr(datasets, "List", None)
    return lambda f: kind is not None and isinstance(f, kind) and inner(f.feature)


def _column_rules(fmt: str) -> dict[str, tuple]:
    """Per column of the format: (what it must hold, a check of one value, a check of
    the column's `datasets` feature under which only nulls can be wrong, whether null
    is allowed)."""
    string = _value_is("string", "large_string")
    text = ("text", lambda v: isinstance(v, str), string, False)
    rules = {
        "alpaca": {"instruction": text, "output": text,
                   "input": ("text or null", lambda v: v is None or isinstance(v, str),
                             string, True)},
        "chat": {"messages": ('a list of messages ({"role": …, "content": …})',
                              lambda v: isinstance(v, list) and all(
                                  isinstance(m, dict) and isinstance(m.get("role"), str)
                                  for m in v),
                              _list_of(lambda f: isinstance(f, dict)
                                       and string(f.get("role"))), False),
                 "tools": ("a list of tool schemas, their JSON text, or null",
                           lambda v: v is None or isinstance(v, (str, list)),
                           lambda f: string(f) or _list_of(lambda _: True)(f), True)},
        "prompt-completion": {"prompt": text, "completion": text},
        "text": {"text": text},
        "text-label": {"text": text,
                       "label": ("a label (text or a number)",
                                 lambda v: isinstance(v, (str, int, float)), _value_is(),
                                 False)},
        "tokens-tags": {"tokens": ("a list of words (text)", lambda v: isinstance(v, list)
                                   and all(isinstance(w, str) for w in v),
                                   _list_of(string), False),
                        "tags": ("a list of tags (text or numbers), one per word",
                                 lambda v: isinstance(v, list) and all(
                                     isinstance(t, (str, int)) for t in v),
                                 _list_of(_value_is()), False)},
        "input-target": {"input": text, "target": text},
    }
    return rules[fmt]


def _first_bad_row(rows, column: str, rule: tuple) -> Optional[tuple[int, object]]:
    """The first row whose `column` breaks `rule`: by the column's Arrow type and null
    count where the type settles it (no Python objects made), else row by row."""
    import pyarrow.compute as pc

    _, ok, fast, nullable = rule
    if fast(rows.features[column]):
        values = rows.data.column(column)
        if nullable or values.null_count == 0:
            return None
        index = pc.index(pc.is_null(values), True).as_py()
        return index, None
    start = 0
    for batch in rows.select_columns([column]).iter(batch_size=1024):
        for offset, value in enumerate(batch[column]):
            if not ok(value) and not (nullable and value is None):
                return start + offset, value
        start += len(batch[column])
    return None


def _line_of_row(source: DatasetRef, index: int) -> Optional[int]:
    """The line where row `index` of a local JSON Lines or CSV file starts (blank lines
    skipped, as the readers skip them); None for other files."""
    if source.source != "file":
        return None
    path = Path(source.id)
    try:
        if path.suffix.lower() in (".json", ".jsonl"):
            with path.open(encoding="utf-8-sig") as f:
                seen = -1
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if seen == -1 and line.lstrip().startswith("["):
                        return None  # one JSON list: rows are not lines
                    seen += 1
                    if seen == index:
                        return number
        elif path.suffix.lower() == ".csv":
            import csv

            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                seen, start = -2, 1  # the header is row -1
                for record in reader:
                    if record:
                        seen += 1
                        if seen == index:
                            return start
                    start = reader.line_num + 1
    except (OSError, ValueError):
        return None
    return None


def check_columns(rows, data: DataSection, source: DatasetRef) -> None:
    """Every row's format columns hold what the format needs (text, a list of messages,
    a label …), before any row is tokenized.

    Args:
        rows: the loaded rows (they have the format's columns).
        data: the data section (data.format).
        source: where the rows came from, for the message.

    Raises:
        DatasetError: naming the first wrong row (and its line in a local JSON Lines or
            CSV file), the column, what it holds and what it should.
    """
    for column, rule in _column_rules(data.format).items():
        if column not in rows.column_names:
            continue
        bad = _first_bad_row(rows, column, rule)
        if bad is None:
            continue
        index, value = bad
        line = _line_of_row(source, index)
        at = f"row {index}" + (f" (line {line})" if line else "")
        fix = (f"fill in '{column}' in that row, or remove the row" if value is None else
               f"give '{column}' as {rule[0]} in every row (data.format {data.format})")
        raise errors.DatasetError(
            f"data.dataset: {_where(source, data)} {at}: '{column}' is "
            f"{'missing or null' if value is None else _kind(value)}, expected {rule[0]}. "
            f"Fix: {fix}.", field="data.dataset", file=source.id,
            row=index, line=line)


# ------------------------------------------------------------------------ the step

def _no_data_files(data: DataSection, source: DatasetRef) -> errors.DatasetError:
    return errors.DatasetError(
        f"data.data_files: no file of dataset '{source.id}' at commit {source.commit[:12]} "
        f"matches {data.data_files!r}. Fix: give the path (or glob) of a data file in the "
        "repo, e.g. data/train.jsonl, or null for the repo's default configuration.",
        field="data.data_files")


def _check_hub_data_files(data: DataSection, source: DatasetRef) -> None:
    """data.data_files matches a file of the Hub dataset at its commit, resolved by
    `datasets`' own pattern matching.

    Why before loading: when it matches nothing, load_dataset falls back to whatever
    configuration of the same repo it has cached, and fails there with a ValueError
    about its cache that says nothing of data_files.

    Raises:
        DatasetError: no file matches (field data.data_files).
    """
    from datasets import DownloadConfig
    from datasets.data_files import resolve_pattern

    try:
        resolve_pattern(data.data_files, base_path=f"hf://datasets/{source.id}@{source.commit}",
                        download_config=DownloadConfig(token=settings.hub_token()))
    except FileNotFoundError as exc:
        if errors.is_transient(exc):
            raise
        raise _no_data_files(data, source) from None


def _refuse_scalar_list(path: Path, fmt: str) -> None:
    """A JSON file that is a list of scalars, not of rows. `datasets` reads one as a
    `text` column: kept for data.format text when they are strings, refused otherwise
    (the user never named a `text` column). Decided from the first element's first
    character, so a large file is not parsed again.

    Raises:
        DatasetError: naming the file, what its list holds and the shape expected.
    """
    if path.suffix.lower() not in (".json", ".jsonl"):
        return
    with path.open("rb") as f:
        head = f.read(4096).decode("utf-8-sig", errors="replace").lstrip()
    if not head.startswith("["):
        return
    first = head[1:].lstrip()[:1]
    kind = {'"': "text", "[": "a list", "t": "a boolean", "f": "a boolean",
            "n": "null"}.get(first, "a number")
    if first in ("{", "", "]") or (fmt == "text" and kind == "text"):
        return
    raise errors.DatasetError(
        f"data.dataset: {path} is a JSON list of values ({kind} first), not of rows. Fix: "
        f"make each element an object with the columns of data.format {fmt} "
        f"({_rows_hint(fmt)}), or write JSON Lines (one such object per line).",
        field="data.dataset", file=str(path))


def load_rows(data: DataSection, source: DatasetRef):
    """The raw rows through `datasets`: a Hub repo at its commit, or a local file.

    Reading errors are translated here, once, by type: the Hub's into its typed errors,
    a connection failure left as it is (the retry policy's), and data `datasets` cannot
    read into a DatasetError naming the file, the line and the fix (_unreadable).

    Args:
        data: the data section.
        source: the rows, pinned (preflight's DatasetRef).

    Returns:
        The rows (a `datasets.Dataset`), at least one.

    Raises:
        DatasetError: an unreadable, empty, wrongly encoded or wrongly shaped file.
        HubAccessError: the Hub refused the dataset's files.
    """
    settings.prepare_client_environment()
    import datasets
    import pyarrow as pa
    from huggingface_hub import errors as hf

    cache_dir = str(settings.loraflow_home() / "datasets-cache")
    if source.source == "file":
        suffix = Path(source.id).suffix.lower()
        kind = READERS.get(suffix)
        if kind is None:
            raise errors.DatasetError(
                f"data.dataset: {source.id} is a {suffix or 'suffix-less'} file; loraflow "
                f"reads local {', '.join(READERS)} files. Fix: convert the rows to one of "
                "these (e.g. JSON Lines: one JSON object per line) and name the file with "
                "its suffix.", field="data.dataset", file=source.id)
        arguments = dict(path=kind, data_files=source.id, split="train")
        if kind == "csv":
            # pandas would read a text column of digits ("42") as numbers; its converters
            # keep the cell's text (empty cells stay null).
            arguments["converters"] = {c: str for c in TEXT_COLUMNS.get(data.format, ())}
    else:
        arguments = dict(path=source.id, revision=source.commit, data_files=data.data_files,
                         split=data.split, token=settings.hub_token())
    try:
        if source.source == "hub" and data.data_files:
            _check_hub_data_files(data, source)
        with _library_error_logs_dropped():
            rows = datasets.load_dataset(**arguments, cache_dir=cache_dir)
    except hf.HfHubHTTPError as exc:
        raise errors.translate_hub_error(exc, repo_id=source.id, repo_type="dataset",
                                         revision=source.commit,
                                         endpoint=settings.hub_endpoint()) from None
    except _read_error_types() as exc:
        if errors.is_transient(exc):
            raise  # a connection failure while reading: the retry policy's to handle
        raise _unreadable(exc, data, source) from None
    try:
        # pyarrow's JSON reader keeps bytes that are not UTF-8 inside strings: a full
        # validation finds them now, not in the middle of tokenizing.
        rows.data.table.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise _unreadable(exc, data, source) from None
    if source.source == "file" and rows.column_names == ["text"]:
        _refuse_scalar_list(Path(source.id), data.format)
    if len(rows) == 0:
        raise errors.DatasetError(
            f"data.dataset: {_where(source, data)} has no rows. Fix: give "
            f"data with at least one row of data.format {data.format} "
            f"({_rows_hint(data.format)}).", field="data.dataset", file=source.id)
    return rows


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
        template = _template_override(data, tokenizer)
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


@task(name="dataset", **TRANSIENT_RETRIES)
def prepare_dataset(data: DataSection, source: DatasetRef, snapshot: SnapshotManifest,
                    seed: int) -> DatasetManifest:
    """Prefect task: run_prepare_dataset, cached by dataset_key."""
    return run_prepare_dataset(data, source, snapshot, seed)
