"""`loraflow deploy`: register deployments/ with the Prefect server, without prompts."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_deploy(args) -> int:
    from tasks import settings

    settings.prepare_client_environment()
    from flows.deploy import PREFECT_FILE, DeployError, deploy

    try:
        done = deploy(prefect_file=Path(args.prefect_file) if args.prefect_file else PREFECT_FILE,
                      webhook_url=args.webhook_url, store_token=args.store_token,
                      names=args.names or None)
    except DeployError as exc:
        if args.json:
            print(json.dumps({"status": "failed", "error": str(exc)}))
        else:
            print(f"loraflow: deploy failed — {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"status": "completed", "done": done}))
    else:
        print("\n".join(done))
        print("Start workers from the project root: on this machine (CPU-sized runs: the "
              "quickstart, its sweep)\n  prefect worker start --pool loraflow-local\n"
              "and on a GPU host (the GPU presets' nightly)\n"
              "  prefect worker start --pool loraflow-gpu")
    return 0


def register(sub) -> None:
    dep = sub.add_parser(
        "deploy", help="register work pools, automations and deployments/prefect.yaml with "
        "the Prefect server at PREFECT_API_URL (no prompts)")
    dep.add_argument("--prefect-file", default=None,
                     help="deployments file (default: deployments/prefect.yaml)")
    dep.add_argument("--name", dest="names", action="append", default=[],
                     help="deploy only this deployment (repeatable; default: all)")
    dep.add_argument("--webhook-url", default=None,
                     help="save the loraflow-notify webhook block with this URL; the "
                     "automations need it")
    dep.add_argument("--store-token", action="store_true",
                     help="save $HF_TOKEN to the Secret block loraflow-hf-token (never printed)")
    dep.add_argument("--json", action="store_true")
    dep.set_defaults(handler=cmd_deploy)
