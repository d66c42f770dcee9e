"""`loraflow publish RUN_DIR` and `loraflow runs`."""
from __future__ import annotations

import json

from tasks import settings


def _overrides(assignments: list[str]) -> dict:
    from profiles.loader import apply_override

    data: dict = {}
    for assignment in assignments:
        apply_override(data, assignment if assignment.startswith("publish.")
                       else f"publish.{assignment}")
    return data.get("publish", {})


def cmd_publish(args) -> int:
    settings.prepare_client_environment()
    from flows.publish import publish_run, publish_section_for

    section = publish_section_for(args.run_dir, _overrides(args.overrides))
    state = publish_run(args.run_dir, section, return_state=True)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException):
        error = getattr(outcome, "to_dict", lambda: {"type": type(outcome).__name__,
                                                     "message": str(outcome)})()
        print(json.dumps({"status": "failed", "error": error}) if args.json
              else f"loraflow: publish failed — {error['type']}: {error['message']}")
        return 1
    if args.json:
        print(json.dumps({"status": "completed", **outcome}))
    else:
        verb = "published" if outcome["new_commit"] else "already published"
        print(f"{verb}: {outcome['url']} @ {outcome['commit'][:12]} (tag {outcome['tag']})")
    return 0


def finished_runs() -> list[dict]:
    """Every run under LORAFLOW_HOME/runs with a record: key, base, adapter, publications."""
    runs = []
    for record_path in sorted((settings.loraflow_home() / "runs").glob("*/record.json")):
        record = json.loads(record_path.read_text())
        pubs_path = record_path.with_name("publications.json")
        runs.append({"run_dir": str(record_path.parent),
                     "base_model": f"{record['base_model']['repo_id']}@"
                                   f"{record['base_model']['commit'][:12]}",
                     "adapter_sha256": record["adapter"]["sha256"],
                     "last_loss": record["metrics"]["last_loss"],
                     "published": json.loads(pubs_path.read_text())
                     if pubs_path.is_file() else []})
    return runs


def cmd_runs(args) -> int:
    runs = finished_runs()
    if args.json:
        print(json.dumps(runs))
        return 0
    if not runs:
        print(f"no finished runs under {settings.loraflow_home() / 'runs'}")
    for run in runs:
        where = ", ".join(f"{p['repo_id']}@{p['tag']}" for p in run["published"]) or "unpublished"
        print(f"{run['run_dir']}\n  base {run['base_model']}  adapter "
              f"{run['adapter_sha256'][:16]}  loss {run['last_loss']:.3f}  → {where}")
    return 0


def register(sub) -> None:
    pub = sub.add_parser("publish", help="publish a finished run's adapter (no training)")
    pub.add_argument("run_dir", help="a run directory (see `loraflow runs`)")
    pub.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                     metavar="publish.KEY=VALUE", help="override the run's publish section")
    pub.add_argument("--json", action="store_true")
    pub.set_defaults(handler=cmd_publish)
    runs = sub.add_parser("runs", help="list finished runs and where each was published")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(handler=cmd_runs)
