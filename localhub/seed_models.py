"""Deterministic content for the task-type seeds: a tiny random BERT (sequence and token
classification), a tiny random T5 (sequence-to-sequence) and `tinylabs/tiny-tasks`, one small
learnable dataset per task, all as bytes.

As in seed_data: numpy's legacy RandomState, JSON written by us with fixed key order, safetensors and
tokenizer.json serialised by hand. The two tokenizers are trained offline with the `tokenizers`
library (WordPiece for BERT, BPE over Metaspace pieces for T5) on the dataset's own text; both
trainers count integers and break ties by a fixed order, so the vocabulary is a pure function of the
corpus for a given `tokenizers` release (a release that changed the training algorithm would move the
seeded commits, which the contract tests would show as a changed sha, never as wrong content).
"""

from __future__ import annotations

import json

import numpy as np

from localhub.seed_data import COLORS, NOUNS, _json_bytes, jsonl, safetensors_bytes

# --------------------------------------------------------------------------- dataset

FILLERS = ["the", "a", "one", "my", "big", "small", "old", "new", "and", "with", "near", "under"]
NUMBERS = [str(n) for n in range(10, 40)]
TAG_NAMES = ("O", "COLOR", "NUM")


def classification_rows() -> list[dict]:
    """256 rows {text, label}: label `colorful` when a colour word appears, else `plain`.

    Half of each, in a shuffled order; 2–4 words per text (a tiny random BERT pools a
    short text's words strongly enough to learn the rule in a few dozen steps).
    """
    rs = np.random.RandomState(20250102)
    rows = []
    for i in range(256):
        n = int(rs.randint(2, 5))
        words = [(NOUNS + FILLERS)[int(j)] for j in rs.randint(0, len(NOUNS) + len(FILLERS), size=n)]
        colorful = i % 2 == 0
        if colorful:
            words[int(rs.randint(0, n))] = COLORS[int(rs.randint(0, len(COLORS)))]
        rows.append({"text": " ".join(words), "label": "colorful" if colorful else "plain"})
    return [rows[int(i)] for i in rs.permutation(len(rows))]


def tag_of(word: str) -> str:
    """The token-classification rule: colours are COLOR, numbers NUM, everything else O."""
    if word in COLORS:
        return "COLOR"
    if word.isdigit():
        return "NUM"
    return "O"


def tagging_rows() -> list[dict]:
    """256 rows {tokens, tags}: 4–8 words from nouns, fillers, colours and two-digit numbers."""
    rs = np.random.RandomState(20250103)
    pool = NOUNS + FILLERS + COLORS * 3 + NUMBERS[::2]
    rows = []
    for _ in range(256):
        n = int(rs.randint(4, 9))
        words = [pool[int(j)] for j in rs.randint(0, len(pool), size=n)]
        rows.append({"tokens": words, "tags": [tag_of(w) for w in words]})
    return rows


def seq2seq_rows() -> list[dict]:
    """256 rows {input, target}: `reverse: w1 w2 w3` → `w3 w2 w1`, `repeat: …` → the same words."""
    rs = np.random.RandomState(20250104)
    rows = []
    for i in range(256):
        n = int(rs.randint(2, 5))
        words = [NOUNS[int(j)] for j in rs.randint(0, len(NOUNS), size=n)]
        if i % 2 == 0:
            rows.append({"input": "reverse: " + " ".join(words), "target": " ".join(reversed(words))})
        else:
            rows.append({"input": "repeat: " + " ".join(words), "target": " ".join(words)})
    return [rows[int(i)] for i in rs.permutation(len(rows))]


TASKS_README = """---
license: apache-2.0
language:
- en
pretty_name: Tiny Tasks
size_categories:
- n<1K
task_categories:
- text-classification
- token-classification
- text2text-generation
configs:
- config_name: classification
  data_files:
  - split: train
    path: data/classification.jsonl
- config_name: tagging
  data_files:
  - split: train
    path: data/tagging.jsonl
- config_name: seq2seq
  data_files:
  - split: train
    path: data/seq2seq.jsonl
---

# tiny-tasks

Three small datasets whose answers are fixed rules, so that a tiny model learns them in a few steps.
Seeded by localhub for the non-causal task types.

- `data/classification.jsonl`: `{"text", "label"}`, label `colorful` if a colour word appears, else `plain`
- `data/tagging.jsonl`: `{"tokens", "tags"}`, one tag per word: `COLOR`, `NUM` or `O`
- `data/seq2seq.jsonl`: `{"input", "target"}`, `reverse: a b c` → `c b a`, `repeat: a b` → `a b`
"""


