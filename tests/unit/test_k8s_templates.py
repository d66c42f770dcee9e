"""The Kubernetes templates render to Jobs that give the GPUs, /dev/shm, NCCL settings
and Hub token a multi-GPU (and a multi-node) training needs. No cluster, no network.

Rendering is Prefect's worker's (and the recipe's envsubst): tests/k8s_render.py.
`kubectl` cannot validate without an API server (even a client-side dry-run downloads
the server's OpenAPI), so the Kubernetes structure is checked here in Python: required
fields, and every field name known to the Job / Pod / Container API (a field in the
wrong place, e.g. `parallelism` in the pod spec, is an error).
"""
from __future__ import annotations

import json
import re
import subprocess

import pytest
from k8s_render import (  # tests/
    K8S_POOLS,
    MULTIGPU,
    MULTINODE,
    POOLS,
    effective_env,
    render_multinode,
    render_pool,
)

from flows.deploy import DEPLOYMENTS_DIR

# NVLink multicast off (the project's rule for its GPU machines).
NCCL_FIXED = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
              "NVSHMEM_DISABLE_NVLS": "1"}
TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")

# Field names of the Kubernetes API objects used (batch/v1 JobSpec, core/v1 PodSpec,
# Container, EnvVar, Volume, VolumeMount), as of Kubernetes 1.32.
JOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "backoffLimitPerIndex", "completionMode",
            "completions", "managedBy", "manualSelector", "maxFailedIndexes", "parallelism",
            "podFailurePolicy", "podReplacementPolicy", "selector", "successPolicy", "suspend",
            "template", "ttlSecondsAfterFinished"}
POD_SPEC = {"activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers",
            "dnsConfig", "dnsPolicy", "enableServiceLinks", "ephemeralContainers",
            "hostAliases", "hostIPC", "hostNetwork", "hostPID", "hostUsers", "hostname",
            "imagePullSecrets", "initContainers", "nodeName", "nodeSelector", "os", "overhead",
            "preemptionPolicy", "priority", "priorityClassName", "readinessGates",
            "resourceClaims", "resources", "restartPolicy", "runtimeClassName",
            "schedulerName", "schedulingGates", "securityContext", "serviceAccount",
            "serviceAccountName", "setHostnameAsFQDN", "shareProcessNamespace", "subdomain",
            "terminationGracePeriodSeconds", "tolerations", "topologySpreadConstraints",
            "volumes"}
CONTAINER = {"args", "command", "env", "envFrom", "image", "imagePullPolicy", "lifecycle",
             "livenessProbe", "name", "ports", "readinessProbe", "resizePolicy", "resources",
             "restartPolicy", "securityContext", "startupProbe", "stdin", "stdinOnce",
             "terminationMessagePath", "terminationMessagePolicy", "tty", "volumeDevices",
             "volumeMounts", "workingDir"}


# --- checks ---------------------------------------------------------------------------

