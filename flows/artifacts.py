"""Prefect artifacts of a run, under stable keys so their history shows in the UI:
a markdown report, a metrics table, a link to the Hub commit, the loss curve.

The loss curve is markdown (a text chart and the data as a table), not an image of the
published loss_curve.png: the repo is private by default, and the UI's browser cannot
load a private Hub file (a broken image).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from tasks.publication.plot import loss_chart


def artifact_key(repo_id: str, kind: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{repo_id}-{kind}".lower()).strip("-")


def report_markdown(report: dict) -> str:
    hub, adapter, m = report["hub"], report["adapter"], report["metrics"]
    steps = "\n".join(f"| {name} | {s['state']} | {s['seconds']:.1f} |"
                      for name, s in report["steps"].items())
    return f"""# loraflow run: {report['profile']}

Base model `{report['base_model']['repo_id']}` @ `{report['base_model']['commit']}` →
adapter `{adapter['sha256'][:16]}` ({adapter['trainable_params']:,} trainable parameters),
published to [{hub['repo_id']}]({hub['url']}) at commit `{hub['commit']}`, tag `{hub['tag']}`.

Loss {m['first_loss']:.4f} → {m['last_loss']:.4f}; eval loss {_rounded(m.get('eval_loss'))}.

| step | state | seconds |
|---|---|---|
{steps}
"""


def _rounded(value, digits: int = 4):
    """A figure as people read it: floats to `digits` decimals; other values as they are."""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "n/a" if value is None else value


def loss_curve_markdown(record: dict) -> str:
    """The training's loss curve as markdown: a text chart of the logged training loss
    and the data, then the final eval loss.

    Args:
        record: the training's record.json (loss_history, metrics).
    Returns:
        The markdown.
    """
    losses = [(h["step"], h["loss"]) for h in record.get("loss_history") or []]
    out = ["# Training loss", "", "```text", loss_chart(losses) or "(no loss logged)", "```",
           "", "| step | loss |", "|---:|---:|"]
    out += [f"| {step} | {loss:.4f} |" for step, loss in losses]
    eval_loss = (record.get("metrics") or {}).get("eval_loss")
    if eval_loss is not None:
        out += ["", f"Eval loss after training: {eval_loss:.4f}."]
    return "\n".join(out) + "\n"


def _record(report: dict) -> Optional[dict]:
    adapter = report.get("adapter") or {}
    try:
        return json.loads((Path(adapter["path"]).parent / "record.json").read_text())
    except (KeyError, OSError, ValueError):
        return None


def publish_run_artifacts(report: dict) -> None:
    """Create (or add a version to) the run's artifacts. The token never appears here."""
    hub = report["hub"]
    repo = hub["repo_id"]
    create_markdown_artifact(key=artifact_key(repo, "report"), markdown=report_markdown(report),
                             description="loraflow run report")
    metrics = [{"metric": k, "value": _rounded(v)} for k, v in report["metrics"].items()]
    create_table_artifact(key=artifact_key(repo, "metrics"), table=metrics,
                          description="training metrics")
    commit_url = f"{hub['url']}/commit/{hub['commit']}"
    create_link_artifact(key=artifact_key(repo, "hub-commit"), link=commit_url,
                         link_text=f"{repo}@{hub['tag']}", description="published adapter")
    record = _record(report)
    if record is not None:
        create_markdown_artifact(key=artifact_key(repo, "loss-curve"),
                                 markdown=loss_curve_markdown(record),
                                 description="training loss")
