"""Chat rows prepared as the template renders them, through the dataset step
(tasks.dataset.run_prepare_dataset) on local jsonl files and real-style tokenizers
(localhub.seed_tokenizers: Llama-3, ChatML/Qwen2.5, Gemma), with no Hub involved.

Every expectation is computed from the library, not from loraflow: the ids are
`tokenizer(tokenizer.apply_chat_template(messages, tools=…, tokenize=False),
add_special_tokens=False)`, and the labels are the ids of each assistant turn's text as
the real family renders it (written out here) followed by the template's end-of-turn id.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from localhub.seed_tokenizers import end_of_turn_token, tokenizer_files
from profiles.schema import DataSection
from tasks.errors import DatasetError

CORPUS = ["hello there, what color is the sky? It is blue.", "Add the two numbers 2 and 3.",
          "The weather in Paris is sunny today.", "You are a helpful assistant."] * 4
TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}]
MULTI = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "hello"},
         {"role": "assistant", "content": "hello there"},
         {"role": "user", "content": "what color is the sky?"},
         {"role": "assistant", "content": "It is blue."}]
TOOL_CALL = [{"role": "user", "content": "Add 2 and 3."},
             {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                 "name": "add", "arguments": {"a": 2, "b": 3}}}]},
             {"role": "tool", "content": "5"},
             {"role": "assistant", "content": "It is 5."}]
# What each family's real template writes for the assistant turns above (content, trimmed,
# or the tool call in the family's own syntax), before its end-of-turn token.
ASSISTANT_TEXT = {
    ("llama3", "multi"): ["hello there", "It is blue."],
    ("chatml", "multi"): ["hello there", "It is blue."],
    ("gemma", "multi"): ["hello there", "It is blue."],
    ("llama3", "tools"): ['{"name": "add", "parameters": {"a": 2, "b": 3}}', "It is 5."],
    ("chatml", "tools"): ['<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n'
                          '</tool_call>', "It is 5."],
}


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory):
    """style → a directory with the tokenizer files save_pretrained wrote."""
    root = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for style in ("llama3", "chatml", "gemma", "llama2"):
        out[style] = root / style
        out[style].mkdir()
        for name, data in tokenizer_files(style, CORPUS, 400).items():
            (out[style] / name).write_bytes(data)
    return out


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def snapshot_of(directory: Path):
    from tasks.contracts import SnapshotManifest

    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size,
                                                   "sha256": hashlib.sha256(
                                                       p.read_bytes()).hexdigest()}
             for p in sorted(directory.rglob("*")) if p.is_file()}
    return SnapshotManifest(repo_id="local/tokenizer", commit="0" * 40,
                            local_dir=str(directory), files=files)


def prepare(tmp_path: Path, tok_dir: Path, rows: list[dict], suffix=".jsonl", **data):
    """run_prepare_dataset on `rows` written as jsonl (or parquet, as pyarrow writes a
    table: one struct type per column) → (manifest, saved train rows)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.contracts import DatasetRef
    from tasks.dataset import run_prepare_dataset

    path = tmp_path / f"rows-{len(list(tmp_path.glob('rows-*')))}{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = DataSection(dataset=str(path), **{"format": "chat", "eval_split": 0, **data})
    source = DatasetRef(source="file", id=str(path),
                        sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    manifest = run_prepare_dataset(section, source, snapshot_of(tok_dir), 42)
    return manifest, datasets.load_from_disk(str(Path(manifest.path) / "train"))


def rendering_ids(tok, messages, tools=None) -> list[int]:
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def expected_labels(tok, style: str, texts: list[str]) -> list[int]:
    eot = tok.convert_tokens_to_ids(end_of_turn_token(style))
    out = []
    for text in texts:
        out += tok(text, add_special_tokens=False).input_ids + [eot]
    return out


def trained(labels: list[int]) -> list[int]:
    return [x for x in labels if x != -100]


@pytest.mark.parametrize("style, kind", [("llama3", "multi"), ("chatml", "multi"),
                                         ("gemma", "multi"), ("llama3", "tools"),
                                         ("chatml", "tools")])
def test_rows_are_the_templates_rendering_with_labels_on_every_assistant_turn(
        tokenizers_dir, home, tmp_path, style, kind):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizers_dir[style]))
    messages = TOOL_CALL if kind == "tools" else MULTI
    tools = TOOLS if kind == "tools" else None
    policy = "merge" if style == "gemma" else "keep"  # Gemma refuses a system turn
    row = {"messages": messages, **({"tools": tools} if tools else {})}
    manifest, train = prepare(tmp_path, tokenizers_dir[style], [row], system_message=policy,
                              max_length=2048)  # a tool schema is long in a 400-token vocab
    got = train[0]
    shown = messages if policy == "keep" else (
        [{"role": "user", "content": "Be brief.\n\nhello"}] + messages[2:])
    assert got["input_ids"] == rendering_ids(tok, shown, tools)
    if tok.bos_token_id is not None:
        assert got["input_ids"][0] == tok.bos_token_id
        assert got["input_ids"].count(tok.bos_token_id) == 1
    else:  # ChatML: no BOS at all
        assert style == "chatml" and got["input_ids"][0] == tok.convert_tokens_to_ids(
            "<|im_start|>")
    assert trained(got["labels"]) == expected_labels(tok, style, ASSISTANT_TEXT[style, kind])
    # Labels sit on the very positions of those ids; the rest is -100.
    assert all(lab in (-100, i) for lab, i in zip(got["labels"], got["input_ids"]))
    if tools:  # the tools reached the template (their schema is in the prompt)
        assert "Add two numbers" in tok.decode(got["input_ids"])
    assert (manifest.rows_read, manifest.num_train, manifest.dropped) == (1, 1, {})


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_rows_as_arrow_stores_them_render_as_the_plain_conversation(tokenizers_dir, home,
                                                                    tmp_path, style):
    """Rows with different tools beside plain rows in one parquet file (as Hub datasets
    are published): Arrow stores one struct type per column, so every message gets every
    key and every tool schema every other tool's properties, as None. Tools and arguments
    kept as JSON text are the other common layout."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizers_dir[style]))
    as_text = [dict(m) for m in TOOL_CALL]
    as_text[1] = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "add", "arguments": json.dumps({"a": 2, "b": 3})}}]}
    weather = [{"type": "function", "function": {
        "name": "weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    asks = [{"role": "user", "content": "The weather in Paris?"},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                "name": "weather", "arguments": {"city": "Paris"}}}]}]
    rows = [{"messages": MULTI, "tools": None}, {"messages": TOOL_CALL, "tools": TOOLS},
            {"messages": asks, "tools": weather}]
    _, train = prepare(tmp_path, tokenizers_dir[style], rows, suffix=".parquet",
                       max_length=2048)
    assert train[0]["input_ids"] == rendering_ids(tok, MULTI)
    assert train[1]["input_ids"] == rendering_ids(tok, TOOL_CALL, TOOLS)
    assert train[2]["input_ids"] == rendering_ids(tok, asks, weather)
    assert trained(train[1]["labels"]) == expected_labels(tok, style,
                                                          ASSISTANT_TEXT[style, "tools"])
    rows = [{"messages": MULTI, "tools": None},
            {"messages": as_text, "tools": json.dumps(TOOLS)}]
    _, texts = prepare(tmp_path, tokenizers_dir[style], rows, max_length=2048)
    assert texts[1]["input_ids"] == train[1]["input_ids"]
    assert texts[1]["labels"] == train[1]["labels"]


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_train_on_last_assistant_trains_only_the_last_turn(tokenizers_dir, home, tmp_path,
                                                           style):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizers_dir[style]))
    _, train = prepare(tmp_path, tokenizers_dir[style], [{"messages": MULTI}],
                       train_on="last_assistant")
    assert trained(train[0]["labels"]) == expected_labels(tok, style, ["It is blue."])
    assert train[0]["input_ids"] == rendering_ids(tok, MULTI)


def test_gemma_refuses_a_system_turn_and_merge_or_drop_make_it_render(tokenizers_dir, home,
                                                                      tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizers_dir["gemma"]))
    rows = [{"messages": MULTI[1:3]}, {"messages": MULTI}]
    with pytest.raises(DatasetError) as err:
        prepare(tmp_path, tokenizers_dir["gemma"], rows)
    message = str(err.value)
    assert message.startswith("data.system_message: row 1:") and "Fix:" in message
    assert "System role not supported" in message and "Traceback" not in message
    saved = home / "datasets"
    assert not saved.exists() or not [p for p in saved.iterdir() if ".partial" not in p.name]

    _, merged = prepare(tmp_path, tokenizers_dir["gemma"], rows, system_message="merge")
    assert "Be brief.\n\nhello" in tok.decode(merged[1]["input_ids"])
    _, dropped = prepare(tmp_path, tokenizers_dir["gemma"], rows, system_message="drop")
    assert dropped[1]["input_ids"] == rendering_ids(tok, MULTI[1:])
    assert "Be brief" not in tok.decode(dropped[1]["input_ids"])


def test_a_template_error_that_is_not_the_system_turn_names_the_template(tokenizers_dir,
                                                                         home, tmp_path):
    rows = [{"messages": MULTI[1:3]}, {"messages": MULTI[1:3]},
            {"messages": [MULTI[1], MULTI[3], MULTI[2]]}]  # user, user, assistant
    with pytest.raises(DatasetError) as err:
        prepare(tmp_path, tokenizers_dir["gemma"], rows)
    assert str(err.value).startswith("data.chat_template: row 2:")
    assert "alternate" in str(err.value) and "Fix:" in str(err.value)


def test_mask_prompt_false_trains_every_token(tokenizers_dir, home, tmp_path):
    _, train = prepare(tmp_path, tokenizers_dir["chatml"], [{"messages": MULTI}],
                       mask_prompt=False)
    assert train[0]["labels"] == train[0]["input_ids"]


def test_chat_template_from_a_file_or_a_name_and_keyed_by_content(tokenizers_dir, home,
                                                                  tmp_path):
    from transformers import AutoTokenizer

    from tasks.contracts import DatasetRef
    from tasks.data.chat import resolve_chat_template
    from tasks.dataset import dataset_key

    plain = ("{% for m in messages %}{{ m['role'] + ':\n' + m['content'] + eos_token + '\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}")
    jinja = tmp_path / "plain.jinja"
    jinja.write_text(plain)
    tok = AutoTokenizer.from_pretrained(str(tokenizers_dir["chatml"]))
    _, train = prepare(tmp_path, tokenizers_dir["chatml"], [{"messages": MULTI}],
                       chat_template=str(jinja))
    text = tok.apply_chat_template(MULTI, chat_template=plain, tokenize=False)
    assert train[0]["input_ids"] == tok(text, add_special_tokens=False).input_ids
    assert trained(train[0]["labels"]) == expected_labels(
        tok, "chatml", ["hello there", "It is blue."])
    assert resolve_chat_template(DataSection(dataset="x", chat_template=str(jinja)), tok) == plain

    # The key follows the file's text, not its path.
    source = DatasetRef(source="file", id="rows.jsonl", sha256="1" * 64)
    snap = snapshot_of(tokenizers_dir["chatml"])
    moved = tmp_path / "elsewhere" / "same.jinja"
    moved.parent.mkdir()
    moved.write_text(plain)

    def key(path):
        return dataset_key(DataSection(dataset="rows.jsonl", format="chat",
                                       chat_template=str(path)), source, snap, 42)

    first = key(jinja)
    assert key(moved) == first
    moved.write_text(plain.replace(":", "::"))
    assert key(moved) != first
    with pytest.raises(DatasetError, match=r"^data\.chat_template: no file"):
        key(tmp_path / "missing.jinja")

    # A name: one of the tokenizer's named templates.
    named = tmp_path / "named"
    tok.chat_template = {"default": tok.chat_template, "plain": plain}
    tok.save_pretrained(named)
    _, by_name = prepare(tmp_path, named, [{"messages": MULTI}], chat_template="plain")
    assert by_name[0]["input_ids"] == train[0]["input_ids"]
    with pytest.raises(DatasetError, match=r"^data\.chat_template: 'nope' is neither"):
        prepare(tmp_path, named, [{"messages": MULTI}], chat_template="nope")


def test_a_template_that_rewrites_earlier_turns_is_refused_unless_only_the_last_is_trained(
        tokenizers_dir, home, tmp_path):
    """Like Qwen3 dropping past reasoning: an earlier assistant turn renders differently
    once later turns follow, so its tokens are not in the whole rendering."""
    from transformers import AutoTokenizer

    rewrite = tmp_path / "rewrite.jinja"
    rewrite.write_text(
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ 'assistant:\n(earlier)' + eos_token }}{% else %}"
        "{{ m['role'] + ':\n' + m['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}")
    with pytest.raises(DatasetError) as err:
        prepare(tmp_path, tokenizers_dir["chatml"], [{"messages": MULTI}],
                chat_template=str(rewrite))
    assert str(err.value).startswith("data.chat_template: row 0:")
    assert "data.train_on: last_assistant" in str(err.value)
    tok = AutoTokenizer.from_pretrained(str(tokenizers_dir["chatml"]))
    _, train = prepare(tmp_path, tokenizers_dir["chatml"], [{"messages": MULTI}],
                       chat_template=str(rewrite), train_on="last_assistant")
    assert trained(train[0]["labels"]) == expected_labels(tok, "chatml", ["It is blue."])


def test_counts_drops_truncation_and_the_eval_split(tokenizers_dir, home, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizers_dir["llama2"]))
    short = {"messages": MULTI[1:3]}
    length = len(rendering_ids(tok, MULTI[1:3]))
    long_prompt = {"messages": [{"role": "user", "content": "hello there " * 40},
                                {"role": "assistant", "content": "blue"}]}
    long_answer = {"messages": [{"role": "user", "content": "hello"},
                                {"role": "assistant", "content": "It is blue. " * 40}]}
    rows = [short, {"messages": []}, {"messages": [MULTI[1]]}, long_prompt, long_answer, short]
    manifest, train = prepare(tmp_path, tokenizers_dir["llama2"], rows, max_length=length + 4,
                              eval_split=0.2)
    assert manifest.rows_read == 6
    assert manifest.dropped == {"empty_conversation": 1, "no_assistant_turn": 1,
                                "no_label_after_truncation": 1}
    assert manifest.truncated == 1
    assert (manifest.num_train, manifest.num_eval) == (2, 1)
    assert all(len(ids) <= length + 4 for ids in train["input_ids"])

    with pytest.raises(DatasetError) as err:  # eval asked for, one usable row: refuse
        prepare(tmp_path, tokenizers_dir["llama2"], [short, {"messages": []}], eval_split=0.1)
    assert str(err.value).startswith("data.eval_split:") and "Fix:" in str(err.value)


@pytest.mark.parametrize("style", ["llama3", "chatml", "llama2"])
def test_text_formats_keep_completion_and_eos_with_at_most_one_bos(tokenizers_dir, home,
                                                                   tmp_path, style):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizers_dir[style]))
    rows = [{"prompt": "Add 2 and 3.", "completion": " It is 5."},
            {"prompt": (tok.bos_token or "") + "Add 2 and 3.", "completion": " It is 5."}]
    _, train = prepare(tmp_path, tokenizers_dir[style], rows, format="prompt-completion")
    plain = tok("Add 2 and 3.", add_special_tokens=True).input_ids  # the tokenizer's BOS use
    answer = tok(" It is 5.", add_special_tokens=False).input_ids + [tok.eos_token_id]
    for got in train:
        assert got["input_ids"] == plain + answer
        assert trained(got["labels"]) == answer
        if tok.bos_token_id is not None:
            assert got["input_ids"].count(tok.bos_token_id) == 1