def check_job_structure(job: dict) -> tuple[dict, dict]:
    """A valid batch/v1 Job with nothing left to render; returns (pod spec, container)."""
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert "{{" not in json.dumps(job) and "${" not in json.dumps(job)
    assert set(job["spec"]) <= JOB_SPEC, set(job["spec"]) - JOB_SPEC
    pod = job["spec"]["template"]["spec"]
    assert set(pod) <= POD_SPEC, set(pod) - POD_SPEC
    assert pod["restartPolicy"] in ("Never", "OnFailure")  # what a Job allows
    assert isinstance(pod["containers"], list) and pod["containers"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    assert len(volumes) == len(pod.get("volumes", []))
    for container in pod["containers"]:
        assert set(container) <= CONTAINER, set(container) - CONTAINER
        assert container["name"] and isinstance(container["image"], str) and container["image"]
        for entry in container.get("env", []):
            assert set(entry) <= {"name", "value", "valueFrom"} and entry["name"]
            assert isinstance(entry.get("value", ""), str), entry  # Kubernetes wants strings
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, mount
    for toleration in pod.get("tolerations", []):
        assert set(toleration) <= {"key", "operator", "value", "effect", "tolerationSeconds"}
    return pod, pod["containers"][0]


def check_gpu_pod(pod: dict, container: dict, gpus: int, shm: str) -> None:
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == gpus
    assert resources["requests"]["nvidia.com/gpu"] == gpus
    volumes = {v["name"]: v for v in pod["volumes"]}
    (shm_mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm_mount["name"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": shm}
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule"
               for t in pod["tolerations"])
    env = effective_env(container)
    for name, value in NCCL_FIXED.items():
        assert env[name] == {"name": name, "value": value}
    assert env["NCCL_DEBUG"]["value"] in ("WARN", "INFO")
    assert "CUDA_VISIBLE_DEVICES" not in env  # the launcher counts the pod's GPUs itself
    # The Hub token: a reference to a Secret, never a value.
    assert set(env["HF_TOKEN"]) == {"name", "valueFrom"}
    ref = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]
    # LORAFLOW_HOME is on a persistent volume: a retried pod finds the checkpoints.
    home = env["LORAFLOW_HOME"]["value"]
    (home_mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == home]
    assert volumes[home_mount["name"]]["persistentVolumeClaim"]["claimName"]


# --- the work pools -------------------------------------------------------------------

@pytest.mark.parametrize("pool", K8S_POOLS)
def test_every_kubernetes_pool_renders_to_a_valid_job(pool):
    pod, container = check_job_structure(render_pool(pool))
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_the_multigpu_pool_with_its_defaults():
    defaults = POOLS[MULTIGPU]["base_job_template"]["variables"]["properties"]
    job = render_pool(MULTIGPU)
    pod, container = check_job_structure(job)
    check_gpu_pod(pod, container, gpus=defaults["gpu_count"]["default"],
                  shm=defaults["shm_size"]["default"])
    env = effective_env(container)
    assert env["NCCL_SOCKET_IFNAME"]["value"] == "eth0"
    assert job["metadata"]["namespace"] == "default"
    assert container["image"] == defaults["image"]["default"]
    assert job["spec"]["backoffLimit"] == 0  # Prefect retries; the volume keeps checkpoints


def test_the_multigpu_pool_with_overrides():
    job = render_pool(MULTIGPU, {
        "gpu_count": 8, "shm_size": "128Gi", "namespace": "ml", "image": "reg.example/lf:2",
        "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
        "nccl_socket_ifname": "net1", "nccl_debug": "INFO",
        "hf_token_secret": "team-hub", "hf_token_secret_key": "hf",
        "loraflow_home_claim": "team-home",
        # A deployment's env cannot turn multicast back on: the template's entries come
        # after Prefect's in the container's list, and the last of a name wins.
        "env": {"NCCL_NVLS_ENABLE": "1", "EXTRA": "x"}})
    pod, container = check_job_structure(job)
    check_gpu_pod(pod, container, gpus=8, shm="128Gi")
    env = effective_env(container)
    assert env["EXTRA"]["value"] == "x"
    assert env["NCCL_SOCKET_IFNAME"]["value"] == "net1"
    assert env["NCCL_DEBUG"]["value"] == "INFO"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "team-hub"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "hf"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert {v["name"]: v for v in pod["volumes"]}["loraflow-home"][
        "persistentVolumeClaim"]["claimName"] == "team-home"
    assert job["metadata"]["namespace"] == "ml" and container["image"] == "reg.example/lf:2"


def test_a_bad_job_variable_is_refused():
    from prefect.utilities.schema_tools import ValidationError

    with pytest.raises(ValidationError):
        render_pool(MULTIGPU, {"gpu_count": 0})


def test_no_pool_or_manifest_holds_a_token():
    texts = [json.dumps(p) for p in POOLS.values()]
    texts += [p.read_text() for p in (DEPLOYMENTS_DIR / "k8s").iterdir() if p.is_file()]
    for text in texts:
        assert not TOKEN_LIKE.search(text)
    properties = POOLS[MULTIGPU]["base_job_template"]["variables"]["properties"]
    assert not [k for k in properties if "token" in k and not k.startswith("hf_token_secret")]


def test_the_launcher_uses_every_gpu_of_the_pod(monkeypatch, tmp_path):
    """In the pod the device plugin shows exactly gpu_count GPUs and sets no
    CUDA_VISIBLE_DEVICES (checked above): the device inventory (tasks.memory.devices,
    nvidia-smi's query) lists them, so training.nproc_per_node null means torchrun over
    all of them."""
    from profiles.schema import TrainingSection
    from tasks.training.launch import resolve_launcher

    smi = tmp_path / "nvidia-smi"  # answers --query-gpu=index,uuid,name,memory.total,...
    smi.write_text("#!/bin/sh\nfor i in 0 1 2 3; do "
                   "echo \"$i, GPU-x$i, NVIDIA H100 80GB HBM3, 81559, 81000, 9.0\"; done\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert resolve_launcher(TrainingSection()) == ("torchrun", 4)
    # A device_map that spreads one model over the GPUs runs one process that uses them all.
    assert resolve_launcher(TrainingSection(), device_map="auto") == ("single", 1)
    assert resolve_launcher(TrainingSection(), device_map={"model": 0, "lm_head": 1}) == (
        "single", 1)
    assert resolve_launcher(TrainingSection(), device_map={"": 0}) == ("torchrun", 4)


# --- the multi-node recipe ------------------------------------------------------------

@pytest.mark.parametrize("nnodes,gpus", [(2, 8), (4, 2)])
def test_the_multinode_job_renders_a_rendezvous_over_nnodes_pods(nnodes, gpus):
    params = dict(JOB="llama8b", NAMESPACE="ml", IMAGE="reg.example/lf:2", NNODES=nnodes,
                  GPUS_PER_POD=gpus, PROFILE="/var/lib/loraflow/profiles/llama8b.yaml")
    service, job = render_multinode(**params)
    assert (service["apiVersion"], service["kind"]) == ("v1", "Service")
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS record per pod
    assert service["spec"]["publishNotReadyAddresses"] is True
    pod, container = check_job_structure(job)
    check_gpu_pod(pod, container, gpus=gpus, shm="32Gi")
    svc = service["metadata"]["name"]
    # Pods get DNS names <job>-<index>.<subdomain>: the subdomain is the Service, which
    # selects them by the label the Job controller puts on its pods.
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert pod["subdomain"] == svc and service["metadata"]["namespace"] == "ml"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == nnodes

    (script,) = container["args"]
    assert container["command"] == ["sh", "-c"]
    subprocess.run(["sh", "-n"], input=script, text=True, check=True)  # parses as sh
    torchrun = " ".join(script.split("python -m torch.distributed.run", 1)[1]
                        .split("\n\n")[0].replace("\\\n", " ").split())
    assert f"--nnodes={nnodes} --nproc_per_node={gpus}" in torchrun
    assert "--rdzv_backend=c10d" in torchrun
    (endpoint,) = re.findall(r"--rdzv_endpoint=(\S+)", torchrun)
    assert endpoint == f"{job['metadata']['name']}-0.{svc}:29500"
    assert '--rdzv_id="$RDZV_ID"' in torchrun
    assert "-m tasks.training.worker" in torchrun
    env = effective_env(container)
    # One id per Job, the same on every pod: the Job's uid.
    assert env["RDZV_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['batch.kubernetes.io/controller-uid']"
    # Every pod is this one template, and the script changes no NCCL setting per pod.
    assert "NCCL" not in script and "export" not in script
    # The run directory is on the shared claim, at the same path on every pod.
    assert {v["name"]: v for v in pod["volumes"]}["loraflow-home"][
        "persistentVolumeClaim"]["claimName"] == "loraflow-home"


def test_the_multinode_job_and_the_pool_set_the_same_nccl_variables():
    names = set(NCCL_FIXED) | {"NCCL_DEBUG", "NCCL_SOCKET_IFNAME"}
    _, job = render_multinode(JOB="j", NAMESPACE="n", IMAGE="i", NNODES=2, GPUS_PER_POD=8,
                              PROFILE="p")
    multinode = effective_env(job["spec"]["template"]["spec"]["containers"][0])
    pool = effective_env(render_pool(MULTIGPU)["spec"]["template"]["spec"]["containers"][0])
    assert {n: multinode[n] for n in names} == {n: pool[n] for n in names}


def test_the_prepare_step_writes_what_the_train_worker_reads():
    """The pods' torchrun runs tasks.training.worker on RUN_DIR/launch.json: the prepare
    script writes it with the train step's own launch_inputs, as train_adapter does for
    its own torchrun, and the worker reads exactly what that function writes."""
    import inspect

    from profiles.loader import load_profile
    from tasks import train
    from tasks.contracts import DatasetManifest, PreflightReport, SnapshotManifest
    from tasks.training import worker as train_worker

    prepare = (DEPLOYMENTS_DIR / "k8s" / "prepare_launch.py").read_text()
    assert "launch_inputs(" in prepare
    assert "launch_inputs(" in inspect.getsource(train.train_adapter)
    snapshot = SnapshotManifest(repo_id="o/base", commit="0" * 40, local_dir="/base",
                                files={"config.json": {"size": 2, "sha256": "0" * 64}})
    dataset = DatasetManifest(path="/data", key="dataset-0", num_train=1, num_eval=0,
                              train_tokens=8)
    preflight = PreflightReport.model_validate({
        "user": "u", "target_repo": "o/adapter",
        "base_model": {"repo_id": "o/base", "revision": "main", "commit": "0" * 40,
                       "gated": False},
        "dataset": {"source": "file", "id": "d", "sha256": "0" * 64}})
    launch = train.launch_inputs(load_profile("quickstart"), preflight, snapshot, dataset)
    read = set(re.findall(r'inputs(?:\["|\.get\(")(\w+)"', inspect.getsource(train_worker)))
    assert read == set(launch)
    assert launch["run_dir"].endswith(train.train_key(load_profile("quickstart"), snapshot,
                                                      dataset))
    assert "deployments/k8s/prepare_launch.py" in MULTINODE.read_text()
