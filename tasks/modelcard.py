"""The files that travel with an adapter: model card (README.md), lineage manifest
(loraflow.json) and loss curve (loss_curve.png).

All three are pure functions of the run's record (and the target repo id, for the
card's loading snippet), written into the run directory when training ends: a
re-publish sends the same bytes, which is what makes publishing idempotent. No
timestamps, no placeholders.
"""
from __future__ import annotations

import json
from pathlib import Path

from tasks.plot import loss_curve_png
from tasks.task_types import head_kwargs, task_type

CARD, LINEAGE, LOSS_CURVE = "README.md", "loraflow.json", "loss_curve.png"
# What the lineage manifest keeps from the run record: enough to reproduce the run.
LINEAGE_KEYS = ("profile", "base_model", "dataset", "adapter", "metrics", "flow_run_id",
                "flow_run_url", "train_key", "versions", "hardware", "continued_from",
                "memory_plan", "distributed", "speed")

METHOD_NAMES = {"lora": "LoRA", "ia3": "IA3", "loha": "LoHa", "lokr": "LoKr"}


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


def _fmt(value, digits: int = 4):
    return "n/a" if value is None else round(value, digits)


def card_metadata(record: dict, repo_id: str, relation: str = "adapter"):
    """ModelCardData: base model and relation, library, task, tags, data, license, results."""
    from huggingface_hub import EvalResult, ModelCardData

    profile, base, data, metrics = (record["profile"], record["base_model"], record["dataset"],
                                    record["metrics"])
    quantized = profile["quantization"]["mode"] != "none"
    pipeline_tag = task_type(profile["model"].get("task", "causal-lm")).pipeline_tag
    eval_results = None
    if metrics.get("eval_loss") is not None:
        eval_results = [EvalResult(task_type=pipeline_tag, dataset_type=data["id"],
                                   dataset_name=data["id"], metric_type="loss",
                                   metric_value=round(metrics["eval_loss"], 6),
                                   metric_name="eval loss")]
    return ModelCardData(
        base_model=base["repo_id"], base_model_relation=relation,
        library_name="peft" if relation == "adapter" else "transformers",
        pipeline_tag=pipeline_tag,
        license=profile["publish"].get("license") or base.get("license"),
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


def render_model_card(record: dict, repo_id: str) -> str:
    """README.md text: YAML metadata (via ModelCardData) + a body that reproduces the run."""
    from huggingface_hub import ModelCard

    profile, base, data = record["profile"], record["base_model"], record["dataset"]
    metrics, adapter = record["metrics"], record["adapter"]
    auto, head_args = base_loader(record)
    data_pin = (f"`{data['id']}` at commit `{data['commit']}` (revision `{data['revision']}`)"
                if data["source"] == "hub" else f"local file `{Path(data['id']).name}`, "
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
    run_link = (f"[{record['flow_run_id']}]({record['flow_run_url']})"
                if record.get("flow_run_url") else f"`{record['flow_run_id']}`")
    body = f"""
# {repo_id}

A {adapter_kind(record)} adapter for `{base['repo_id']}`, trained and
published by loraflow. Everything needed to reproduce the run is on this page and in
`{LINEAGE}`.

## How to load it

```python
from peft import PeftModel
from transformers import {auto}, AutoTokenizer

base = {auto}.from_pretrained("{base['repo_id']}", revision="{base['commit']}"{head_args})
model = PeftModel.from_pretrained(base, "{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{base['repo_id']}", revision="{base['commit']}")
```

With peft installed, `{auto}.from_pretrained("{repo_id}"{head_args})` loads the base
and the adapter in one call.

## Inputs

- Base model: `{base['repo_id']}` at commit `{base['commit']}`{_continued(record)}
- Dataset: {data_pin}, format `{profile['data']['format']}`,
  {data['num_train']} training and {data['num_eval']} evaluation examples
- Adapter weights sha256: `{adapter['sha256']}`
  ({adapter['trainable_params']:,} trainable of {adapter['total_params']:,} parameters)

## LoRA and quantization

{_table(_section_rows(profile['lora'], 'lora') + _section_rows(profile['quantization'], 'quantization'))}

## Model loading

{_table(_section_rows(profile['model'], 'model'))}

## Training hyperparameters

{_table(_section_rows(profile['training'], 'training') + _section_rows(profile['data'], 'data'))}

## Results

{_table(metric_rows)}

![Training loss by step]({LOSS_CURVE})

| step | loss |
|---|---|
{loss_rows}

## Provenance

- Hardware: {hardware}
- Libraries: {versions}
- Prefect flow run of the training: {run_link}
- Training cache key: `{record['train_key']}`
"""
    return str(ModelCard(f"---\n{card_metadata(record, repo_id).to_yaml()}\n---\n{body}"))


def lineage_manifest(record: dict) -> dict:
    """loraflow.json: the profile (no secrets), input hashes, adapter sha256, run ids."""
    return {"loraflow_lineage": 1, **{k: record.get(k) for k in LINEAGE_KEYS}}


def publication_files(record: dict, repo_id: str) -> dict[str, bytes]:
    """Card, lineage and loss curve as bytes, keyed by their path in the repo."""
    points = [(h["step"], h["loss"]) for h in record["loss_history"]]
    return {CARD: render_model_card(record, repo_id).encode(),
            LINEAGE: (json.dumps(lineage_manifest(record), indent=1, sort_keys=True)
                      + "\n").encode(),
            LOSS_CURVE: loss_curve_png(points)}


def write_publication_files(run_dir, record: dict, repo_id: str) -> None:
    """Written once when training ends, so a later (re-)publish sends these bytes."""
    for name, data in publication_files(record, repo_id).items():
        (Path(run_dir) / name).write_bytes(data)
