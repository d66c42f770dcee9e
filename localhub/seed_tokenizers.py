"""Real-style tokenizers for tiny seeded models: Llama-3, ChatML (Qwen2/2.5), Gemma and the seeded
Llama-2-like style, each with the special tokens, BOS behaviour and chat template of the family it
imitates, trained offline with the `tokenizers` library.

Every style is a byte-level BPE (as Llama-3 and Qwen2 use; Gemma's SentencePiece differs in its model,
not in what a chat template or a label mask sees) trained on the given corpus, so any text encodes
without `<unk>`. Training is deterministic for a given corpus, vocabulary size and `tokenizers`
release. Special tokens are added as special *added* tokens, so the template's markers are single ids
and never split.

BOS, as the real families do it:
- llama3: the template emits `<|begin_of_text|>` AND the tokenizer's post-processor adds it when
  `add_special_tokens=True` (as Llama-3's tokenizer.json does) — tokenizing a rendering with special
  tokens therefore doubles BOS, exactly the trap of a real Llama-3.
- chatml: no BOS at all (`bos_token` is None, as Qwen2's); EOS is `<|im_end|>` (the Instruct models'
  choice, which is the end-of-turn token too), pad `<|endoftext|>` (Qwen2 base uses `<|endoftext|>`
  as EOS; we pick the Instruct choice because this tokenizer carries a chat template).
- gemma: template emits `<bos>`, post-processor adds it too; EOS `<eos>` is NOT the end-of-turn
  (`<end_of_turn>`), as in Gemma/Gemma-2 instruct.
- llama2: `<s>`/`</s>`, role tokens `<|system|>`… and the template of localhub.seed_data (template
  emits BOS, post-processor adds BOS).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

STYLES = ("llama3", "chatml", "gemma", "llama2")

# Modelled on Llama-3.1/3.2-Instruct's template (date fixed, so renderings are deterministic; tools
# go into the first user message by default, a tool call is rendered as JSON, `tool`/`ipython` turns
# become `ipython`).
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Qwen2.5-Instruct's template (default system message, tools in the system turn, tool calls as
# `<tool_call>` JSON, consecutive tool results grouped into one user turn).
CHATML_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Gemma/Gemma-2-it's template: refuses a system turn, `model` is the assistant's role.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def _llama2_template() -> str:
    from localhub.seed_data import CHAT_TEMPLATE

    return CHAT_TEMPLATE


# style → (special tokens in id order, bos, eos, pad, unk, the post-processor adds BOS, end-of-turn)
_SPECS = {
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
               "<|begin_of_text|>", "<|end_of_text|>", None, None, True, "<|eot_id|>"),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
               None, "<|im_end|>", "<|endoftext|>", None, False, "<|im_end|>"),
    "gemma": (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
              "<bos>", "<eos>", "<pad>", "<unk>", True, "<end_of_turn>"),
    "llama2": (["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"],
               "<s>", "</s>", "<pad>", "<unk>", True, "</s>"),
}


def end_of_turn_token(style: str) -> str:
    """The token that closes an assistant turn in the style's template.

    Args:
        style: one of STYLES.

    Returns:
        The end-of-turn token text (e.g. `<|eot_id|>`), which may differ from the EOS token.
    """
    return _SPECS[_check(style)][6]


def _check(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, not {style!r}")
    return style


def _template(style: str) -> str:
    return {"llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE}.get(style) \
        or _llama2_template()


def _backend(style: str, corpus: list[str], vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` trained on the corpus, specials first (ids 0…)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    specials, bos, *_rest = _SPECS[style]
    add_bos = _SPECS[style][5]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, bos_id)])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def build_tokenizer(style: str, corpus: list[str], vocab_size: int = 512):
    """A fast tokenizer of the given family style, trained offline on the corpus.

    Args:
        style: "llama3", "chatml", "gemma" or "llama2" (see the module docstring).
        corpus: texts to learn the BPE merges from (the chat template's markers are added as
            special tokens whatever the corpus holds).
        vocab_size: the vocabulary size including the 256 byte symbols and the special tokens.

    Returns:
        A `transformers.PreTrainedTokenizerFast` with bos/eos/pad/unk and the chat template set.

    Raises:
        ValueError: an unknown style.
    """
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad, unk, _add_bos, _eot = _SPECS[_check(style)]
    backend = _backend(style, corpus, vocab_size)
    extra = [t for t in specials if t not in (bos, eos, pad, unk)]
    kwargs = {"tokenizer_object": backend, "eos_token": eos, "chat_template": _template(style),
              "extra_special_tokens": extra, "model_max_length": 2048,
              "clean_up_tokenization_spaces": False, "padding_side": "right"}
    if bos is not None:
        kwargs["bos_token"] = bos
    if pad is not None:
        kwargs["pad_token"] = pad
    if unk is not None:
        kwargs["unk_token"] = unk
    return PreTrainedTokenizerFast(**kwargs)


def tokenizer_files(style: str, corpus: list[str], vocab_size: int = 512) -> dict[str, bytes]:
    """The files `save_pretrained` writes for build_tokenizer(style, corpus, vocab_size).

    Args:
        style: see build_tokenizer.
        corpus: see build_tokenizer.
        vocab_size: see build_tokenizer.

    Returns:
        File name → bytes (tokenizer.json, tokenizer_config.json, chat_template.jinja where the
        installed transformers writes the template aside, …), ready to seed a model repo.
    """
    tok = build_tokenizer(style, corpus, vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def special_ids(style: str, tokenizer) -> dict[str, int]:
    """Ids of the style's special tokens in a tokenizer built here (for model configs).

    Args:
        style: see build_tokenizer.
        tokenizer: a tokenizer from build_tokenizer (or loaded from tokenizer_files).

    Returns:
        {"bos_token_id", "eos_token_id", "pad_token_id", "end_of_turn_id"}; None where the style
        has no such token.
    """
    _specials, bos, eos, pad, _unk, _add, eot = _SPECS[_check(style)]
    ids = {name: (tokenizer.convert_tokens_to_ids(tok) if tok else None)
           for name, tok in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad),
                             ("end_of_turn_id", eot))}
    return ids


if __name__ == "__main__":  # a quick look: python -m localhub.seed_tokenizers
    corpus = ["hello world, what color is the sky? blue.", "Add the two numbers: 2 and 3 gives 5."] * 4
    for s in STYLES:
        t = build_tokenizer(s, corpus, 400)
        text = t.apply_chat_template([{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "hello"}], tokenize=False)
        print(s, json.dumps(text), t.convert_ids_to_tokens(t(text, add_special_tokens=False).input_ids)[:8])
