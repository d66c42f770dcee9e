"""The adapter's model card (README.md), rendered from the run's record.

A pure function of (record, repo_id): re-publishing the same run sends the same bytes,
which is what makes publishing idempotent. No timestamps, no placeholders.
"""
from __future__ import annotations

import json


def _table(rows: list[tuple[str, object]]) -> str:
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v) if isinstance(v, (list, dict)) else v} |" for k, v in rows]
    return "\n".join(lines)


def _section_rows(section: dict, prefix: str) -> list[tuple[str, object]]:
    return [(f"`{prefix}.{k}`", v) for k, v in section.items()]


def render_model_card(record: dict, repo_id: str) -> str:
    """README.md text: YAML metadata (via ModelCardData) + a body that reproduces the run."""
    from huggingface_hub import ModelCard, ModelCardData

    profile, base, data = record["profile"], record["base_model"], record["dataset"]
    metrics, adapter = record["metrics"], record["adapter"]
    quantized = profile["quantization"]["mode"] != "none"
    dataset_ids = [data["id"]] if data["source"] == "hub" else None
    eval_results = None
    if metrics.get("eval_loss") is not None:
        from huggingface_hub import EvalResult

        eval_results = [EvalResult(task_type="text-generation", dataset_type=data["id"],
                                   dataset_name=data["id"], metric_type="loss",
                                   metric_value=round(metrics["eval_loss"], 6),
                                   metric_name="eval loss")]
    card_data = ModelCardData(
        base_model=base["repo_id"], library_name="peft", pipeline_tag="text-generation",
        license=base.get("license") or None, datasets=dataset_ids,
        tags=["loraflow", "qlora" if quantized else "lora",
              f"base_model:adapter:{base['repo_id']}"],
        model_name=repo_id, eval_results=eval_results, base_model_relation="adapter")

    data_pin = (f"`{data['id']}` at commit `{data['commit']}` (revision `{data['revision']}`)"
                if data["source"] == "hub" else f"local file, sha256 `{data['sha256']}`")
    metric_rows = [("train loss (mean)", round(metrics["train_loss"], 4)),
                   ("first logged loss", round(metrics["first_loss"], 4)),
                   ("last logged loss", round(metrics["last_loss"], 4)),
                   ("eval loss", None if metrics.get("eval_loss") is None
                    else round(metrics["eval_loss"], 4)),
                   ("optimizer steps", metrics["steps"])]
    loss_rows = "\n".join(f"| {h['step']} | {h['loss']:.4f} |" for h in record["loss_history"])
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v)
    hw = record["hardware"]
    hardware = ", ".join(hw["gpus"]) if hw["gpus"] else f"CPU ({hw['cpu']})"
    body = f"""
# {repo_id}

A {'QLoRA' if quantized else 'LoRA'} adapter for [`{base['repo_id']}`]({base['repo_id']}),
trained and published by loraflow from the profile
below. Everything needed to reproduce the run is on this page and in `loraflow.json`.

## How to load it

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base['repo_id']}", revision="{base['commit']}")
model = PeftModel.from_pretrained(base, "{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{base['repo_id']}", revision="{base['commit']}")
```

or, with peft installed, in one line: `AutoModelForCausalLM.from_pretrained("{repo_id}")`.

## Inputs

- Base model: `{base['repo_id']}` at commit `{base['commit']}`
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

### Training loss

| step | loss |
|---|---|
{loss_rows}

## Provenance

- Hardware: {hardware}
- Libraries: {versions}
- Prefect flow run: `{record['flow_run_id']}`
- Training cache key: `{record['train_key']}`
"""
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}"))


def write_publication_files(run_dir, record: dict, repo_id: str) -> None:
    """The card (README.md) beside the run's record, rendered once when training ends."""
    from pathlib import Path

    (Path(run_dir) / "README.md").write_text(render_model_card(record, repo_id))
