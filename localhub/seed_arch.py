"""Tiny random-init models with the real module layouts of the common architectures, for
the architecture matrix (tests/integration/test_architecture_matrix.py) and demos.

Each model is built by transformers itself (`AutoConfig.for_model(...)` →
`AutoModelFor….from_config` → `save_pretrained(safe_serialization=True)`), so its module
names, Conv1D layers, fused projections and tied embeddings are exactly what the library
produces for the real checkpoints; only the sizes are tiny (hidden 32-64, 2 layers,
vocabulary ≤ 512). Tokenizers are trained offline with the `tokenizers` library on the
seeded datasets' text, in the style of each family (byte-level BPE for GPT-2 / NeoX /
Falcon / RoBERTa / BART, the styles of localhub/seed_tokenizers.py for Llama-2 / Mistral /
Phi-3 / Llama-3 / Qwen / Gemma,
the WordPiece and T5 tokenizers of localhub/seed_models.py for BERT and T5).

Unlike seed.py these are not byte-for-byte deterministic across library releases (torch's
initialisation and transformers' serialisation may move): they are seeded into a test's
localhub through the real HfApi (`seed_into_hub`), never into the fixed seed.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ORG = "tinylabs"
VOCAB_SIZE = 512

# Shared tiny sizes: small enough that a case trains in seconds on 2 CPU cores.
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=256)


@dataclass(frozen=True)
class Arch:
    """One tiny model of the matrix.

    Attributes:
        name: the repo name under `tinylabs/` (e.g. "arch-gpt2").
        model_type: transformers' model_type (AutoConfig.for_model key).
        build_class: the Auto class the weights are saved from (the layout of the
            checkpoints people publish: a causal LM, a masked LM, a seq2seq LM).
        tokenizer: tokenizer style (see `build_tokenizer`).
        config: config fields beyond the defaults (sizes, tie_word_embeddings, …).
    """
    name: str
    model_type: str
    build_class: str
    tokenizer: str
    config: dict = field(default_factory=dict)

    @property
    def repo_id(self) -> str:
        return f"{ORG}/{self.name}"


ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("arch-llama", "llama", "AutoModelForCausalLM", "llama2",
         dict(_DECODER, tie_word_embeddings=False)),
    # Llama-3.2-1B's layout: tied embeddings, the Llama-3 chat template.
    Arch("arch-llama-tied", "llama", "AutoModelForCausalLM", "llama3",
         dict(_DECODER, tie_word_embeddings=True)),
    Arch("arch-qwen2", "qwen2", "AutoModelForCausalLM", "chatml",
         dict(_DECODER, tie_word_embeddings=True)),
    Arch("arch-qwen3", "qwen3", "AutoModelForCausalLM", "chatml",
         dict(_DECODER, tie_word_embeddings=True)),
    Arch("arch-gemma", "gemma", "AutoModelForCausalLM", "gemma",
         dict(_DECODER, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")),
    Arch("arch-mistral", "mistral", "AutoModelForCausalLM", "llama2",
         dict(_DECODER, tie_word_embeddings=False, sliding_window=None)),
    # Fused qkv_proj / gate_up_proj.
    Arch("arch-phi3", "phi3", "AutoModelForCausalLM", "llama2",
         dict(_DECODER, tie_word_embeddings=False, pad_token_id=0,
              original_max_position_embeddings=256)),
    # Conv1D c_attn / c_fc / c_proj, tied lm_head.
    Arch("arch-gpt2", "gpt2", "AutoModelForCausalLM", "gpt2",
         dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    Arch("arch-gpt-neox", "gpt_neox", "AutoModelForCausalLM", "gpt2",
         dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.25)),
    Arch("arch-falcon", "falcon", "AutoModelForCausalLM", "gpt2",
         dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              new_decoder_architecture=False, multi_query=True, parallel_attn=True,
              bias=False, alibi=False, max_position_embeddings=256)),
    # bert-base-uncased's layout: BertForPreTraining (with the pooler a sequence
    # classifier reads; a checkpoint without it gets a random pooler on every load).
    Arch("arch-bert", "bert", "AutoModelForPreTraining", "bert",
         dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128)),
    # distilbert-base-uncased's layout: a masked LM; its sequence classifier adds a
    # pre_classifier the checkpoint does not have.
    Arch("arch-distilbert", "distilbert", "AutoModelForMaskedLM", "bert",
         dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=128)),
    Arch("arch-roberta", "roberta", "AutoModelForMaskedLM", "roberta",
         dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=130, pad_token_id=1,
              bos_token_id=0, eos_token_id=2)),
    Arch("arch-t5", "t5", "AutoModelForSeq2SeqLM", "t5",
         dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2,
              num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
              pad_token_id=0, eos_token_id=1)),
    Arch("arch-bart", "bart", "AutoModelForSeq2SeqLM", "roberta",
         dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
              decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
              max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=2,
              decoder_start_token_id=2, forced_eos_token_id=2)),
]}


# ------------------------------------------------------------------ tokenizers

def corpus() -> list[str]:
    """The seeded datasets' text (tiny-instruct's alpaca prompts, tiny-tasks' rows)."""
    from localhub import seed_data, seed_models

    texts = []
    for r in seed_data.instruct_rows():
        texts.append(f"{r['instruction']} {r['input']} {r['output']}")
    texts.append("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request. ### Instruction: ### Input: "
                 "### Response:")
    texts += [r["text"] for r in seed_models.classification_rows()]
    texts += [" ".join(r["tokens"]) for r in seed_models.tagging_rows()]
    texts += [r["input"] + " " + r["target"] for r in seed_models.seq2seq_rows()]
    return texts


