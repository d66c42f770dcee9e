"""Prefect artifacts of a run, under stable keys so their history shows in the UI:
a markdown report, a metrics table, a link to the Hub commit, the loss curve."""
from __future__ import annotations

import re

from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)


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

Loss {m['first_loss']:.4f} → {m['last_loss']:.4f}; eval loss {m.get('eval_loss')}.

| step | state | seconds |
|---|---|---|
{steps}
"""


def publish_run_artifacts(report: dict) -> None:
    """Create (or add a version to) the run's artifacts. The token never appears here."""
    hub = report["hub"]
    repo = hub["repo_id"]
    create_markdown_artifact(key=artifact_key(repo, "report"), markdown=report_markdown(report),
                             description="loraflow run report")
    metrics = [{"metric": k, "value": v} for k, v in report["metrics"].items()]
    create_table_artifact(key=artifact_key(repo, "metrics"), table=metrics,
                          description="training metrics")
    commit_url = f"{hub['url']}/commit/{hub['commit']}"
    create_link_artifact(key=artifact_key(repo, "hub-commit"), link=commit_url,
                         link_text=f"{repo}@{hub['tag']}", description="published adapter")
    create_image_artifact(image_url=f"{hub['url']}/resolve/{hub['commit']}/loss_curve.png",
                          key=artifact_key(repo, "loss-curve"), description="training loss")
