"""Multi-node recipe, step 1 (docs/deployments.md): get a run directory ready for
`torchrun ... -m tasks.training.worker RUN_DIR/launch.json` on every pod.

loraflow's own launcher (tasks.training.launch.py) runs torchrun on one host (--standalone).
Across hosts, every pod must run torchrun itself, so the steps before training run
here, once: the fine-tuning flow's preflight, download and dataset steps (its
`prepare_inputs`, so a continued adapter is downloaded here too) — with the same
content-keyed caching, into LORAFLOW_HOME, the volume every pod mounts at the same
path — then RUN_DIR/launch.json is written with the inputs train_adapter hands to
its torchrun job. The last line printed is RUN_DIR.

    python deployments/k8s/prepare_launch.py PROFILE [--set section.key=value ...]
                                             [--pointer FILE]

--pointer FILE also writes RUN_DIR into FILE (atomically), for pods that wait for it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root

from prefect import flow  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from flows.approval import request_publication  # noqa: E402
from flows.finetune import prepare_inputs  # noqa: E402
from profiles.loader import load_profile  # noqa: E402
from profiles.schema import Profile  # noqa: E402
from tasks.train import launch_inputs  # noqa: E402
from tasks.training.launch import LAUNCH_FILE  # noqa: E402


@flow(name="loraflow-prepare-multinode", log_prints=True)
def prepare_multinode(profile: Profile) -> str:
    """preflight → download → dataset (the fine-tuning flow's own `prepare_inputs`), then
    RUN_DIR/launch.json; returns RUN_DIR."""
    pre, snapshot, data = prepare_inputs(profile)
    # What train_adapter writes before its own torchrun (tasks.train.launch_inputs: the
    # manifests, the key inputs and the run directory); this flow run's id goes into the
    # run record as the run that launched it.
    inputs = launch_inputs(profile, pre, snapshot, data, str(flow_run.id))
    run_dir = Path(inputs["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LAUNCH_FILE).write_text(json.dumps(inputs))
    # Where pod 0's `loraflow publish RUN_DIR` publishes once training is done.
    request_publication(str(run_dir), profile.publish)
    return str(run_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile", help="a YAML profile path or a preset name")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE")
    p.add_argument("--pointer", type=Path, help="also write RUN_DIR into this file")
    args = p.parse_args(argv)
    from tasks import settings

    settings.prepare_client_environment()
    run_dir = prepare_multinode(load_profile(args.profile, args.overrides))
    if args.pointer:
        args.pointer.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.pointer.with_name(args.pointer.name + ".tmp")
        tmp.write_text(run_dir)
        os.replace(tmp, args.pointer)  # a waiting pod never reads half a path
    print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
