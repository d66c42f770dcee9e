"""The files that travel with an adapter: model card (README.md), lineage manifest
(loraflow.json) and loss curve (loss_curve.png).

All three are pure functions of the run's record and the publish section given when it
is published (the repo id for the card's loading snippet, the license): rendered at
publish time, never stored with the training, whose outputs depend on its cache key
alone. A re-publish renders the same bytes, which is what makes publishing idempotent.
No timestamps, no placeholders.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tasks.data.prompt_formats import example_prompts, prompt_guide
from tasks.model_tasks import head_kwargs, task_type
from tasks.publication.plot import loss_curve_png

CARD, LINEAGE, LOSS_CURVE = "README.md", "loraflow.json", "loss_curve.png"
# What the lineage manifest keeps from the run record: enough to reproduce the run.
LINEAGE_KEYS = ("profile", "base_model", "dataset", "adapter", "metrics", "flow_run_id",
                "flow_run_url", "train_key", "versions", "hardware", "continued_from",
                "memory_plan", "distributed", "speed")

METHOD_NAMES = {"lora": "LoRA", "ia3": "IA3", "loha": "LoHa", "lokr": "LoKr"}


def _speed_line(record: dict) -> str:
    """The speed levers as the run resolved them (record "speed"), as one card line; FP8
    first, because it changes the base's matmul precision."""
    speed = record.get("speed") or {}
    parts = []
    if speed.get("fp8_layers"):
        backward = ("input gradient in 16 bits" if speed.get("fp8_backward") == "dequantized"
                    else "input gradient in FP8")
        parts.append(f"FP8 base matmuls in {speed['fp8_layers']} layers (e4m3; {backward})")
    if speed.get("liger_kernels"):
        parts.append("Liger " + ", ".join(speed["liger_kernels"]))
    if speed.get("torch_compile"):
        parts.append("decoder layers compiled")
    if speed.get("offloaded_layers"):
        count = speed["offloaded_layers"]
        parts.append(f"the inputs of {count} checkpointed layer{'s' if count != 1 else ''} "
                     "kept in CPU memory")
    return f"- Speed levers (as run): {'; '.join(parts)}\n" if parts else ""


def _kind(method: str, quantized: bool) -> str:
    """What the card calls the adapter: QLoRA for LoRA on a 4/8-bit base."""
    name = METHOD_NAMES.get(method, method)
    if quantized:
        return "QLoRA" if method == "lora" else f"{name} (on a quantized base)"
    return name


def adapter_kind(record: dict) -> str:
    """The run's adapter as the card names it (LoRA, QLoRA, IA3, …)."""
    profile = record["profile"]
    return _kind(profile["lora"].get("method", "lora"), profile["quantization"]["mode"] != "none")


def base_loader(record: dict) -> tuple[str, str]:
    """The transformers Auto class that loads the run's base, and the extra
    from_pretrained arguments as Python source (a classification head is sized by the
    label names the data had, index = class id)."""
    task = record["profile"]["model"].get("task", "causal-lm")
    head = head_kwargs(task, record["dataset"].get("labels"))
    return task_type(task).auto_class, "".join(f", {k}={v!r}" for k, v in head.items())


def _table(rows: list[tuple[str, object]]) -> str:
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v) if isinstance(v, (list, dict)) else v} |" for k, v in rows]
    return "\n".join(lines)


def _section_rows(section: dict, prefix: str) -> list[tuple[str, object]]:
    return [(f"`{prefix}.{k}`", v) for k, v in section.items()]


def _quantization_rows(section: dict) -> list[tuple[str, object]]:
    """The quantization settings, or only `mode none` when the base was not quantized
    (the other fields then changed nothing)."""
    if section.get("mode") == "none":
        return [("`quantization.mode`", "none")]
    return _section_rows(section, "quantization")


def _fmt(value, digits: int = 4):
    return "n/a" if value is None else round(value, digits)


def dataset_name(data: dict) -> str:
    """The dataset as a card names it: a Hub id, or a local file's name (never its path
    on the training machine)."""
    return data["id"] if data["source"] == "hub" else Path(data["id"]).name


