"""Register loraflow with a Prefect server: work pools, blocks, automations, deployments.

Everything registered is defined in deployments/ (committed, reviewable):

- deployments/prefect.yaml: one deployment per preset, the nightly one, the publish one,
  the sweep and the deployment its variants run on;
- deployments/work-pools/*.json: the work pools (process: loraflow-local for CPU-sized
  runs, loraflow-gpu on a GPU host; docker; kubernetes). Every pool a deployment names
  is created (or updated) before the deployments are registered;
- deployments/automations.yaml: what notifies the loraflow-notify webhook, and when.

`loraflow deploy` applies them all without a prompt; the deployments step is exactly
`prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml`, run from the
project root. The Hub token never appears in any of these: the deployments' pull step
`load_hub_token` reads it from the Secret block loraflow-hf-token inside the run's own
process, at run time.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEPLOYMENTS_DIR = PROJECT_DIR / "deployments"
PREFECT_FILE = DEPLOYMENTS_DIR / "prefect.yaml"
WORK_POOLS_DIR = DEPLOYMENTS_DIR / "work-pools"
AUTOMATIONS_FILE = DEPLOYMENTS_DIR / "automations.yaml"
# Automations an earlier loraflow deployed that re-deploying removes: the approved-publish
# one notified on every completed publish run, so an approval given twice notified twice
# (loraflow-version-published now covers approved publishes, once per new version).
RETIRED_AUTOMATIONS = ("loraflow-approved-publish",)
TOKEN_SECRET = "loraflow-hf-token"
WEBHOOK_BLOCK = "loraflow-notify"


class DeployError(Exception):
    """A registration step failed; the message names the cause and the fix."""


# --- the pull step every deployment runs, in the flow run's own process --------------

def load_hub_token(secret: str = TOKEN_SECRET, env: str = "HF_TOKEN") -> dict:
    """Deployment pull step: put the Hub token from a Prefect Secret block into `env`.

    Runs inside the flow run's process before the flow is loaded, so the token lives
    only in that process's environment: never in the deployment, its parameters or
    job variables, the worker's command line, a log line or a step output. A token
    already in the environment (the worker's own HF_TOKEN) wins; without either,
    preflight fails with MissingTokenError and says how to fix it.

    Args:
        secret: name of the Secret block holding the token.
        env: the environment variable the Hub clients read.
    Returns:
        {} — nothing for later steps (a returned value would be templated and echoed).
    """
    from tasks import settings

    settings.prepare_client_environment()
    if os.environ.get(env):
        return {}
    from prefect.blocks.system import Secret
    from prefect.exceptions import ObjectNotFound

    try:
        value = Secret.load(secret).get()
    except (ValueError, ObjectNotFound):  # Block.load raises ValueError when it is missing
        print(f"loraflow: no Secret block '{secret}' and no {env} in the worker's "
              f"environment; the run has no Hub token.", file=sys.stderr)
        return {}
    if value:
        os.environ[env] = str(value)
    return {}


# --- definitions in deployments/ ------------------------------------------------------

def read_work_pools(directory: Path = WORK_POOLS_DIR) -> list[dict]:
    """Every work pool definition: {name, type, description, base_job_template}."""
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]


def read_automations(path: Path = AUTOMATIONS_FILE) -> list[dict]:
    return yaml.safe_load(path.read_text())["automations"]


def read_deployments(prefect_file: Path = PREFECT_FILE) -> list[dict]:
    return yaml.safe_load(prefect_file.read_text())["deployments"]


def automation_payload(spec: dict, block_ids: dict[str, str]) -> dict:
    """An automations.yaml entry → the body Prefect's automations API takes: an action's
    `block: NAME` becomes the block document's id."""
    spec = json.loads(json.dumps(spec))
    for action in spec.get("actions", []):
        name = action.pop("block", None)
        if name is not None:
            if name not in block_ids:
                raise DeployError(f"automation '{spec['name']}' notifies block '{name}', which "
                                  "does not exist. Fix: pass --webhook-url URL to create it.")
            action["block_document_id"] = block_ids[name]
    return spec


def missing_pools(deployments: list[dict], pools: list[dict]) -> list[str]:
    """The work pools deployments name that deployments/work-pools does not define."""
    defined = {p["name"] for p in pools}
    return sorted({d["work_pool"]["name"] for d in deployments} - defined)


# --- applying them --------------------------------------------------------------------

def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError("no Prefect server configured (PREFECT_API_URL is unset), so the "
                          "deployments would go to a throw-away temporary server. Fix: start "
                          "one with `prefect server start` and export "
                          "PREFECT_API_URL=http://127.0.0.1:4200/api.")
    return url


async def apply_work_pools(client, pools: list[dict]) -> list[str]:
    """Create each work pool, or update its description and base job template."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    done = []
    for pool in pools:
        try:
            await client.read_work_pool(pool["name"])
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(
                name=pool["name"], type=pool["type"], description=pool.get("description"),
                base_job_template=pool["base_job_template"]))
            done.append(f"created work pool {pool['name']} ({pool['type']})")
        else:
            await client.update_work_pool(pool["name"], WorkPoolUpdate(
                description=pool.get("description"),
                base_job_template=pool["base_job_template"]))
            done.append(f"updated work pool {pool['name']} ({pool['type']})")
    return done


def save_token_secret(token: str, name: str = TOKEN_SECRET) -> None:
    """Store the Hub token in a Secret block (the UI shows it masked)."""
    from prefect.blocks.system import Secret

    Secret(value=token).save(name, overwrite=True)


def save_webhook(url: str, name: str = WEBHOOK_BLOCK) -> str:
    """A Custom Webhook notification block that POSTs {"subject", "body"} as JSON."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(
        name=name, url=url, method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}", "source": "loraflow"})
    return str(block.save(name, overwrite=True))