def _byte_level_bpe(specials: list[str], texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def _template_processing(tok, single: str, pair: str, specials: list[str]):
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(s, tok.token_to_id(s)) for s in specials])


def build_tokenizer(style: str, texts: Optional[list[str]] = None,
                    vocab_size: int = VOCAB_SIZE):
    """A real-style fast tokenizer trained on `texts` (default: `corpus()`).

    Styles: gpt2 (byte-level BPE, `<|endoftext|>` as BOS/EOS, no pad token, nothing
    added), roberta (byte-level, `<s> … </s>`, pad `<pad>`), bert and t5
    (localhub/seed_models.py's tokenizers), and llama2 / llama3 / chatml / gemma
    (localhub/seed_tokenizers.py, with their chat templates).

    Returns:
        A PreTrainedTokenizerFast.
    """
    from transformers import PreTrainedTokenizerFast

    texts = corpus() if texts is None else texts
    if style in ("llama3", "chatml", "gemma", "llama2"):
        from localhub import seed_tokenizers

        return seed_tokenizers.build_tokenizer(style, texts, vocab_size=vocab_size)
    if style in ("bert", "t5"):
        from localhub import seed_models

        files = seed_models.bert_files() if style == "bert" else seed_models.t5_files()
        with tempfile.TemporaryDirectory() as d:
            for name, data in files.items():
                if name.startswith(("tokenizer", "special_tokens", "spiece")):
                    (Path(d) / name).write_bytes(data)
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(d)
    if style == "gpt2":
        tok = _byte_level_bpe(["<|endoftext|>"], texts, vocab_size)
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                       eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                       model_max_length=256)
    if style == "roberta":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = _byte_level_bpe(specials, texts, vocab_size)
        _template_processing(tok, "<s> $A </s>", "<s> $A </s> </s> $B </s>", ["<s>", "</s>"])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>", unk_token="<unk>", cls_token="<s>",
                                       sep_token="</s>", mask_token="<mask>",
                                       model_max_length=128)
    raise ValueError(f"unknown tokenizer style {style!r}")


# ------------------------------------------------------------------ models

def _special_ids(arch: Arch, tokenizer) -> dict:
    """Config token ids that agree with the tokenizer (a model's generate and padding
    read them from the config)."""
    if arch.model_type in ("t5", "bart"):
        return {}
    out = {}
    for field_name, token in (("bos_token_id", tokenizer.bos_token),
                              ("eos_token_id", tokenizer.eos_token),
                              ("pad_token_id", tokenizer.pad_token)):
        if token is not None:
            out[field_name] = tokenizer.convert_tokens_to_ids(token)
    if "pad_token_id" not in out and "pad_token_id" in arch.config:
        out["pad_token_id"] = arch.config["pad_token_id"]
    return out


def build(arch: Arch, directory, seed: int = 0) -> Path:
    """Write the tiny model's files (config.json, model.safetensors, tokenizer files,
    generation_config.json where transformers writes one) into `directory`.

    Args:
        arch: one of ARCHS.
        directory: created if missing.
        seed: torch's seed for the random initialisation.
    Returns:
        The directory.
    """
    import torch
    import transformers
    from transformers import AutoConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(arch.tokenizer)
    fields = dict(arch.config, vocab_size=len(tokenizer))
    fields.update(_special_ids(arch, tokenizer))
    if arch.model_type in ("bert", "roberta") and len(tokenizer) > 512:
        raise ValueError("vocabulary too large")
    config = AutoConfig.for_model(arch.model_type, **fields)
    torch.manual_seed(seed)
    model = getattr(transformers, arch.build_class).from_config(config, dtype=torch.float32)
    # A tied head initialised like an embedding (std 0.02) barely moves the logits of a
    # 64-wide model; wider weights let a few steps of LoRA show a falling loss.
    with torch.no_grad():
        emb = model.get_input_embeddings()
        emb.weight.normal_(0.0, 1.0 / fields.get("hidden_size", fields.get(
            "n_embd", fields.get("d_model", fields.get("dim", 64)))) ** 0.5)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def seed_into_hub(api, names: Optional[list[str]] = None, workdir=None) -> dict[str, str]:
    """Build the tiny models and push each to `tinylabs/<name>` with the real HfApi
    (create_repo + upload_folder), as a member of `tinylabs` (the token of `api`).

    Args:
        api: an HfApi whose token can write to `tinylabs`.
        names: which of ARCHS (default: all).
        workdir: where the files are built (default: a temporary directory).
    Returns:
        repo_id → commit sha of the upload.
    """
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        for name in names or list(ARCHS):
            arch = ARCHS[name]
            d = build(arch, root / name)
            api.create_repo(arch.repo_id, private=False, exist_ok=True)
            info = api.upload_folder(repo_id=arch.repo_id, folder_path=str(d),
                                     commit_message=f"Add tiny {arch.model_type} ({name})")
            out[arch.repo_id] = info.oid
    return out
