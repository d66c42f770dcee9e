"""Deterministic content for the seeded repos: a tiny instruction dataset, a word-level tokenizer,
and a tiny random Llama, all as bytes.

Everything here is a pure function of constants: the same bytes on every run and every machine, so
the seeded commit shas never move. Hence numpy's legacy RandomState (its streams are frozen across
numpy versions), JSON written by us with fixed key order, and the safetensors and tokenizer.json files
serialised by hand in the libraries' formats rather than by whatever library version is installed
(the formats are stable; a writer's whitespace or field order need not be). The contract tests load
both files with the real libraries.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter

import numpy as np


# --------------------------------------------------------------------------- dataset
def alphabet_rows(count: int, length: int, seed: int = 0, first_id: int = 1000) -> list[list[int]]:
    """Learnable token sequences for training benchmarks and GPU tests: each row repeats a random order
    of the same 16 token ids (first_id … first_id + 15) from a random phase. A random-weight model learns
    the alphabet within a few steps (loss towards ln 16 ≈ 2.8) and the period after that, so losses fall
    far and do not depend on which rows a step sees."""
    rs = np.random.RandomState(seed)
    rows = []
    for _ in range(count):
        pattern = first_id + rs.permutation(16)
        start = int(rs.randint(0, 16))
        rows.append([int(pattern[i % 16]) for i in range(start, start + length)])
    return rows



NOUNS = [
    "apple", "ball", "bird", "boat", "book", "cake", "car", "cat", "chair", "cloud", "cup", "dog", "door", "duck",
    "egg", "bell", "frog", "hat", "horse", "key", "kite", "lamp", "lion", "moon", "pen", "pig", "ring", "shoe",
    "star", "sun", "tree", "bed",
]
THING_COLORS = [
    ("sky", "blue"), ("grass", "green"), ("snow", "white"), ("sun", "yellow"), ("coal", "black"), ("blood", "red"),
    ("leaf", "green"), ("night", "black"), ("cloud", "white"), ("lemon", "yellow"), ("sea", "blue"),
    ("cherry", "red"), ("milk", "white"), ("banana", "yellow"), ("tomato", "red"), ("frog", "green"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("day", "night"), ("old", "new"),
    ("happy", "sad"), ("open", "closed"), ("light", "dark"), ("wet", "dry"), ("full", "empty"), ("early", "late"),
    ("high", "low"), ("hard", "soft"), ("left", "right"), ("in", "out"),
]
COLORS = ["red", "blue", "green", "white", "black", "yellow"]


def instruct_rows() -> list[dict]:
    """256 alpaca rows {instruction, input, output}; each answer is a fixed function of the input.

    Eight tasks of 32 rows each, in an order shuffled by a fixed RandomState so that any prefix of the
    file mixes all tasks.
    """
    rs = np.random.RandomState(20250101)
    rows: list[dict] = []

    def add(instruction: str, inp: str, out: str) -> None:
        rows.append({"instruction": instruction, "input": inp, "output": out})

    for w in NOUNS:
        add("Repeat the word twice.", w, f"{w} {w}")
    for thing, color in THING_COLORS:
        add(f"What color is the {thing}?", "", color)
    for thing, color in THING_COLORS:
        add("Name the color of this thing.", thing, color)
    for w in NOUNS:
        add("Spell the word backwards, letter by letter.", w, " ".join(reversed(w)))
    for _ in range(32):
        a, b = (int(x) for x in rs.randint(0, 10, size=2))
        add("Add the two numbers.", f"{a} and {b}", str(a + b))
    for w in NOUNS:
        add("Give the plural of the word.", w, w + "s")
    for _ in range(32):
        n = int(rs.randint(1, 7))
        words = [COLORS[int(i)] for i in rs.randint(0, len(COLORS), size=n)]
        add("Count the words.", " ".join(words), str(n))
    for a, b in OPPOSITES:
        add("Give the opposite of the word.", a, b)
        add("Give the opposite of the word.", b, a)
    for w in NOUNS:
        add("Say the first letter of the word.", w, w[0])
    order = rs.permutation(len(rows))
    return [rows[int(i)] for i in order]


def chat_rows(rows: list[dict]) -> list[dict]:
    """The same rows as chat messages: the user turn is the instruction (plus input), then the answer."""
    out = []
    for r in rows:
        user = r["instruction"] + ("\n" + r["input"] if r["input"] else "")
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]})
    return out


def jsonl(rows: list[dict]) -> bytes:
    """One compact JSON object per line, keys in insertion order."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


