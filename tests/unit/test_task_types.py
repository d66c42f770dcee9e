"""Task types: the profile refuses a data format that does not fit model.task, the base
config check refuses a task the model cannot do (no weights, no torch), label and tag
handling in tasks.dataset, the tokenizer's padding (pad = EOS keeps the EOS label), and
the memory estimate on encoder and encoder-decoder headers.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from profiles.loader import load_profile
from tasks.errors import ProfileError
from tasks.model_tasks import TASKS, check_config


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """The seeded tiny Llama, BERT and T5 files, from the seed modules."""
    from localhub import seed_data, seed_models

    root = tmp_path_factory.mktemp("seeded")
    out = {}
    for name, files in (("llama", seed_data.model_files()), ("bert", seed_models.bert_files()),
                        ("t5", seed_models.t5_files())):
        out[name] = root / name
        out[name].mkdir()
        for path, data in files.items():
            (out[name] / path).write_bytes(data)
    return out


def _config(seeded, name: str) -> dict:
    return json.loads((seeded[name] / "config.json").read_text())


# ------------------------------------------------------------------ task × format in the profile

@pytest.mark.parametrize("task,fmt", [
    ("seq-classification", "alpaca"), ("token-classification", "text-label"),
    ("seq2seq-lm", "chat"), ("causal-lm", "tokens-tags"), ("causal-lm", "input-target")])
def test_a_format_that_does_not_fit_the_task_is_refused_naming_the_field(task, fmt):
    with pytest.raises(ProfileError) as exc:
        load_profile("quickstart", [f"model.task={task}", f"data.format={fmt}"])
    message = str(exc.value)
    assert f"data.format: '{fmt}' rows do not fit model.task {task}" in message
    assert "Fix: set data.format to " in message
    for right in TASKS[task].formats:
        assert right in message


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_validates_with_each_format_it_takes(task):
    for fmt in TASKS[task].formats:
        profile = load_profile("quickstart", [f"model.task={task}", f"data.format={fmt}"])
        assert profile.model.task == task and profile.data.padding_side == "right"


def test_padding_side_is_a_closed_choice():
    assert load_profile("quickstart", ["data.padding_side=left"]).data.padding_side == "left"
    with pytest.raises(ProfileError) as exc:
        load_profile("quickstart", ["data.padding_side=middle"])
    assert "data.padding_side" in str(exc.value)


# ------------------------------------------------------------------ base config check

def test_a_task_the_config_cannot_do_is_refused_from_config_json(seeded):
    llama, bert, t5 = (_config(seeded, n) for n in ("llama", "bert", "t5"))
    with pytest.raises(ProfileError) as exc:
        check_config("seq2seq-lm", llama, "tinylabs/tiny-llama")
    message = str(exc.value)
    assert message.startswith("model.task: seq2seq-lm needs AutoModelForSeq2SeqLM")
    assert "tinylabs/tiny-llama (LlamaForCausalLM, model_type 'llama')" in message
    assert "Fix: set model.task to causal-lm or seq-classification or token-classification" \
        in message and "encoder-decoder" in message
    with pytest.raises(ProfileError, match="model.task: causal-lm needs AutoModelForCausalLM"):
        check_config("causal-lm", t5, "tinylabs/tiny-t5")
    with pytest.raises(ProfileError, match="model.task: seq2seq-lm"):
        check_config("seq2seq-lm", bert, "tinylabs/tiny-bert")
    for task, config in (("causal-lm", llama), ("seq-classification", llama),
                         ("token-classification", llama), ("seq-classification", bert),
                         ("token-classification", bert), ("seq2seq-lm", t5)):
        check_config(task, config)  # transformers has the Auto class: no error


def test_the_config_check_imports_neither_torch_nor_transformers(seeded):
    code = (f"import json, sys; from tasks.model_tasks import check_config; "
            f"c = json.load(open({str(seeded['llama'] / 'config.json')!r})); "
            "check_config('seq-classification', c); "
            "print(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == []


# ------------------------------------------------------------------ labels and tags

def test_label_names_are_sorted_numerically_when_integers():
    from tasks.dataset import label_names

    assert label_names(["plain", "colorful", "plain"]) == ["colorful", "plain"]
    assert label_names([10, 2, 1, 2]) == ["1", "2", "10"]


def test_word_tags_go_on_the_first_sub_word_token_only(seeded):
    from transformers import AutoTokenizer

    from tasks.dataset import encode_row

    tok = AutoTokenizer.from_pretrained(str(seeded["bert"]))
    words, tags = ["horse", "red", "24", "kite"], ["O", "COLOR", "NUM", "O"]
    row = encode_row({"tokens": words, "tags": tags}, "tokens-tags", tok, 32,
                     {"COLOR": 0, "NUM": 1, "O": 2})
    pieces = tok.convert_ids_to_tokens(row["input_ids"])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert len(pieces) > len(words) + 2  # some words split into pieces
    expected, previous = [], None
    for word in tok(words, is_split_into_words=True).word_ids():
        expected.append(-100 if word is None or word == previous
                        else {"O": 2, "COLOR": 0, "NUM": 1}[tags[word]])
        previous = word
    assert row["labels"] == expected
    assert [label for label in row["labels"] if label != -100] == [2, 0, 1, 2]


def test_tokens_and_tags_of_different_lengths_are_a_dataset_error(seeded):
    from transformers import AutoTokenizer

    from tasks.dataset import encode_row
    from tasks.errors import DatasetError

    tok = AutoTokenizer.from_pretrained(str(seeded["bert"]))
    with pytest.raises(DatasetError, match="data.format tokens-tags: a row has 2 tokens and 1"):
        encode_row({"tokens": ["a", "b"], "tags": ["O"]}, "tokens-tags", tok, 32, {"O": 0})


def test_seq2seq_labels_are_the_target_ending_with_eos(seeded):
    from transformers import AutoTokenizer

    from tasks.dataset import encode_row

    tok = AutoTokenizer.from_pretrained(str(seeded["t5"]))
    row = encode_row({"input": "reverse: cat dog", "target": "dog cat"}, "input-target",
                     tok, 32, {})
    assert row["labels"][-1] == tok.eos_token_id
    assert tok.decode(row["labels"], skip_special_tokens=True) == "dog cat"


# ------------------------------------------------------------------ padding

@pytest.fixture
def llama_without_pad(seeded, tmp_path):
    """The tiny Llama's tokenizer with its pad token removed (as many base models ship)."""
    d = tmp_path / "no-pad"
    d.mkdir()
    for f in seeded["llama"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((d / name).read_text())
        data.pop("pad_token")
        (d / name).write_text(json.dumps(data))
    return d


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_is_eos_only_without_a_pad_token_and_the_eos_label_survives(llama_without_pad,
                                                                        seeded, side):
    from transformers import AutoTokenizer

    from tasks.dataset import tokenize_example
    from tasks.model_tasks import data_collator, prepare_tokenizer

    own = prepare_tokenizer(AutoTokenizer.from_pretrained(str(seeded["llama"])))
    assert own.pad_token == "<pad>" and own.pad_token_id != own.eos_token_id  # kept

    tok = AutoTokenizer.from_pretrained(str(llama_without_pad))
    assert tok.pad_token is None
    tok = prepare_tokenizer(tok, side)
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == side
    eos = tok.eos_token_id
    short = tokenize_example("Say the first letter of the word.\n", "a", tok, 64, True)
    long = tokenize_example("Repeat the word twice.\n", "cat cat dog dog bird", tok, 64, True)
    batch = data_collator("causal-lm", tok)([short, long])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape and ids.shape[1] % 8 == 0
    for row in range(2):
        real = mask[row].bool()
        # Padding is EOS in the inputs, -100 in the labels; the real EOS stays a label.
        assert (ids[row][~real] == eos).all() and (labels[row][~real] == -100).all()
        assert labels[row][real][-1].item() == eos
        assert (labels[row] == eos).sum().item() == 1
        first_pad = (~real).nonzero()[0].item() if (~real).any() else None
        if first_pad is not None:
            assert (first_pad == 0) == (side == "left")


# ------------------------------------------------------------------ the head is not adapted

def test_classification_heads_are_excluded_from_all_linear():
    from types import SimpleNamespace

    from profiles.schema import LoraSection
    from tasks.model_tasks import adapter_for_task

    base = SimpleNamespace(classifier=object())
    assert adapter_for_task(base, LoraSection(), "token-classification"
                            ).exclude_modules == ["classifier"]
    listed = LoraSection(exclude_modules=["pooler"])
    assert adapter_for_task(base, listed, "seq-classification"
                            ).exclude_modules == ["pooler", "classifier"]
    regex = LoraSection(exclude_modules=r".*\.pooler\..*")
    assert adapter_for_task(base, regex, "token-classification"
                            ).exclude_modules == r"(?:.*\.pooler\..*)|classifier"
    named = LoraSection(target_modules=["query"])
    assert adapter_for_task(base, named, "token-classification") is named
    assert adapter_for_task(base, LoraSection(), "causal-lm").exclude_modules is None


# ------------------------------------------------------------------ memory estimate

def test_memory_estimate_counts_both_stacks_of_an_encoder_decoder(seeded):
    from tasks.memory.estimate import estimate_training_memory
    from tasks.memory.tensors import linear_modules, read_safetensors_headers, targeted

    profile = load_profile("quickstart", ["model.task=seq2seq-lm", "data.format=input-target",
                                          "model.dtype=float32"])
    tensors = read_safetensors_headers(seeded["t5"])
    linears = linear_modules(tensors)
    assert not any("relative_attention_bias" in m.name for m in linears)
    targets = targeted("all-linear", linears)
    assert {m.name.split(".")[0] for m in targets} == {"encoder", "decoder"}
    assert len(targets) == 2 * (4 + 2) + 2 * (4 + 4 + 2)  # enc: attn+ffn; dec: +cross
    est = estimate_training_memory(profile, tensors, _config(seeded, "t5"),
                                          on_gpu=False)
    assert est.layers == 4 and est.loss_bytes > 0


def test_memory_estimate_of_a_classifier_has_a_small_loss(seeded):
    from tasks.memory.estimate import LOSS_BYTES_PER_LOGIT, estimate_training_memory
    from tasks.memory.tensors import read_safetensors_headers

    tensors = read_safetensors_headers(seeded["bert"])
    config = _config(seeded, "bert")
    sizes = {}
    for task, fmt in (("seq-classification", "text-label"),
                      ("token-classification", "tokens-tags")):
        profile = load_profile("quickstart", [f"model.task={task}", f"data.format={fmt}"])
        est = estimate_training_memory(profile, tensors, config, on_gpu=False)
        assert est.layers == 2 and est.adapter_parameters > 0
        sizes[task] = est.loss_bytes
    tokens = 16 * 64  # quickstart: batch 16 × max_length 64
    assert sizes["token-classification"] == tokens * 2 * LOSS_BYTES_PER_LOGIT
    assert sizes["seq-classification"] == 16 * 2 * LOSS_BYTES_PER_LOGIT
