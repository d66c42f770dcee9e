"""Chat rows rendered the way the model's chat template renders them.

A conversation ({messages[, tools]}) becomes the ids of the template's own rendering,
tokenized once without special tokens (so one BOS exactly when the template writes one),
with labels on the trained assistant turns: each turn's rendered content (or tool call)
and its end-of-turn token, never the role header or the whitespace after the turn.
`data.train_on`, `data.system_message` and `data.chat_template` choose what is trained,
how system turns reach a template that refuses them, and which template renders.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from profiles.schema import DataSection
from tasks import errors
from tasks.model_tasks import IGNORE_INDEX

TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2")

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
            f"data.chat_template: no file {value}"
            f"{'' if path.is_absolute() else f' (relative to {Path.cwd()})'}. Fix: give "
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


def template_override(data: DataSection, tokenizer) -> Optional[str]:
    """What to pass as apply_chat_template's chat_template: None leaves the choice to
    transformers (the tokenizer's template, or its `tool_use` one for rows with tools)."""
    return resolve_chat_template(data, tokenizer) if data.chat_template else None



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


class TemplateFailure(Exception):
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
        raise TemplateFailure(exc) from exc


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
        TemplateFailure: the template raised (the caller names the field).
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


def template_error(exc: TemplateFailure, row: dict, data: DataSection, tokenizer,
                    template: Optional[str], index: int) -> errors.DatasetError:
    """Which setting a template's refusal is about: when the row has a system turn, kept,
    and the same row renders once that turn is merged, it is data.system_message; else
    data.chat_template. Decided by rendering again, not by reading the error's text."""
    messages, tools = chat_messages(row, data.system_message, index)
    if data.system_message == "keep" and any(m.get("role") == "system" for m in messages):
        merged, _ = chat_messages(row, "merge", index)
        try:
            _render(tokenizer, merged, tools, template)
        except TemplateFailure:
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
