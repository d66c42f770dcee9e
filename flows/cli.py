"""The `loraflow` command line: run, validate, demo.

The Hub endpoint and token come from the environment (HF_ENDPOINT, HF_TOKEN), as for
every Hugging Face tool; they are never arguments. With --json the last line of stdout
is one JSON object describing the run; progress goes to stderr.

An expected error (a profile, setting, Hub or data problem: loraflow's typed errors) is
printed once, as one line naming the field, the cause and the fix, with exit code 1 (the
run failed) or 2 (it never started); `--debug` (or LORAFLOW_DEBUG=1) adds tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tasks import settings

# Before anything imports prefect: it reads its settings once, at import.
settings.prepare_prefect_environment()

from flows.prefect_runtime import quiet_libraries  # noqa: E402
from tasks.errors import LoraflowError  # noqa: E402

# Before the Hub, datasets and transformers are imported: they read their progress-bar
# switches at import (docs/observability.md).
quiet_libraries()

COMMAND_MODULES: tuple[str, ...] = (
    "flows.cli_publish",
    "flows.cli_sweep",
    "flows.cli_cache",
    "flows.cli_deploy",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraflow", description="Fine-tune a LoRA adapter from a "
                                "profile and publish it on the Hugging Face Hub.")
    sub = p.add_subparsers(dest="command", required=True)

    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks of expected errors (also LORAFLOW_DEBUG=1)")

    def with_overrides(sp):
        # One --set takes one or more pairs (--set a.b=1 c.d=2), and it may be repeated.
        sp.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="override profile fields: --set a.b=1 c.d=2 (repeatable)")
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks of expected errors (also LORAFLOW_DEBUG=1)")

    run = sub.add_parser("run", help="run the fine-tuning flow for a profile")
    run.add_argument("profile", nargs="?",
                     help="a YAML profile path or a preset name (e.g. quickstart)")
    with_overrides(run)
    run.add_argument("--json", action="store_true", help="end stdout with a JSON run report")

    val = sub.add_parser("validate", help="check a profile and print it resolved")
    val.add_argument("profile", nargs="?")
    with_overrides(val)

    demo = sub.add_parser("demo", help="run the quickstart against a local Hub: nothing to set up")
    with_overrides(demo)
    demo.add_argument("--json", action="store_true", help="end stdout with a JSON run report")
    run.set_defaults(handler=cmd_run)
    val.set_defaults(handler=cmd_validate)
    demo.set_defaults(handler=cmd_demo)
    # Command groups that live in their own modules: each exposes register(subparsers),
    # adding its subparsers with set_defaults(handler=...).
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return p


def _failure_report(profile_name: str, error: LoraflowError) -> dict:
    return {"status": "failed", "flow_run_id": None, "profile": profile_name, "steps": {},
            "base_model": None, "adapter": None, "hub": None, "metrics": None,
            "error": error.to_dict()}


def data_summary(data: dict) -> str:
    """The dataset counts a user needs, from the training record's "dataset" entry: rows
    read, dropped (and why), truncated (as the card says them), train/eval sizes."""
    from tasks.publication.modelcard import data_counts

    sizes = f"{data.get('num_train')} train / {data.get('num_eval')} eval examples"
    return "Data: " + ", ".join([*data_counts(data), sizes])


def _summary(report: dict) -> str:
    if report["status"] != "completed":
        err = report["error"] or {}
        return f"\nloraflow: run failed — {err.get('type')}: {err.get('message')}"
    adapter = report["adapter"]
    # The run's record says what was trained (method, task, labels, data), as the card does.
    record = json.loads((Path(adapter["path"]).parent / "record.json").read_text())
    if report.get("hub") is None:  # publish.when on_approval: trained, not yet published
        approval = report.get("approval") or {}
        command = approval.get("command") or \
            f"loraflow publish {Path(adapter['path']).parent}"
        return (f"\n{data_summary(record['dataset'])}\nTrained; awaiting approval to publish "
                f"to {approval.get('repo_id')}. Publish it with: {command}")
    from tasks.publication.modelcard import adapter_kind, base_loader

    hub, m = report["hub"], report["metrics"]
    auto, head_args = base_loader(record)
    steps = ", ".join(f"{k} {v['state']}" for k, v in report["steps"].items())
    eval_loss = "n/a" if m.get("eval_loss") is None else f"{m['eval_loss']:.3f}"
    return (f"\nTrained a {adapter_kind(record)} adapter for {report['base_model']['repo_id']}@"
            f"{report['base_model']['commit'][:12]}: loss {m['first_loss']:.3f} → "
            f"{m['last_loss']:.3f} (eval {eval_loss}), {adapter['trainable_params']:,} trainable "
            f"parameters.\n{data_summary(record['dataset'])}\nSteps: {steps}\n"
            f"{'Published' if hub.get('new_commit') else 'Already published (no new commit)'}"
            f": {hub['url']} @ {hub['commit'][:12]} (tag {hub['tag']})\n"
            f"Load it (the model card has the full snippet):\n"
            f"  base = {auto}.from_pretrained('{report['base_model']['repo_id']}', "
            f"revision='{report['base_model']['commit']}'{head_args})\n"
            f"  model = PeftModel.from_pretrained(base, '{hub['repo_id']}', revision='{hub['tag']}')")


def run_profile(profile_name: str, profile) -> dict:
    """Run the flow in-process; return the report whether it completed or failed.

    Raises:
        SettingsError: Prefect's temporary API server did not start in time.
    """
    settings.prepare_client_environment()
    from flows.prefect_runtime import start_prefect_api

    start_prefect_api()
    from flows.finetune import FlowFailed, finetune

    state = finetune(profile, profile_name=profile_name, return_state=True)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, FlowFailed):
        return outcome.report
    if isinstance(outcome, BaseException):
        return {**_failure_report(profile_name, LoraflowError(str(outcome))),
                "flow_run_id": str(state.state_details.flow_run_id)}
    return outcome


def _emit(report: dict, as_json: bool) -> int:
    """Print the run's outcome: the JSON report on stdout with --json; else the summary,
    on stdout when the run completed and on stderr when it failed (as the refusals before
    a run are), so `2>errors.txt` catches every failure."""
    completed = report["status"] == "completed"
    if as_json:
        print(json.dumps(report, default=str))
    else:
        print(_summary(report), file=sys.stdout if completed else sys.stderr)
    return 0 if completed else 1


def cmd_validate(args) -> int:
    from profiles.loader import load_profile

    profile = load_profile(args.profile, args.overrides)
    import yaml

    print(yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_run(args) -> int:
    from profiles.loader import load_profile, profile_name

    profile = load_profile(args.profile, args.overrides)
    return _emit(run_profile(profile_name(args.profile), profile), args.json)


def cmd_demo(args) -> int:
    """Start localhub in a temporary directory, seed it, run the quickstart as the demo user."""
    import tempfile

    from localhub.seed import seed
    from localhub.server import LocalHub

    root = Path(tempfile.mkdtemp(prefix="loraflow-localhub-"))
    hub = LocalHub(root).start(port=0)
    try:
        seeded = seed(root)
        demo_user = next(u for u in seeded["users"] if u["name"] == "demo")
        # Set before the Hub clients are imported: they read these at import time.
        os.environ.update(HF_ENDPOINT=hub.url, HF_TOKEN=demo_user["token"],
                          HF_HUB_DISABLE_XET="1")
        print(f"localhub serving {root} at {hub.url} (seeded as user 'demo')", file=sys.stderr)
        from profiles.loader import load_profile

        profile = load_profile("quickstart", args.overrides)
        code = _emit(run_profile("quickstart", profile), args.json)
        if not args.json:
            print(f"The local Hub's files stay under {root}.")
        return code
    finally:
        hub.stop()


def main(argv: list[str] | None = None) -> int:
    """The `loraflow` command.

    Args:
        argv: the arguments (default: sys.argv[1:]).
    Returns:
        The exit code: 0 done, 1 the run failed, 2 it could not start (bad profile,
        --set or setting).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if hasattr(args, "profile") and args.profile is None:
        # `run --set a.b=1 PROFILE`: the open-ended --set took the profile too; a pair
        # always has "=", a profile never needs one.
        overrides = getattr(args, "overrides", [])
        if overrides and "=" not in overrides[-1]:
            args.profile = overrides.pop()
        else:
            parser.error("the following arguments are required: profile")
    if getattr(args, "debug", False):
        os.environ["LORAFLOW_DEBUG"] = "1"
    try:
        return args.handler(args)
    except LoraflowError as exc:
        if settings.debug_enabled():
            import traceback

            traceback.print_exc()
        if getattr(args, "json", False):
            print(json.dumps(_failure_report(args.profile if hasattr(args, "profile")
                                             else "quickstart", exc)))
        else:
            print(f"loraflow: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
