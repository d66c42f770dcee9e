"""Every preset validates; bad input names the field, the cause and the fix."""
import subprocess
import sys
from pathlib import Path

import pytest

from profiles.loader import load_profile
from profiles.schema import Profile, presets_dir
from tasks.errors import ProfileError

PRESETS = sorted(p.stem for p in presets_dir().glob("*.yaml"))


def test_the_three_presets_exist():
    assert {"quickstart", "llama-3.2-1b-lora", "llama-3.1-8b-qlora"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_validates_and_says_how_to_run_it(name):
    profile = load_profile(name)
    assert isinstance(profile, Profile)
    header = (presets_dir() / f"{name}.yaml").read_text().splitlines()[:4]
    assert any("loraflow " in line for line in header if line.startswith("#"))


def test_every_field_has_a_description():
    def walk(model):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                yield from walk(ann)
            else:
                yield f"{model.__name__}.{name}", field.description

    missing = [name for name, desc in walk(Profile) if not desc]
    assert missing == []


def test_overrides_are_parsed_as_yaml():
    p = load_profile("quickstart", ["lora.r=4", "training.learning_rate=1e-3",
                                    "lora.target_modules=[q_proj, v_proj]"])
    assert (p.lora.r, p.training.learning_rate, p.lora.target_modules) == (4, 1e-3,
                                                                          ["q_proj", "v_proj"])


@pytest.mark.parametrize("override, field", [
    ("lora.r=0", "lora.r"),
    ("quantization.mode=nf8", "quantization.mode"),
    ("training.lerning_rate=1", "training.lerning_rate"),
    ("publish.repo_id=no-namespace", "publish.repo_id"),
    ("model.trust_remote_code=true", "model.trust_remote_code"),
])
def test_bad_field_is_named(override, field):
    with pytest.raises(ProfileError) as err:
        load_profile("quickstart", [override])
    assert field in str(err.value) and "Fix" in str(err.value)
    assert str(err.value).startswith(f"invalid profile: {field}")
    assert "\n" not in str(err.value)  # one bad field: one line


def test_several_bad_fields_get_one_line_each():
    with pytest.raises(ProfileError) as err:
        load_profile("quickstart", ["lora.r=0", "lora.rank=4"])
    heading, *lines = str(err.value).splitlines()
    assert heading == "invalid profile (2 fields):"
    assert [line.strip().split(":")[0] for line in lines] == ["lora.r", "lora.rank"]


def test_validate_cli_exits_non_zero_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = (presets_dir() / "quickstart.yaml").read_text().replace("r: 8", "r: -3")
    bad.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(bad)],
                          capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode != 0
    assert "lora.r" in proc.stderr and "greater than 0" in proc.stderr


def test_validate_cli_prints_the_resolved_profile():
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "validate", "quickstart",
                           "--set", "lora.r=4"], capture_output=True, text=True,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr
    assert "r: 4" in proc.stdout and "repo_id: loraflow-demo/tiny-llama-instruct-lora" in proc.stdout


@pytest.mark.parametrize("repo_id", ["user/my..adapter", "user/--x", "user/a--b", "user/x.git",
                                     "-user/x", "user/x-", "user/.x", "user/" + "x" * 97,
                                     "user/a b", "user/a/b", "no-namespace",
                                     "user/ok-name_1.2", "u/x", "Org.Name/A_b-c.d"])
@pytest.mark.parametrize("field", ["publish.repo_id", "model.id", "model.base_id"])
def test_repo_ids_follow_the_hubs_own_rule_on_the_field(field, repo_id):
    """Refused exactly when huggingface_hub's validate_repo_id refuses it (or it has no
    namespace), with the field named and a fix."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        hub_accepts = "/" in repo_id
    except HFValidationError:
        hub_accepts = False
    if hub_accepts:
        load_profile("quickstart", [f"{field}={repo_id}"])
        return
    with pytest.raises(ProfileError) as err:
        load_profile("quickstart", [f"{field}={repo_id}"])
    assert f"{field}: '{repo_id}'" in str(err.value) and "Fix:" in str(err.value)
