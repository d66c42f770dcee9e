"""`loraflow sweep PROFILE --grid field=v1,v2 ...`"""
from __future__ import annotations

import json
import sys

import yaml

from tasks import settings
from tasks.errors import ProfileError


def parse_grid(items: list[str]) -> dict[str, list]:
    """["lora.r=4,8"] → {"lora.r": [4, 8]} (values parsed as YAML scalars)."""
    grid = {}
    for item in items:
        if "=" not in item:
            raise ProfileError(f"--grid '{item}': expected field=v1,v2. Fix: e.g. --grid lora.r=4,8")
        key, values = item.split("=", 1)
        grid[key.strip()] = [yaml.safe_load(v) for v in values.split(",") if v.strip()]
    return grid


def cmd_sweep(args) -> int:
    settings.prepare_client_environment()
    from flows.sweep import sweep
    from profiles.loader import load_profile

    profile = load_profile(args.profile, args.overrides)
    from flows.sweep import plan_variants

    plan_variants(profile, parse_grid(args.grid), args.publish)  # refuse before anything runs
    state = sweep(profile, parse_grid(args.grid), publish=args.publish,
                  max_concurrent_trainings=args.max_concurrent,
                  variant_deployment=args.variants_on, return_state=True)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, ProfileError):
        print(f"loraflow: {outcome}", file=sys.stderr)
        return 2
    if isinstance(outcome, BaseException):
        print(f"loraflow: sweep failed — {type(outcome).__name__}: {outcome}")
        return 1
    if args.json:
        print(json.dumps({k: v for k, v in outcome.items() if k != "reports"}, default=str))
    else:
        for row in outcome["variants"]:
            where = (f"{row['published']}@{row['tag']} {row['commit'][:12]}"
                     if row["published"] else "-")
            print(f"{row['variant']:<24} {row['status']:<10} {row['train'] or '-':<9} "
                  f"eval {row['eval_loss']}  → {where}  {row['run'] or ''}")
        print(f"at most {outcome['max_concurrent_trainings']} trainings ran at once "
              f"(limit {outcome['limit']})")
    return 0 if all(r["status"] == "completed" for r in outcome["variants"]) else 1


def register(sub) -> None:
    sp = sub.add_parser("sweep", help="train grid variants of a profile; publish all or the best")
    sp.add_argument("profile")
    sp.add_argument("--grid", action="append", default=[], required=True,
                    metavar="FIELD=V1,V2", help="a profile field and its values (repeatable)")
    sp.add_argument("--publish", choices=["all", "best", "none"], default="best")
    sp.add_argument("--max-concurrent", type=int, default=None,
                    help="trainings at once (default: one per visible GPU, 1 on CPU)")
    sp.add_argument("--variants-on", default="auto", metavar="DEPLOYMENT",
                    help="where the variants run: auto (the sweep-variant deployment when "
                    "a worker serves its pool, else here), local, or a "
                    "loraflow-train-variant/<name> deployment")
    sp.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                    metavar="SECTION.KEY=VALUE")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(handler=cmd_sweep)
