"""How a causal-LM adapter's training rows were laid out, and so how to prompt it.

The dataset step formats rows with these; the model card tells the adapter's users the
same, so that they prompt in the layout the adapter learned.
"""
from __future__ import annotations

ALPACA_PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response "
                 "that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                 "{input_block}### Response:\n")


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt of one instruction (and optional input), as training saw it.

    Args:
        instruction: the task, stripped.
        input_text: the optional context, stripped; empty for none.
    """
    return ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if input_text else "",
        instruction=instruction,
        input_block=f"### Input:\n{input_text}\n\n" if input_text else "")


def prompt_guide(data: dict) -> str:
    """Markdown for the card: how to prompt an adapter trained on `data` (the profile's
    data section as JSON), in the layout its training rows had; empty for formats whose
    input is plain text (classification, tagging, seq2seq)."""
    fmt = data.get("format")
    if fmt == "alpaca":
        return ("Training rows were Alpaca prompts; give the adapter the same prompt and it "
                "writes the response, then EOS (with an `input`, the prompt gains an "
                "`### Input:` block before `### Response:`):\n\n```text\n"
                f"{alpaca_prompt('{instruction}')}```\n")
    if fmt == "chat":
        turns = ("every assistant turn" if data.get("train_on", "all_assistant") == "all_assistant"
                 else "the last assistant turn")
        return ("Training rows were conversations rendered by the chat template saved with "
                "this repo's tokenizer (`chat_template.jinja`), with labels on "
                f"{turns} and its end-of-turn token. Prompt with "
                "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` "
                "using this repo's tokenizer.\n")
    if fmt == "prompt-completion":
        return ("Training rows were `prompt` → `completion` + EOS: give the adapter a prompt "
                "laid out like the training prompts and it writes the completion.\n")
    if fmt == "text":
        return "Training rows were plain text (every token learned): the adapter continues text.\n"
    return ""


def example_prompts(data: dict) -> str:
    """Python source of a list of two example prompts in the training layout, for the
    card's snippet (a Python expression that may use `tokenizer`)."""
    fmt = data.get("format")
    if fmt == "alpaca":
        return ("[" + ", ".join(repr(alpaca_prompt(t)) for t in
                                ("Name a color.", "Name an animal that lives in the sea.")) + "]")
    if fmt == "chat":
        return ("[tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": text}], "
                "add_generation_prompt=True, tokenize=False)\n"
                "           for text in (\"Name a color.\", \"Name an animal that lives in "
                "the sea.\")]")
    return '["a first example", "a second example, a little longer"]'