DATASET_README = """---
license: apache-2.0
language:
- en
pretty_name: Tiny Instruct
size_categories:
- n<1K
task_categories:
- text-generation
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train.jsonl
- config_name: chat
  data_files:
  - split: train
    path: data/chat.jsonl
---

# tiny-instruct

256 instruction/answer pairs for smoke-testing fine-tuning pipelines, seeded by localhub.
Every answer is a deterministic function of the question (repeat a word, spell it backwards, add two
digits, name a colour, ...) so that a very small model can learn them in a few steps.

- `data/train.jsonl`: alpaca format, `{"instruction", "input", "output"}` (config `default`)
- `data/chat.jsonl`: the same rows as `{"messages": [{"role", "content"}, ...]}` (config `chat`)
"""

# --------------------------------------------------------------------------- tokenizer

VOCAB_SIZE = 512
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD] + ROLE_TOKENS
# Renders `<s><|user|>\n...</s>\n<|assistant|>\n...</s>\n`; the role markers are special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Roles must be system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# Words beyond the dataset, so prompts written by hand are not all <unk>.
COMMON_WORDS = (
    "a about after all also an and answer any are as ask at back be because been before but by can color "
    "colour could day did do does each end even every few find first for from get give go good great had has "
    "have he her here him his how i if into is it its just know last like letter little long look made make "
    "many may me more most much must my name never no not now number of on one only or other our over "
    "people please question repeat right said same say see she should show so some spell system than thank "
    "that the their them then there these they thing think this those through time to two under use user "
    "very want was way we well were what when where which who why will with word words would write yes you "
    "your assistant hello hi ok okay sorry true false zero"
).split()
_WORD_RE = re.compile(r"\w+|[^\w\s]+")


def tokenizer_vocab(texts: list[str]) -> dict[str, int]:
    """Word-level vocabulary of exactly VOCAB_SIZE entries.

    Order: special tokens, punctuation, letters, numbers 0-20, dataset words by falling count (ties
    alphabetical), common words, then `<|reserved_N|>` fillers. A pure function of the texts.
    """
    vocab: list[str] = list(SPECIAL_TOKENS)

    def push(tok: str) -> None:
        if tok not in seen:
            seen.add(tok)
            vocab.append(tok)

    seen = set(vocab)
    for tok in [".", ",", "?", "!", ":", ";", "'", '"', "-", "+", "=", "(", ")"]:
        push(tok)
    for c in "abcdefghijklmnopqrstuvwxyz":
        push(c)
    for n in range(21):
        push(str(n))
    counts = Counter(t for text in texts for t in _WORD_RE.findall(text.lower()))
    for tok, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        push(tok)
    for w in COMMON_WORDS:
        push(w)
    if len(vocab) > VOCAB_SIZE:
        raise ValueError(f"vocabulary has {len(vocab)} entries, more than {VOCAB_SIZE}")
    i = 0
    while len(vocab) < VOCAB_SIZE:
        push(f"<|reserved_{i}|>")
        i += 1
    return {tok: i for i, tok in enumerate(vocab)}


def tokenizer_json(vocab: dict[str, int]) -> bytes:
    """tokenizer.json for a WordLevel model: lowercase, split on words/punctuation, `<s>` prepended."""
    def added(tok: str) -> dict:
        return {"id": vocab[tok], "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}

    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added(t) for t in SPECIAL_TOKENS],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [vocab[BOS]], "tokens": [BOS]}},
        },
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK},
    }
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def tokenizer_config_json(vocab: dict[str, int]) -> bytes:
    """tokenizer_config.json: PreTrainedTokenizerFast over tokenizer.json, with the chat template."""
    return _json_bytes({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": ROLE_TOKENS,
        "model_max_length": 512,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}
            for t in SPECIAL_TOKENS
        },
    })


