"""Render loraflow's Kubernetes templates as Prefect's worker and the recipe's envsubst do
(shared by tests/unit/test_k8s_templates.py and tests/integration/test_multinode_recipe.py).

The work pools: BaseJobConfiguration.from_template_and_values (defaults merged with job
variables, then apply_values), then the Kubernetes worker's own step that prepends its
`env` to the container's env list (prefect-kubernetes KubernetesWorkerJobConfiguration.
_populate_env_in_manifest, mirrored here because prefect-kubernetes is not a
dependency). The multi-node manifest: envsubst with the parameters its header lists.
"""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from typing import Any

import yaml

from flows.deploy import DEPLOYMENTS_DIR, read_work_pools

POOLS = {p["name"]: p for p in read_work_pools()}
K8S_POOLS = sorted(n for n, p in POOLS.items() if p["type"] == "kubernetes")
MULTIGPU = "loraflow-k8s-multigpu"
MULTINODE = DEPLOYMENTS_DIR / "k8s" / "multinode-job.yaml"
MULTINODE_PARAMS = ("JOB", "NAMESPACE", "IMAGE", "NNODES", "GPUS_PER_POD", "PROFILE")


class _NoServer:
    """The client from_template_and_values may use: only for {{ prefect.blocks.* }} or
    {{ prefect.variables.* }} references, which these templates must not have."""

    def __getattr__(self, name):
        raise AssertionError(f"the template needed the Prefect server ({name})")


def render_pool(name: str, job_variables: dict[str, Any] | None = None) -> dict:
    """The Job manifest the Kubernetes worker would submit for a run of this pool."""
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools import validate
    from prefect.workers.base import BaseJobConfiguration

    pool = POOLS[name]
    WorkPoolCreate(**pool)  # what the server checks when `loraflow deploy` creates it
    template = pool["base_job_template"]
    values = job_variables or {}
    validate(values, template["variables"], raise_on_error=True)  # as for job_variables

    class KubernetesJob(BaseJobConfiguration):  # the worker's fields that matter here
        job_manifest: dict[str, Any]
        namespace: str = "default"

    config = asyncio.run(KubernetesJob.from_template_and_values(template, values,
                                                                client=_NoServer()))
    manifest = json.loads(json.dumps(config.job_manifest))
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    prefect_env = [{"name": k, "value": v} for k, v in config.env.items()]
    template_env = container.get("env")
    container["env"] = [*prefect_env, *(template_env if isinstance(template_env, list) else [])]
    return manifest


def render_multinode(**params: Any) -> list[dict]:
    """envsubst '${JOB} ${NAMESPACE} ...' < multinode-job.yaml, parsed."""
    text = MULTINODE.read_text()
    assert set(params) == set(MULTINODE_PARAMS)
    names = "|".join(MULTINODE_PARAMS)
    rendered = re.sub(r"\$(?:\{(%s)\}|(%s)\b)" % (names, names),
                      lambda m: str(params[m.group(1) or m.group(2)]), text)
    if shutil.which("envsubst"):  # the command the header gives, where it exists
        listed = " ".join("${%s}" % p for p in MULTINODE_PARAMS)
        real = subprocess.run(["envsubst", listed], input=text, capture_output=True, text=True,
                              env={k: str(v) for k, v in params.items()}, check=True).stdout
        assert real == rendered
    return list(yaml.safe_load_all(rendered))


def effective_env(container: dict) -> dict[str, dict]:
    """name → entry as the kubelet sees it: of duplicate names, the last one wins."""
    return {e["name"]: e for e in container.get("env", [])}
