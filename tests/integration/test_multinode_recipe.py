"""The multi-node recipe's pod script, run as two "pods" on this CPU host.

deployments/k8s/multinode-job.yaml is rendered for 2 nodes × 1 process; its container
script runs twice, as pod 0 and pod 1 (JOB_COMPLETION_INDEX), with the pod's literal
env, the session's LORAFLOW_HOME as the shared volume and the demo user's token as the
Secret. Only the rendezvous endpoint is changed: the pods' DNS name (<job>-0.<svc>)
exists only in a cluster, so it points at 127.0.0.1. This runs what the pods run —
prepare on pod 0, torchrun's c10d rendezvous across two agents, training, publish —
with gloo on CPU; no cluster, GPU or NCCL is involved.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from k8s_render import effective_env, render_multinode  # tests/

ROOT = Path(__file__).resolve().parents[2]
REPO = "loraflow-demo/multinode"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # about 80 s on 2 CPU cores
def test_two_pods_prepare_train_over_a_rendezvous_and_publish(hub, session_dir, tmp_path):
    from profiles.loader import resolve_profile_path

    profile = yaml.safe_load(resolve_profile_path("quickstart").read_text())
    profile["training"].update(max_steps=20, save_steps=10, per_device_batch_size=8,
                               global_batch_size=16, seed=5)
    profile["publish"]["repo_id"] = REPO
    profile_file = tmp_path / "multinode.yaml"
    profile_file.write_text(yaml.safe_dump(profile))
    _, job = render_multinode(JOB="lf", NAMESPACE="ns", IMAGE="img", NNODES=2, GPUS_PER_POD=1,
                              PROFILE=str(profile_file))
    container = job["spec"]["template"]["spec"]["containers"][0]
    (script,) = container["args"]
    assert "--rdzv_endpoint=lf-0.lf:29500" in script
    script = script.replace("lf-0.lf:29500", f"127.0.0.1:{_free_port()}")
    pod_env = {k: e["value"] for k, e in effective_env(container).items() if "value" in e}
    pod_env.update(LORAFLOW_HOME=os.environ["LORAFLOW_HOME"], RDZV_ID="job-uid-1",
                   HF_TOKEN=hub.token("demo"),
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    pods = []
    for index in (0, 1):
        env = {**os.environ, **pod_env, "JOB_COMPLETION_INDEX": str(index),
               "PREFECT_HOME": str(session_dir / f"prefect-pod{index}")}
        log = open(tmp_path / f"pod{index}.log", "w")
        pods.append((subprocess.Popen([*container["command"], script], cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.time() + 900
    while time.time() < deadline and any(p.poll() is None for p, _ in pods):
        if any(p.poll() not in (None, 0) for p, _ in pods):
            break  # one pod failed: the Job would stop the other
        time.sleep(1)
    for p, log in pods:
        if p.poll() is None:
            p.kill()
        p.wait()
        log.close()
    logs = [(tmp_path / f"pod{i}.log").read_text() for i in (0, 1)]
    assert [p.returncode for p, _ in pods] == [0, 0], "\n\n".join(x[-4000:] for x in logs)

    pointer = Path(os.environ["LORAFLOW_HOME"]) / "multinode" / "job-uid-1.run_dir"
    run_dir = Path(pointer.read_text())
    record = json.loads((run_dir / "record.json").read_text())
    assert record["metrics"]["steps"] == 20
    assert (run_dir / "train_log.rank1.jsonl").is_file(), "the second pod's rank did not train"
    assert "published:" in logs[0], logs[0][-2000:]  # `loraflow publish RUN_DIR` on pod 0

    from huggingface_hub import HfApi

    tags = HfApi(endpoint=hub.url, token=hub.token("demo")).list_repo_refs(REPO).tags
    assert [t.name for t in tags] == ["v1"]


def _prepare_launch_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prepare_launch", ROOT / "deployments" / "k8s" / "prepare_launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_downloads_the_continued_adapter_like_the_flow(hub, as_user, session_dir):
    """model.id names an adapter repo (the seeded tinylabs/tiny-llama-lora): the pods'
    launch inputs carry the adapter's snapshot beside its base, as the single-node flow's
    do — both run the flow's own preflight → download → dataset (`prepare_inputs`)."""
    from homes import loraflow_home  # tests/

    from profiles.loader import load_profile

    adapter, base = "tinylabs/tiny-llama-lora", "tinylabs/tiny-llama"
    profile = load_profile("quickstart", [f"model.id={adapter}", "training.max_steps=4",
                                          "publish.repo_id=loraflow-demo/multinode-continued"])
    with loraflow_home(session_dir / "loraflow-prepare-continued"), as_user("demo"):
        run_dir = Path(_prepare_launch_module().prepare_multinode(profile))
    inputs = json.loads((run_dir / "launch.json").read_text())
    snapshot = inputs["snapshot"]
    assert (snapshot["repo_id"], snapshot["commit"]) == (base, hub.commit(base))
    assert snapshot["adapter"] is not None, "the continued adapter was not downloaded"
    assert (snapshot["adapter"]["repo_id"], snapshot["adapter"]["commit"]) == (
        adapter, hub.commit(adapter))
    local = Path(snapshot["adapter"]["local_dir"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(snapshot["adapter"]["files"])
    assert all((local / name).is_file() for name in snapshot["adapter"]["files"])
    assert inputs["preflight"]["adapter"]["repo_id"] == adapter