def public_data_section(profile_data: dict, data: dict) -> dict:
    """The profile's data section as published: local files (the dataset, a Jinja
    `data.chat_template`) by their names, never their paths on the training machine,
    which often hold a user's name. Their content is pinned by sha256 elsewhere (the
    dataset's in the record, the template's in the tokenizer published with the adapter)."""
    public = {**profile_data, "dataset": dataset_name(data)}
    template = public.get("chat_template")
    if template and ("/" in template or "\\" in template):
        public["chat_template"] = Path(template).name
    return public


def card_metadata(record: dict, repo_id: str, relation: str = "adapter",
                  license: Optional[str] = None):
    """ModelCardData: base model and relation, library, task, tags, data, license, results.

    Args:
        record: the training's record.json.
        repo_id: the repo the card is published in.
        relation: "adapter", or "merge" for merged weights.
        license: publish.license; None: the base model's.
    Returns:
        huggingface_hub.ModelCardData.
    """
    from huggingface_hub import EvalResult, ModelCardData

    profile, base, data, metrics = (record["profile"], record["base_model"], record["dataset"],
                                    record["metrics"])
    quantized = profile["quantization"]["mode"] != "none"
    pipeline_tag = task_type(profile["model"].get("task", "causal-lm")).pipeline_tag
    license = license or (profile.get("publish") or {}).get("license")  # an older record
    eval_results = None
    if metrics.get("eval_loss") is not None:
        name = dataset_name(data)
        eval_results = [EvalResult(task_type=pipeline_tag, dataset_type=name,
                                   dataset_name=name, metric_type="loss",
                                   metric_value=round(metrics["eval_loss"], 6),
                                   metric_name="eval loss")]
    return ModelCardData(
        base_model=base["repo_id"], base_model_relation=relation,
        library_name="peft" if relation == "adapter" else "transformers",
        pipeline_tag=pipeline_tag,
        license=license or base.get("license"),
        datasets=[data["id"]] if data["source"] == "hub" else None,
        tags=["loraflow", "qlora" if quantized else "lora",
              f"base_model:{relation}:{base['repo_id']}"],
        model_name=repo_id, eval_results=eval_results)


def _continued(record: dict) -> str:
    """The Inputs line of a run that continued an adapter (model.id was an adapter repo)."""
    src = record.get("continued_from")
    if not src:
        return ""
    return (f"\n- Continued from adapter `{src['repo_id']}` at commit `{src['commit']}`: "
            "training started from its weights, not a fresh adapter")


GENERATES = ("causal-lm", "seq2seq-lm")


def _revision(tag: Optional[str]) -> str:
    """The `, revision="…"` argument that pins a load to the published version, or ''."""
    return f', revision="{tag}"' if tag else ""


def loading_snippet(record: dict, repo_id: str, tag: Optional[str] = None) -> str:
    """Python that loads the published adapter with plain clients and runs a batch of
    two texts of different lengths through it. The tokenizer comes from the adapter repo:
    it carries the pad token training chose (EOS where the base has none) and the chat
    template the data used; the base's config learns that pad id, which a classifier
    needs to find each row's last token and generate needs to pad.

    Args:
        record: the training's record.json.
        repo_id: the repo the adapter is published in.
        tag: the version tag of this publication: the adapter and its tokenizer are
            loaded at it (the base at its pinned commit). None: the repo's default branch.
    Returns:
        Python source.
    """
    base = record["base_model"]
    task = record["profile"]["model"].get("task", "causal-lm")
    auto, head_args = base_loader(record)
    lines = [
        "from peft import PeftModel",
        f"from transformers import {auto}, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{_revision(tag)})',
        f'base = {auto}.from_pretrained("{base["repo_id"]}", revision="{base["commit"]}"'
        f"{head_args})",
        "base.config.pad_token_id = tokenizer.pad_token_id",
        f'model = PeftModel.from_pretrained(base, "{repo_id}"{_revision(tag)})',
        "",
    ]
    if task == "causal-lm":
        # Prompts in the layout training saw; the layout already holds any special tokens.
        lines.append('tokenizer.padding_side = "left"  # generate continues each row at its end')
        lines.append(f"prompts = {example_prompts(record['profile']['data'])}")
        lines.append('batch = tokenizer(prompts, padding=True, return_tensors="pt", '
                     f'add_special_tokens={record["profile"]["data"].get("format") != "chat"})')
    else:
        lines.append('batch = tokenizer(["a first example", "a second example, a little '
                     'longer"], padding=True, return_tensors="pt")')
    if task in GENERATES:
        lines.append("output = model.generate(**batch, max_new_tokens=8, "
                     "pad_token_id=tokenizer.pad_token_id)")
        lines.append("print(tokenizer.batch_decode(output, skip_special_tokens=True))")
    else:
        lines.append("logits = model(**batch).logits")
        lines.append("print(logits.argmax(-1))")
    return "\n".join(lines)


