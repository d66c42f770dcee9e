"""The run form Prefect builds for the finetune flow: no "type None" / "is a const" noise,
placeholders that survive the UI's Markdown, common fields before advanced ones — and the
values Prefect's own parameter validation accepts are still exactly the profile's.

The schema under test is Prefect's: `parameter_schema` of flows.finetune.finetune, what
`prefect deploy` stores as the deployment's parameter_openapi_schema and the UI renders.
"""
from __future__ import annotations

import re

import pytest

from profiles.loader import load_profile
from tasks.errors import ProfileError

# A `<word>` outside a Markdown code span: HTML to the UI's Markdown renderer, dropped.
BARE_PLACEHOLDER = re.compile(r"<[A-Za-z_][\w-]*>")
CODE_SPAN = re.compile(r"`[^`]*`")


@pytest.fixture(scope="module")
def schema() -> dict:
    from prefect.utilities.callables import parameter_schema

    from flows.finetune import finetune

    return parameter_schema(finetune.fn).model_dump_for_openapi()


def _nodes(node, path=""):
    """Every dict in the schema, with its path."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _nodes(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _nodes(value, f"{path}/{i}")


def _valid(schema: dict, profile: dict) -> bool:
    from prefect.utilities.schema_tools.validation import build_error_obj, validate

    errors = validate({"profile": profile, "profile_name": "x"}, schema, raise_on_error=False)
    return build_error_obj(errors)["valid"]


def test_no_null_typed_branch_and_no_const_for_the_form_to_render(schema):
    from prefect.utilities.schema_tools.validation import is_valid_schema

    is_valid_schema(schema)
    null_branches = [path for path, node in _nodes(schema) for branch in node.get("anyOf", [])
                     if isinstance(branch, dict) and branch.get("type") == "null"]
    consts = [path for path, node in _nodes(schema) if "const" in node]
    assert null_branches == [] and consts == []
    # The UI picks an input by `type`; a list of types is not a case it has.
    assert not [p for p, n in _nodes(schema) if isinstance(n.get("type"), list)]


def test_placeholders_are_in_code_spans(schema):
    descriptions = {path: node["description"] for path, node in _nodes(schema)
                    if isinstance(node.get("description"), str)}
    bare = {path: BARE_PLACEHOLDER.findall(CODE_SPAN.sub("", text))
            for path, text in descriptions.items()}
    assert {p: b for p, b in bare.items() if b} == {}
    merged = schema["definitions"]["PublishSection"]["properties"]["merged"]["description"]
    assert "`<repo_id>-merged`" in merged


def test_common_fields_come_before_advanced_ones(schema):
    defs = schema["definitions"]
    profile = defs["Profile"]["properties"]
    assert sorted(profile, key=lambda k: profile[k]["position"])[:3] == ["model", "data",
                                                                        "publish"]
    for name, section in defs.items():
        props = section.get("properties", {})
        ranked = sorted(props, key=lambda k: props[k]["position"])
        advanced = [k for k in ranked if props[k].get("title", "").startswith("Advanced: ")]
        assert ranked[len(ranked) - len(advanced):] == advanced, name
        assert sorted(props[k]["position"] for k in props) == list(range(len(props)))
    assert defs["ModelSection"]["properties"]["id"]["position"] == 0
    assert defs["TrainingSection"]["properties"]["seed"]["title"] == "Advanced: Seed"


def test_prefect_accepts_what_the_profile_accepts_and_refuses_what_it_refuses(schema):
    """Prefect's own parameter validation (server and UI) on the reshaped schema: a full
    profile with every optional field null, each shape of a union, and refusals."""
    full = load_profile("quickstart").model_dump(mode="json")
    nulls = {**full, "model": {**full["model"], "device_map": None, "max_memory": None},
             "lora": {**full["lora"], "exclude_modules": None},
             "training": {**full["training"], "max_steps": None, "eval_steps": None}}
    assert _valid(schema, full) and _valid(schema, nulls)
    for section, field, value in [("training", "liger_kernel", "auto"),
                                  ("training", "torch_compile", False),
                                  ("model", "device_map", "auto"),
                                  ("model", "device_map", {"": 0}),
                                  ("lora", "exclude_modules", ["lm_head"]),
                                  ("training", "report_to", ["tensorboard", "mlflow"])]:
        assert _valid(schema, {**full, section: {**full[section], field: value}}), field
    for section, field, value in [("training", "liger_kernel", "sometimes"),
                                  ("training", "max_steps", 0),
                                  ("model", "device_map", "gpu"),
                                  ("training", "report_to", ["neptune"]),
                                  ("training", "data_parallel", "zero3"),
                                  ("lora", "rank", 4)]:
        assert not _valid(schema, {**full, section: {**full[section], field: value}}), field


def test_new_training_fields_default_to_nothing_changing():
    profile = load_profile("quickstart")
    assert profile.training.report_to == [] and profile.training.data_parallel == "auto"
    p = load_profile("quickstart", ["training.report_to=[tensorboard, mlflow]",
                                    "training.data_parallel=fsdp"])
    assert (p.training.report_to, p.training.data_parallel) == (["tensorboard", "mlflow"],
                                                                "fsdp")


@pytest.mark.parametrize("overrides, field", [
    (["training.report_to=[comet]"], "training.report_to"),
    (["training.report_to=[mlflow, mlflow]"], "training.report_to"),
    (["training.data_parallel=zero3"], "training.data_parallel"),
    (["training.data_parallel=ddp", "training.launcher=single"], "training.data_parallel"),
    (["training.data_parallel=fsdp", "quantization.mode=nf4", "model.dtype=bfloat16"],
     "training.data_parallel"),
])
def test_new_training_fields_refuse_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ProfileError) as err:
        load_profile("quickstart", overrides)
    assert re.search(rf"{re.escape(field)}[.:]", str(err.value)) and "Fix" in str(err.value)