def tasks_dataset_files() -> dict[str, bytes]:
    """All files of tinylabs/tiny-tasks, by path."""
    return {
        "README.md": TASKS_README.encode(),
        "data/classification.jsonl": jsonl(classification_rows()),
        "data/seq2seq.jsonl": jsonl(seq2seq_rows()),
        "data/tagging.jsonl": jsonl(tagging_rows()),
    }


def _corpus() -> list[str]:
    texts = [r["text"] for r in classification_rows()]
    texts += [" ".join(r["tokens"]) for r in tagging_rows()]
    texts += [r["input"] + " " + r["target"] for r in seq2seq_rows()]
    return texts


def _added(token: str, token_id: int) -> dict:
    return {"id": token_id, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _added_decoder(vocab: dict[str, int], specials: list[str]) -> dict:
    return {str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True} for t in specials}


# --------------------------------------------------------------------------- BERT

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Small enough that the longer nouns split into word pieces (token classification must align
# word-level tags to them), large enough that short words stay whole.
BERT_VOCAB_SIZE = 160
BERT_HIDDEN, BERT_INTERMEDIATE, BERT_LAYERS, BERT_HEADS, BERT_POSITIONS = 64, 128, 2, 4, 128


def bert_vocab() -> dict[str, int]:
    """WordPiece vocabulary from BPE trained with `tokenizers` on the classification and tagging text.

    `tokenizers`' WordPiece trainer (and BPE with a `##` prefix) numbers its `##` alphabet in hash-map
    order, so their vocabularies differ between processes. BPE over Metaspace pieces has a sorted
    alphabet and breaks ties by id (deterministic, as for T5), and its pieces convert one-to-one:
    `▁word` starts a word (`word`), any other piece continues one (`##piece`). Every letter gets both
    forms, so no word of the data is [UNK].
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = [r["text"] for r in classification_rows()] + [" ".join(r["tokens"]) for r in tagging_rows()]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=BERT_VOCAB_SIZE, special_tokens=BERT_SPECIALS, show_progress=False)
    tok.train_from_iterator([t.lower() for t in texts], trainer)
    pieces = [p for p, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if p not in BERT_SPECIALS]
    letters = sorted(p for p in pieces if len(p) == 1 and p != "\u2581")
    vocab: dict[str, int] = {}
    for token in [*BERT_SPECIALS, *letters, *("##" + c for c in letters),
                  *(p[1:] if p.startswith("\u2581") else "##" + p for p in pieces if p != "\u2581")]:
        vocab.setdefault(token, len(vocab))
    return vocab


def bert_tokenizer_json(vocab: dict[str, int]) -> bytes:
    """tokenizer.json: BERT normaliser and pre-tokenizer, `[CLS] A [SEP]`, WordPiece."""
    cls, sep = {"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added(t, vocab[t]) for t in BERT_SPECIALS],
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": True},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [cls, {"Sequence": {"id": "A", "type_id": 0}}, sep],
            "pair": [cls, {"Sequence": {"id": "A", "type_id": 0}}, sep,
                     {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {t: {"id": t, "ids": [vocab[t]], "tokens": [t]} for t in ("[CLS]", "[SEP]")},
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab},
    }
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def bert_tokenizer_config_json(vocab: dict[str, int]) -> bytes:
    return _json_bytes({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "mask_token": "[MASK]",
        "model_max_length": BERT_POSITIONS,
        "padding_side": "right",
        "clean_up_tokenization_spaces": True,
        "added_tokens_decoder": _added_decoder(vocab, BERT_SPECIALS),
    })


def bert_config_json(vocab: dict[str, int]) -> bytes:
    """config.json of a tiny BertModel (heads are added by the task's Auto class)."""
    return _json_bytes({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": len(vocab),
        "hidden_size": BERT_HIDDEN,
        "intermediate_size": BERT_INTERMEDIATE,
        "num_hidden_layers": BERT_LAYERS,
        "num_attention_heads": BERT_HEADS,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": BERT_POSITIONS,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": vocab["[PAD]"],
        "dtype": "float32",
    })


def bert_tensors(vocab_size: int) -> dict[str, np.ndarray]:
    """Random float32 weights named as transformers' BertModel saves them: Normal(0, 0.02) for
    the embeddings, Normal(0, 1/sqrt(in_features)) for linear weights, zero biases, LayerNorm
    ones/zeros.

    With BERT's own 0.02 everywhere, attention and feed-forward outputs are a few percent of the
    residual stream, so [CLS] barely depends on the other words and a classifier on it stalls at
    ln 2 for dozens of steps; at 1/sqrt(in_features) the blocks mix the words from the start.
    Measured on the classification rows, r=8, lr 3e-3, batch 16: loss 0.71 → 0.37 in 30 steps,
    against 0.70 → 0.57 with 0.02.
    """
    rs = np.random.RandomState(4321)
    h, f = BERT_HIDDEN, BERT_INTERMEDIATE

    def normal(*shape: int, std: float | None = None) -> np.ndarray:
        std = shape[1] ** -0.5 if std is None else std
        return (rs.standard_normal(shape) * std).astype(np.float32)

    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    t = {"embeddings.word_embeddings.weight": normal(vocab_size, h, std=0.02),
         "embeddings.position_embeddings.weight": normal(BERT_POSITIONS, h, std=0.02),
         "embeddings.token_type_embeddings.weight": normal(2, h, std=0.02),
         "embeddings.LayerNorm.weight": ones(h), "embeddings.LayerNorm.bias": zeros(h)}
    for i in range(BERT_LAYERS):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            t[p + name + ".weight"], t[p + name + ".bias"] = normal(h, h), zeros(h)
        t[p + "attention.output.LayerNorm.weight"], t[p + "attention.output.LayerNorm.bias"] = ones(h), zeros(h)
        t[p + "intermediate.dense.weight"], t[p + "intermediate.dense.bias"] = normal(f, h), zeros(f)
        t[p + "output.dense.weight"], t[p + "output.dense.bias"] = normal(h, f), zeros(h)
        t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"] = ones(h), zeros(h)
    t["pooler.dense.weight"], t["pooler.dense.bias"] = normal(h, h), zeros(h)
    return t


BERT_README = """---
license: apache-2.0
library_name: transformers
tags:
- bert
- tiny
- localhub
datasets:
- tinylabs/tiny-tasks
---

# tiny-bert

A randomly initialised, 2-layer BertModel (hidden size 64) with a WordPiece tokenizer trained on
`tinylabs/tiny-tasks`. Seeded by localhub for offline tests of sequence and token classification:
load it with AutoModelForSequenceClassification or AutoModelForTokenClassification (the heads start
random).
"""


def bert_files() -> dict[str, bytes]:
    """All files of tinylabs/tiny-bert, by path."""
    vocab = bert_vocab()
    return {
        "README.md": BERT_README.encode(),
        "config.json": bert_config_json(vocab),
        "model.safetensors": safetensors_bytes(bert_tensors(len(vocab)), {"format": "pt"}),
        "tokenizer.json": bert_tokenizer_json(vocab),
        "tokenizer_config.json": bert_tokenizer_config_json(vocab),
    }


# --------------------------------------------------------------------------- T5

T5_SPECIALS = ["<pad>", "</s>", "<unk>"]
T5_VOCAB_SIZE = 192
T5_D_MODEL, T5_D_KV, T5_D_FF, T5_LAYERS, T5_HEADS, T5_BUCKETS = 64, 16, 128, 2, 4, 8


def t5_vocab_and_merges() -> tuple[dict[str, int], list[list[str]]]:
    """BPE over Metaspace pieces (as SentencePiece-BPE), trained with `tokenizers` on the dataset."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=T5_VOCAB_SIZE, special_tokens=T5_SPECIALS, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    return vocab, [list(m) if not isinstance(m, str) else m.split(" ") for m in model["merges"]]


def t5_tokenizer_json(vocab: dict[str, int], merges: list[list[str]]) -> bytes:
    """tokenizer.json: Metaspace pieces, BPE, `</s>` appended (as T5's tokenizer does)."""
    eos = {"SpecialToken": {"id": "</s>", "type_id": 0}}
    meta = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added(t, vocab[t]) for t in T5_SPECIALS],
        "normalizer": None,
        "pre_tokenizer": meta,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, eos],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, eos, {"Sequence": {"id": "B", "type_id": 0}}, eos],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [vocab["</s>"]], "tokens": ["</s>"]}},
        },
        "decoder": meta,
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def t5_tokenizer_config_json(vocab: dict[str, int]) -> bytes:
    return _json_bytes({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "model_max_length": 512,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": _added_decoder(vocab, T5_SPECIALS),
    })