def _prompt_section(record: dict) -> str:
    """The card's "How to prompt it" section (causal-lm adapters), or nothing."""
    if record["profile"]["model"].get("task", "causal-lm") != "causal-lm":
        return ""
    guide = prompt_guide(record["profile"]["data"])
    return f"## How to prompt it\n\n{guide}\n" if guide else ""


def one_call_loading(record: dict, repo_id: str, tag: Optional[str] = None) -> str:
    """Markdown: the one-call ways to load the adapter, and which of them keep a version
    tag. What each does with `revision` was checked with the real clients (transformers
    5.23, peft 0.21) against a Hub-compatible server: transformers' adapter
    auto-detection (`from_pretrained(adapter_repo)`, and `pipeline`, which uses it) passes
    `revision` to the *base* too, where the adapter's tag does not exist ("… is not a
    valid git identifier"); its `adapter_kwargs={"revision": …}` reaches the adapter
    only. peft's AutoPeftModel classes load the adapter at `revision` and the base at
    the commit adapter_config.json names.

    Args:
        record: the training's record.json.
        repo_id: the repo the adapter is published in.
        tag: this publication's tag; None: the lines load the default branch.
    Returns:
        The card's "One call" section body.
    """
    task = record["profile"]["model"].get("task", "causal-lm")
    auto, head_args = base_loader(record)
    base = record["base_model"]
    at = f"at `{tag}`" if tag else "at the default branch"
    adapter_kwargs = f', adapter_kwargs={{"revision": "{tag}"}}' if tag else ""
    lines = []
    if task in GENERATES:
        peft_auto = auto.replace("AutoModel", "AutoPeftModel")
        lines.append(f'- `{peft_auto}.from_pretrained("{repo_id}"{_revision(tag)})` (peft): '
                     f"the adapter {at}, the base at the commit its adapter_config.json "
                     f"names (`{base['commit']}`).")
    lines.append(f'- `{auto}.from_pretrained("{repo_id}"{adapter_kwargs}{head_args})` '
                 f"(transformers' adapter auto-detection): the adapter {at}, the base "
                 "at its default branch.")
    if task != "seq2seq-lm":  # transformers 5 has no text2text pipeline
        tokenizer = (f'AutoTokenizer.from_pretrained("{repo_id}"{_revision(tag)})' if tag
                     else f'"{repo_id}"')
        kwargs = (f', model_kwargs={{"adapter_kwargs": {{"revision": "{tag}"}}}}' if tag
                  else "")
        lines.append(f'- `pipeline("{task_type(task).pipeline_tag}", model="{repo_id}", '
                     f"tokenizer={tokenizer}{kwargs})`: the same. Pass this repo's "
                     "tokenizer: given only the adapter repo, `pipeline` loads the *base's*, "
                     "without training's pad token and chat template.")
    if tag:
        lines.append(f'\nNot `revision="{tag}"` on `{auto}.from_pretrained` or `pipeline`: '
                     "transformers passes it to the base model too, which has no such tag, "
                     "and the load fails.")
    return "\n".join(lines)


def data_counts(data: dict) -> list[str]:
    """The dataset step's counts as phrases — rows read, dropped and why, truncated —
    from a record's "dataset" entry (what it does not say is left out)."""
    parts = []
    if data.get("rows_read") is not None:
        parts.append(f"{data['rows_read']} rows read")
    dropped = data.get("dropped") or {}
    if dropped:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items()))
        parts.append(f"{sum(dropped.values())} dropped ({why})")
    elif data.get("rows_read") is not None:
        parts.append("none dropped")
    if data.get("truncated") is not None:
        parts.append(f"{data['truncated']} truncated to data.max_length")
    return parts


