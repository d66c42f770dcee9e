"""deployments/ agrees with the presets, the flows and Prefect's own models (no server)."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from flows.deploy import (
    PREFECT_FILE,
    automation_payload,
    read_automations,
    read_deployments,
    read_work_pools,
)
from profiles.schema import Profile, presets_dir

PRESETS = sorted(p.stem for p in presets_dir().glob("*.yaml"))
DEPLOYMENTS = {d["name"]: d for d in read_deployments()}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_has_a_deployment_with_its_exact_profile(preset):
    deployment = DEPLOYMENTS[preset]
    assert deployment["entrypoint"] == "flows/finetune.py:finetune"
    assert deployment["enforce_parameter_schema"] is True
    assert deployment["parameters"]["profile_name"] == preset
    on_disk = yaml.safe_load((presets_dir() / f"{preset}.yaml").read_text())
    assert deployment["parameters"]["profile"] == on_disk
    Profile.model_validate(deployment["parameters"]["profile"])


def test_the_nightly_runs_a_preset_on_a_cron_schedule_one_at_a_time():
    (nightly,) = [d for d in DEPLOYMENTS.values() if d.get("schedules")]
    (schedule,) = nightly["schedules"]
    assert re.fullmatch(r"[\d*/,-]+ [\d*/,-]+ \* \* \*", schedule["cron"])
    preset = nightly["parameters"]["profile_name"]
    assert nightly["parameters"]["profile"] == DEPLOYMENTS[preset]["parameters"]["profile"]
    assert nightly["concurrency_limit"] == 1


def test_the_publish_deployment_runs_the_publish_flow():
    from flows.publish import publish_run

    publish = DEPLOYMENTS["on-approval"]
    assert publish["entrypoint"] == "flows/publish.py:publish_run"
    assert publish_run.name == "loraflow-publish"


def test_the_token_is_read_at_run_time_by_reference_only():
    config = yaml.safe_load(PREFECT_FILE.read_text())
    assert {"flows.deploy.load_hub_token": {"secret": "loraflow-hf-token"}} in config["pull"]
    for d in config["deployments"]:
        steps = d.get("pull", config["pull"])
        assert {"flows.deploy.load_hub_token": {"secret": "loraflow-hf-token"}} in steps
        assert "env" not in (d["work_pool"].get("job_variables") or {})
        assert "token" not in json.dumps(d["parameters"]).lower()


def _leaf_properties(schema: dict, defs: dict, path=""):
    for name, prop in schema.get("properties", {}).items():
        ref = prop.get("$ref") or next((a.get("$ref") for a in prop.get("anyOf", [])
                                        if "$ref" in a), None)
        if ref:
            yield f"{path}{name}", prop, defs[ref.rsplit("/", 1)[-1]]
            yield from _leaf_properties(defs[ref.rsplit("/", 1)[-1]], defs, f"{path}{name}.")
        else:
            yield f"{path}{name}", prop, None


def _form_schema(flow_path: str) -> dict:
    import importlib

    from prefect.utilities.callables import parameter_schema

    module, name = flow_path.split(":")
    return parameter_schema(getattr(importlib.import_module(module), name)).model_dump_for_openapi()


@pytest.mark.parametrize("flow_path", ["flows.finetune:finetune", "flows.publish:publish_run"])
def test_the_ui_form_has_a_description_for_every_field(flow_path):
    schema = _form_schema(flow_path)
    missing = [path for path, prop, ref in _leaf_properties(schema, schema["definitions"])
               if not (prop.get("description") or (ref or {}).get("description"))]
    assert missing == []


def test_the_ui_form_has_dropdowns_for_closed_choices():
    defs = _form_schema("flows.finetune:finetune")["definitions"]
    publish = defs["PublishSection"]["properties"]
    assert publish["when"]["enum"] == ["inline", "on_approval"]
    assert defs["QuantizationSection"]["properties"]["mode"]["enum"] == [
        "none", "nf4", "fp4", "int8"]


def test_work_pools_cover_one_machine_and_gpu_clusters():
    pools = {p["name"]: p for p in read_work_pools()}
    assert {p["type"] for p in pools.values()} == {"process", "docker", "kubernetes"}
    for pool in pools.values():
        template = pool["base_job_template"]
        used = set(re.findall(r"\{\{ *(\w+) *\}\}", json.dumps(template["job_configuration"])))
        assert used <= set(template["variables"]["properties"]), pool["name"]
    k8s = pools["loraflow-k8s"]["base_job_template"]
    container = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
        "containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    docker = pools["loraflow-docker"]["base_job_template"]["variables"]["properties"]
    (request,) = docker["container_create_kwargs"]["default"]["device_requests"]
    assert request["capabilities"] == [["gpu"]]
    used_pools = {d["work_pool"]["name"] for d in DEPLOYMENTS.values()}
    assert used_pools <= set(pools)


def test_automations_are_valid_prefect_automations():
    from prefect.events.schemas.automations import AutomationCore

    specs = read_automations()
    names = set()
    for spec in specs:
        automation = AutomationCore.model_validate(
            automation_payload(spec, {"loraflow-notify": "00000000-0000-0000-0000-000000000000"}))
        names.add(automation.name)
    assert names == {"loraflow-run-failed", "loraflow-version-published"}


def test_loraflow_deploy_refuses_without_a_server(monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["deploy"]) == 1
    err = capsys.readouterr().err
    assert "PREFECT_API_URL" in err and "prefect server start" in err