def t5_config_json(vocab: dict[str, int]) -> bytes:
    """config.json of a tiny T5ForConditionalGeneration (original T5 layout: relu feed-forward, the
    output head tied to the shared embedding)."""
    return _json_bytes({
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": len(vocab),
        "d_model": T5_D_MODEL,
        "d_kv": T5_D_KV,
        "d_ff": T5_D_FF,
        "num_layers": T5_LAYERS,
        "num_decoder_layers": T5_LAYERS,
        "num_heads": T5_HEADS,
        "relative_attention_num_buckets": T5_BUCKETS,
        "relative_attention_max_distance": 32,
        "dropout_rate": 0.0,
        "layer_norm_epsilon": 1e-06,
        "initializer_factor": 1.0,
        "feed_forward_proj": "relu",
        "is_encoder_decoder": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "pad_token_id": vocab["<pad>"],
        "eos_token_id": vocab["</s>"],
        "decoder_start_token_id": vocab["<pad>"],
        "dtype": "float32",
    })


def t5_generation_config_json(vocab: dict[str, int]) -> bytes:
    return _json_bytes({"decoder_start_token_id": vocab["<pad>"], "eos_token_id": vocab["</s>"],
                        "pad_token_id": vocab["<pad>"], "do_sample": False, "max_new_tokens": 16})