def _tokenizer_line(record: dict) -> str:
    tok = record.get("tokenizer")
    if not tok:
        return ""
    template = (f", chat template sha256 `{tok['chat_template_sha256'][:16]}`"
                if tok.get("chat_template_sha256") else "")
    return (f"\n- Tokenizer: saved with the adapter; pad token `{tok['pad_token']}` "
            f"(id {tok['pad_token_id']}){template}")


def _notes(record: dict) -> str:
    notes = (record.get("adapter") or {}).get("notes")
    return ("\n## Notes on this adapter\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
            ) if notes else ""


def samples_markdown(samples: Optional[dict], limit: int = 400) -> str:
    """The samples step's result (SamplesResult as JSON) as markdown: per held-out prompt,
    the prompt, then the reference (the rest of the row), the base's and the adapter's
    continuations one under the other — or the reason there are none. Lists, not a
    table: the Prefect UI does not wrap table cells, and a long prompt or continuation
    pushes the adapter's column out of view. Texts are kept on one line and cut at
    `limit` characters.

    Args:
        samples: SamplesResult.model_dump(); None: no samples were taken.
        limit: characters kept per text.
    Returns:
        Markdown.
    """
    if not samples or samples.get("skipped") or not samples.get("samples"):
        return f"No samples: {(samples or {}).get('skipped') or 'none were generated'}.\n"

    def text(value: str) -> str:
        value = " ".join(value.split()) or "(empty)"
        value = value if len(value) <= limit else value[:limit] + "…"
        return value.replace("`", "'").replace("<", "&lt;").replace(">", "&gt;")

    lines = [f"Greedy decoding, at most {samples['max_new_tokens']} new tokens, on "
             f"{samples['source']}; *base* is the base model alone, *adapter* the base with "
             "this adapter, *reference* the rest of the held-out row."]
    for i, s in enumerate(samples["samples"], 1):
        lines += ["", f"**Prompt {i}:** {text(s['prompt'])}", "",
                  f"- reference: {text(s['reference'])}",
                  f"- base: {text(s['base'])}",
                  f"- adapter: {text(s['adapter'])}"]
    return "\n".join(lines) + "\n"


def _samples_section(samples: Optional[dict]) -> str:
    """The card's "Samples" section, or nothing when no samples were passed."""
    if not samples or not samples.get("samples"):
        return ""
    return f"## Samples\n\n{samples_markdown(samples)}\n"