async def _block_ids(client, names: list[str]) -> dict[str, str]:
    from prefect.exceptions import ObjectNotFound

    ids = {}
    for name in names:
        try:
            doc = await client.read_block_document_by_name(name, block_type_slug="custom-webhook")
        except ObjectNotFound:
            continue
        ids[name] = str(doc.id)
    return ids


async def apply_automations(client, specs: list[dict]) -> list[str]:
    """Create each automation, replacing any of the same name (so re-deploying is
    idempotent). Skipped, with a note, when their webhook block does not exist."""
    from prefect.events.schemas.automations import AutomationCore

    names = sorted({a["block"] for s in specs for a in s["actions"] if "block" in a})
    ids = await _block_ids(client, names)
    missing = [n for n in names if n not in ids]
    if missing:
        return [f"skipped {len(specs)} automations: no webhook block {', '.join(missing)} "
                "(create it with `loraflow deploy --webhook-url URL`)"]
    done = []
    for spec in specs:
        automation = AutomationCore.model_validate(automation_payload(spec, ids))
        for old in await client.read_automations_by_name(automation.name):
            await client.delete_automation(old.id)
        await client.create_automation(automation)
        done.append(f"automation {automation.name}")
    for name in RETIRED_AUTOMATIONS:
        for old in await client.read_automations_by_name(name):
            await client.delete_automation(old.id)
            done.append(f"removed automation {name}")
    return done


def register_deployments(prefect_file: Path = PREFECT_FILE, cwd: Path = PROJECT_DIR,
                         names: Optional[list[str]] = None) -> subprocess.CompletedProcess:
    """`prefect --no-prompt deploy --all --prefect-file FILE` from the project root.

    Entrypoints in prefect.yaml are relative to the project root, so it runs there.
    """
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy",
           "--prefect-file", str(prefect_file)]
    cmd += [arg for n in names for arg in ("--name", n)] if names else ["--all"]
    return subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True)


def deploy(prefect_file: Path = PREFECT_FILE, webhook_url: Optional[str] = None,
           store_token: bool = False, names: Optional[list[str]] = None) -> list[str]:
    """Apply deployments/ to the configured Prefect server; return what was done.

    Raises:
        DeployError: no server configured, a deployment naming a work pool that
            deployments/work-pools does not define, a missing HF_TOKEN for
            --store-token, or `prefect deploy` failed (its output is in the message).
    """
    from prefect.client.orchestration import get_client

    url = _api_url()
    pools = read_work_pools()
    config = yaml.safe_load(prefect_file.read_text())["deployments"]
    wanted = [d for d in config if not names or d["name"] in names]
    if missing := missing_pools(wanted, pools):
        # `prefect deploy` would stop at a prompt, or create a bare process pool that
        # any quickstart worker could serve: refuse instead.
        raise DeployError(f"{prefect_file} names work pools with no definition in "
                          f"{WORK_POOLS_DIR}: {', '.join(missing)}. Fix: add "
                          f"{WORK_POOLS_DIR}/<name>.json or point the deployment at a "
                          "defined pool.")
    done = [f"Prefect server: {url}"]
    if store_token:
        token = os.environ.get("HF_TOKEN")
        if not token:
            raise DeployError("--store-token: HF_TOKEN is not set. Fix: export HF_TOKEN "
                              "first; it is saved to the Secret block, never printed.")
        save_token_secret(token)
        done.append(f"saved HF_TOKEN to Secret block {TOKEN_SECRET}")
    if webhook_url:
        save_webhook(webhook_url)
        done.append(f"saved webhook block {WEBHOOK_BLOCK} → {webhook_url}")

    async def _apply() -> list[str]:
        async with get_client() as client:
            out = await apply_work_pools(client, pools)
            out += await apply_automations(client, read_automations())
            return out

    done += asyncio.run(_apply())
    proc = register_deployments(prefect_file, names=names)
    if proc.returncode != 0:
        raise DeployError(f"prefect deploy failed (exit {proc.returncode}):\n"
                          f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    done += [f"deployment {d['name']} → {d['work_pool']['name']}" for d in wanted]
    return done


def prefect_yaml_parameters(preset: str) -> dict[str, Any]:
    """The `parameters` a preset's deployment carries: the preset file's own content."""
    from profiles.loader import resolve_profile_path

    return yaml.safe_load(resolve_profile_path(preset).read_text())
