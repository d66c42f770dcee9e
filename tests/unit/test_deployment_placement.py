"""Deployments go where they belong (no server): GPU work on GPU pools, never on the CPU
quickstart pool; every pool a deployment names defined, and `loraflow deploy` refusing a
file that names one it would not create; the sweep deployment's parameters valid for the
sweep flow, with its variants on a deployment of the variant flow."""
from __future__ import annotations

import pytest
import yaml

from flows.deploy import (
    PREFECT_FILE,
    DeployError,
    deploy,
    missing_pools,
    read_deployments,
    read_work_pools,
)
from profiles.schema import Profile

DEPLOYMENTS = {d["name"]: d for d in read_deployments()}
POOLS = {p["name"]: p for p in read_work_pools()}
CPU_POOL = "loraflow-local"


def _needs_gpu(deployment: dict) -> bool:
    """A profile trained in bf16/fp16 or quantized: nothing a CPU worker should take."""
    profile = (deployment.get("parameters") or {}).get("profile")
    if profile is None:
        return False
    p = Profile.model_validate(profile)
    return p.model.dtype in ("bfloat16", "float16") or p.quantization.mode != "none"


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_gpu_deployments_are_tagged_and_never_on_the_cpu_pool(name):
    deployment = DEPLOYMENTS[name]
    gpu = "gpu" in deployment["tags"]
    assert gpu == _needs_gpu(deployment), name
    if gpu:
        assert deployment["work_pool"]["name"] != CPU_POOL, name
        assert deployment["work_pool"]["name"] in POOLS


def test_the_nightly_runs_on_the_gpu_process_pool():
    (nightly,) = [d for d in DEPLOYMENTS.values() if d.get("schedules")]
    assert nightly["work_pool"]["name"] == "loraflow-gpu"
    assert POOLS["loraflow-gpu"]["type"] == "process"


def test_every_pool_a_deployment_names_is_defined():
    assert missing_pools(list(DEPLOYMENTS.values()), list(POOLS.values())) == []


def test_deploy_refuses_a_deployment_on_an_undefined_pool(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    config = yaml.safe_load(PREFECT_FILE.read_text())
    config["deployments"][0]["work_pool"] = {"name": "loraflow-nowhere"}
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(config))
    # An unreachable API: the refusal comes before anything is asked of it.
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with pytest.raises(DeployError, match="loraflow-nowhere.*Fix:"):
            deploy(prefect_file=path)


def test_the_sweep_deployment_has_valid_parameters_and_a_variant_deployment():
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import build_error_obj, validate

    from flows.sweep import VARIANT_FLOW, sweep, train_variant

    deployment = DEPLOYMENTS["sweep"]
    assert deployment["entrypoint"] == "flows/sweep.py:sweep"
    schema = parameter_schema(sweep.fn).model_dump_for_openapi()
    params = deployment["parameters"]
    assert build_error_obj(validate(params, schema, raise_on_error=False))["valid"]
    bad = {**params, "grid": {"lora.r": 4}}  # a value, not a list of values
    assert not build_error_obj(validate(bad, schema, raise_on_error=False))["valid"]
    flow_name, name = params["variant_deployment"].split("/")
    assert flow_name == VARIANT_FLOW == train_variant.name
    assert DEPLOYMENTS[name]["entrypoint"] == "flows/sweep.py:train_variant"