def render_model_card(record: dict, repo_id: str, publish: Optional[dict] = None,
                      samples: Optional[dict] = None) -> str:
    """README.md text: YAML metadata (via ModelCardData) + a body that reproduces the run.

    Args:
        record: the training's record.json.
        repo_id: the repo the card is published in.
        publish: the publish section given at publish time: its license, and its tag —
            the version this publication creates, which the loading snippets pin (None:
            they load the default branch).
        samples: the samples step's result as JSON (a "Samples" section); None: none.
    Returns:
        The card's text.
    """
    from huggingface_hub import ModelCard

    profile, base, data = record["profile"], record["base_model"], record["dataset"]
    metrics, adapter = record["metrics"], record["adapter"]
    tag = (publish or {}).get("tag")
    version_line = (f"This is version `{tag}` (a tag of this repo); the snippets load it "
                    "whatever the repo holds later.\n\n" if tag else "")
    data_section = public_data_section(profile["data"], data)
    counts = ("; " + ", ".join(data_counts(data))) if data_counts(data) else ""
    data_pin = (f"`{data['id']}` at commit `{data['commit']}` (revision `{data['revision']}`)"
                if data["source"] == "hub" else f"local file `{dataset_name(data)}`, "
                f"sha256 `{data['sha256']}`")
    metric_rows = [("train loss (mean)", _fmt(metrics["train_loss"])),
                   ("first logged loss", _fmt(metrics["first_loss"])),
                   ("last logged loss", _fmt(metrics["last_loss"])),
                   ("eval loss", _fmt(metrics.get("eval_loss"))),
                   ("optimizer steps", metrics["steps"])]
    loss_rows = "\n".join(f"| {h['step']} | {h['loss']:.4f} |" for h in record["loss_history"])
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v)
    hw = record["hardware"]
    hardware = ", ".join(hw["gpus"]) if hw["gpus"] else f"CPU ({hw['cpu']})"
    spread = record.get("distributed")
    if spread:  # over several processes: which engine ran, and why the plan chose it
        hardware += (f"; {spread['world_size']} processes, {spread['strategy'].upper()}"
                     + (f" ({spread['why']})" if spread.get("why") else ""))
    run_link = (f"[{record['flow_run_id']}]({record['flow_run_url']})"
                if record.get("flow_run_url") else f"`{record['flow_run_id']}`")
    body = f"""
# {repo_id}

A {adapter_kind(record)} adapter for `{base['repo_id']}`, trained and
published by loraflow. Everything needed to reproduce the run is on this page and in
`{LINEAGE}`.

## How to load it

```python
{loading_snippet(record, repo_id, tag)}
```

{version_line}In one call, with peft installed:

{one_call_loading(record, repo_id, tag)}

{_prompt_section(record)}## Inputs

- Base model: `{base['repo_id']}` at commit `{base['commit']}`{_continued(record)}
- Dataset: {data_pin}, format `{profile['data']['format']}`,
  {data['num_train']} training and {data['num_eval']} evaluation examples{counts}
- Adapter weights sha256: `{adapter['sha256']}`
  ({adapter['trainable_params']:,} trainable of {adapter['total_params']:,} parameters){_tokenizer_line(record)}
{_notes(record)}
## LoRA and quantization

{_table(_section_rows(profile['lora'], 'lora') + _quantization_rows(profile['quantization']))}

## Model loading

{_table(_section_rows(profile['model'], 'model'))}

## Training hyperparameters

{_table(_section_rows(profile['training'], 'training') + _section_rows(data_section, 'data'))}

## Results

{_table(metric_rows)}

![Training loss by step]({LOSS_CURVE})

| step | loss |
|---|---|
{loss_rows}

{_samples_section(samples)}## Provenance

- Hardware: {hardware}
{_speed_line(record)}- Libraries: {versions}
- Prefect flow run of the training: {run_link}
- Training cache key: `{record['train_key']}`
"""
    license = (publish or {}).get("license")
    return str(ModelCard(f"---\n{card_metadata(record, repo_id, license=license).to_yaml()}"
                         f"\n---\n{body}"))


def lineage_manifest(record: dict, publish: Optional[dict] = None,
                     approval: Optional[dict] = None) -> dict:
    """loraflow.json: the profile (no secrets) with the publish section it was published
    with, input hashes, adapter sha256, run ids, and — for a publication someone
    approved on the run's page — the approval (who, when, note)."""
    lineage = {"loraflow_lineage": 1, **{k: record.get(k) for k in LINEAGE_KEYS}}
    data = record["dataset"]
    lineage["profile"] = {**record["profile"],
                          "data": public_data_section(record["profile"]["data"], data)}
    if data["source"] != "hub":
        lineage["dataset"] = {**data, "id": dataset_name(data)}
    if publish is not None:
        lineage["profile"]["publish"] = publish
    if approval is not None:
        lineage["approval"] = approval
    return lineage


def publication_files(record: dict, publish: dict, samples: Optional[dict] = None,
                      approval: Optional[dict] = None) -> dict[str, bytes]:
    """Card, lineage and loss curve as bytes, keyed by their path in the repo.

    Args:
        record: the training's record.json.
        publish: the publish section given at publish time, as JSON (repo_id, license…).
        samples: the samples step's result as JSON, for the card's "Samples" section.
        approval: who approved the publication, when, and their note (into the lineage).
    Returns:
        {README.md, loraflow.json, loss_curve.png: bytes}, the same bytes for the same
        arguments.
    """
    points = [(h["step"], h["loss"]) for h in record["loss_history"]]
    return {CARD: render_model_card(record, publish["repo_id"], publish, samples).encode(),
            LINEAGE: (json.dumps(lineage_manifest(record, publish, approval), indent=1,
                                 sort_keys=True)
                      + "\n").encode(),
            LOSS_CURVE: loss_curve_png(points)}