def special_tokens_map_json() -> bytes:
    return _json_bytes({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
                        "additional_special_tokens": ROLE_TOKENS})


# --------------------------------------------------------------------------- model

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 4, 2, 16


def model_config_json(vocab: dict[str, int]) -> bytes:
    """config.json of a tiny LlamaForCausalLM."""
    return _json_bytes({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(vocab),
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
        "pad_token_id": vocab[PAD],
        "dtype": "float32",
    })


def generation_config_json(vocab: dict[str, int]) -> bytes:
    return _json_bytes({"bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[PAD],
                        "do_sample": False, "max_new_tokens": 32})


def model_tensors(vocab_size: int) -> dict[str, np.ndarray]:
    """Random float32 weights named exactly as transformers' LlamaForCausalLM names them.

    Normal(0, 0.02) for embeddings and linear layers, ones for RMSNorm weights; drawn in a fixed order
    from a fixed RandomState. Except lm_head: Normal(0, 1/sqrt(hidden)). It sits after the final
    RMSNorm (hidden state norm sqrt(64) = 8) and LoRA's "all-linear" leaves it frozen, so with std 0.02
    no logit could move by more than about 0.02 * 8 * 8 = 1.3 and fine-tuning would stall near
    ln(vocab). Measured with r=8, lr 3e-3, 60 steps of 16 rows: loss 6.3 -> 5.4 with 0.02, 7.2 -> 1.8
    with 1/sqrt(hidden).
    """
    rs = np.random.RandomState(1234)
    q_out, kv_out = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM

    def normal(*shape: int, std: float = 0.02) -> np.ndarray:
        return (rs.standard_normal(shape) * std).astype(np.float32)

    t: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal(vocab_size, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = normal(q_out, HIDDEN)
        t[p + "self_attn.k_proj.weight"] = normal(kv_out, HIDDEN)
        t[p + "self_attn.v_proj.weight"] = normal(kv_out, HIDDEN)
        t[p + "self_attn.o_proj.weight"] = normal(HIDDEN, q_out)
        t[p + "mlp.gate_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        t[p + "mlp.up_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        t[p + "mlp.down_proj.weight"] = normal(HIDDEN, INTERMEDIATE)
        t[p + "input_layernorm.weight"] = np.ones(HIDDEN, dtype=np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(HIDDEN, dtype=np.float32)
    t["model.norm.weight"] = np.ones(HIDDEN, dtype=np.float32)
    t["lm_head.weight"] = normal(vocab_size, HIDDEN, std=HIDDEN ** -0.5)
    return t


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """Serialise float32 tensors in the safetensors format, laid out as safetensors' own writer does
    (metadata first, tensors sorted by name, little-endian data, header padded with spaces to 8 bytes).
    """
    header: dict = {"__metadata__": metadata}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype="<f4")
        data = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


MODEL_README = """---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags:
- llama
- tiny
- localhub
datasets:
- tinylabs/tiny-instruct
---

# tiny-llama

A randomly initialised, 2-layer LlamaForCausalLM (hidden size 64, vocabulary 512) with a word-level
tokenizer built from `tinylabs/tiny-instruct`. Seeded by localhub for offline pipeline tests: it
knows nothing until you fine-tune it. Access is gated (manual approval).
"""


def model_files() -> dict[str, bytes]:
    """All files of tinylabs/tiny-llama, by path."""
    rows = instruct_rows()
    texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in rows]
    vocab = tokenizer_vocab(texts)
    return {
        "README.md": MODEL_README.encode(),
        "config.json": model_config_json(vocab),
        "generation_config.json": generation_config_json(vocab),
        "model.safetensors": safetensors_bytes(model_tensors(len(vocab)), {"format": "pt"}),
        "special_tokens_map.json": special_tokens_map_json(),
        "tokenizer.json": tokenizer_json(vocab),
        "tokenizer_config.json": tokenizer_config_json(vocab),
    }


def dataset_files() -> dict[str, bytes]:
    """All files of tinylabs/tiny-instruct, by path."""
    rows = instruct_rows()
    return {
        "README.md": DATASET_README.encode(),
        "data/chat.jsonl": jsonl(chat_rows(rows)),
        "data/train.jsonl": jsonl(rows),
    }