def t5_tensors(vocab_size: int) -> dict[str, np.ndarray]:
    """Random float32 weights named as T5ForConditionalGeneration saves them (the encoder, decoder
    and lm_head share `shared.weight`): Normal(0, 1) for the embedding, as T5 initialises it (the
    tied head scales the decoder output by 1/sqrt(d_model), so logits start near unit scale),
    Normal(0, 0.05) for projections and relative-position biases, ones for the RMS norms."""
    rs = np.random.RandomState(5678)
    d, kv, ff = T5_D_MODEL, T5_HEADS * T5_D_KV, T5_D_FF

    def normal(*shape: int, std: float = 0.05) -> np.ndarray:
        return (rs.standard_normal(shape) * std).astype(np.float32)

    def attention(prefix: str, relative: bool) -> None:
        t[prefix + "q.weight"], t[prefix + "k.weight"] = normal(kv, d), normal(kv, d)
        t[prefix + "v.weight"], t[prefix + "o.weight"] = normal(kv, d), normal(d, kv)
        if relative:
            t[prefix + "relative_attention_bias.weight"] = normal(T5_BUCKETS, T5_HEADS)

    def ffn(prefix: str) -> None:
        t[prefix + "DenseReluDense.wi.weight"] = normal(ff, d)
        t[prefix + "DenseReluDense.wo.weight"] = normal(d, ff)
        t[prefix + "layer_norm.weight"] = np.ones(d, dtype=np.float32)

    t: dict[str, np.ndarray] = {"shared.weight": normal(vocab_size, d, std=1.0)}
    for stack in ("encoder", "decoder"):
        for i in range(T5_LAYERS):
            p = f"{stack}.block.{i}.layer."
            attention(p + "0.SelfAttention.", relative=i == 0)
            t[p + "0.layer_norm.weight"] = np.ones(d, dtype=np.float32)
            if stack == "decoder":
                attention(p + "1.EncDecAttention.", relative=False)
                t[p + "1.layer_norm.weight"] = np.ones(d, dtype=np.float32)
                ffn(p + "2.")
            else:
                ffn(p + "1.")
        t[f"{stack}.final_layer_norm.weight"] = np.ones(d, dtype=np.float32)
    return t


T5_README = """---
license: apache-2.0
library_name: transformers
pipeline_tag: text2text-generation
tags:
- t5
- tiny
- localhub
datasets:
- tinylabs/tiny-tasks
---

# tiny-t5

A randomly initialised T5ForConditionalGeneration (2 encoder and 2 decoder blocks, d_model 64) with a
BPE tokenizer trained on `tinylabs/tiny-tasks`. Seeded by localhub for offline sequence-to-sequence
tests: it knows nothing until you fine-tune it.
"""


def t5_files() -> dict[str, bytes]:
    """All files of tinylabs/tiny-t5, by path."""
    vocab, merges = t5_vocab_and_merges()
    return {
        "README.md": T5_README.encode(),
        "config.json": t5_config_json(vocab),
        "generation_config.json": t5_generation_config_json(vocab),
        "model.safetensors": safetensors_bytes(t5_tensors(len(vocab)), {"format": "pt"}),
        "tokenizer.json": t5_tokenizer_json(vocab, merges),
        "tokenizer_config.json": t5_tokenizer_config_json(vocab),
    }
