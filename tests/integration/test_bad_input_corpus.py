"""Bad input beyond data files: profiles, `--set`, the environment and Hub states.

Every case runs the real CLI in-process (`flows.cli.main([...])`) against the session's
localhub, in one LORAFLOW_HOME shared by the cases, and asserts: a non-zero exit, the
field, setting or file named with a fix, no traceback anywhere (the CLI's own output and
every record of Prefect's loggers, as the console and the UI would show them), nothing
pushed (the target repo does not exist, or its head did not move) and nothing cached (no
new entry under LORAFLOW_HOME's downloads, datasets, runs or results). The dataset cases
are in test_bad_data.py; docs/bad-input.md lists both.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path

import pytest
from homes import loraflow_home  # tests/

import flows.finetune  # noqa: F401 — Prefect configures its loggers at import, not mid-case
from flows.cli import main as cli_main

REPO = "loraflow-demo/bad-input-never-published"
PUBLIC_REPO = "loraflow-demo/bad-input-public"
CACHE_DIRS = ("downloads", "datasets", "runs", "results")
BERT = ["model.id=tinylabs/tiny-bert", "model.task=seq-classification",
        "data.format=text-label", "data.max_length=32"]


@pytest.fixture(scope="module")
def own_home(session_dir):
    with loraflow_home(session_dir / "loraflow-bad-input") as home:
        yield home


class _Records(logging.Handler):
    """Every record Prefect's loggers emit, formatted as a console handler would,
    traceback included (so a traceback that reaches any handler is seen here)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cached(home: Path) -> set[str]:
    return {str(p.relative_to(home)) for d in CACHE_DIRS if (home / d).exists()
            for p in (home / d).rglob("*")}


def _cli(args: list[str], user: str | None, as_user, env: dict | None = None):
    """(exit code, stdout, stderr, Prefect's log lines) of `loraflow ARGS` in-process."""
    out, err, records = io.StringIO(), io.StringIO(), _Records()
    prefect_logger = logging.getLogger("prefect")
    prefect_logger.addHandler(records)
    try:
        with as_user(user), _env(**(env or {})), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            code = cli_main(args)
    finally:
        prefect_logger.removeHandler(records)
    return code, out.getvalue(), err.getvalue(), records.lines


def _no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text and 'File "' not in text, text


# ----------------------------------------------------------------- refused before a run
# name → (extra CLI args after `run quickstart`, text the one error must contain)
START_CASES = {
    "profile-unknown-field": (["--set", "lora.rank=8"], ["lora.rank: unknown field", "Fix:"]),
    "profile-wrong-type": (["--set", "training.max_steps=many"],
                           ["training.max_steps:", "'many'", "Fix:"]),
    "profile-bad-choice": (["--set", "model.dtype=float13"],
                           ["model.dtype:", "'bfloat16'", "Fix:"]),
    "profile-conflict-packing": (["--set", "training.packing=true",
                                  "model.task=seq-classification"],
                                 ["training.packing: packing is for causal-lm", "Fix:"]),
    "profile-conflict-remote-code": (["--set", "model.trust_remote_code=true"],
                                     ["model.trust_remote_code:", "pinned", "Fix:"]),
    "profile-conflict-eval": (["--set", "training.eval_steps=5", "data.eval_split=0"],
                              ["training.eval_steps:", "Fix:"]),
    "profile-bad-repo-id": (["--set", "publish.repo_id=user/my..adapter"],
                            ["publish.repo_id:", "'user/my..adapter'", "Fix:"]),
    "set-bool-for-int": (["--set", "lora.r=true"],
                         ["lora.r: true is a boolean where a number is expected", "Fix:"]),
    "set-bool-for-float": (["--set", "training.learning_rate=yes"],
                           ["training.learning_rate: true is a boolean", "Fix:"]),
    "set-not-yaml": (["--set", "data.dataset=[a"],
                     ["--set 'data.dataset=[a'", "not valid YAML", "Fix:"]),
    "set-no-equals": (["--set", "lora.r"], ["--set 'lora.r'", "section.key=value", "Fix:"]),
    "set-no-section": (["--set", "r=4"], ["--set 'r=4'", "not section.key", "Fix:"]),
    "set-into-a-value": (["--set", "lora.r.x=1"], ["--set 'lora.r.x=1'", "'r' is a value",
                                                   "Fix:"]),
    "set-second-pair-bad": (["--set", "lora.r=4", "lora.alpha=high"],
                            ["lora.alpha:", "'high'", "Fix:"]),
}


@pytest.mark.parametrize("case", list(START_CASES))
def test_bad_profile_or_set_is_refused_before_the_run(case, hub, as_user, own_home):
    extra, needles = START_CASES[case]
    before = _cached(own_home)
    target = [] if "publish.repo_id" in " ".join(extra) else ["--set", f"publish.repo_id={REPO}"]
    code, out, err, logs = _cli(["run", "quickstart", *extra, *target], "demo", as_user)
    assert code == 2, (out, err)
    print(f"\n[{case}] {err.strip()}")  # docs/bad-input.md quotes it
    assert err.startswith("loraflow: ") and out == "", (out, err)
    assert len(err.strip().splitlines()) == 1, err  # the README's one line
    for needle in needles:
        assert needle in err, err
    _no_traceback(out, err, *logs)
    assert not any("Flow run" in line for line in logs), logs  # no run started
    assert _cached(own_home) == before
    _assert_not_pushed(hub)


def test_bad_profile_files_are_named(hub, as_user, own_home, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  id: tinylabs/tiny-llama\n lora: [\n")
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n- lora\n")
    for path, needle in [(broken, "not valid YAML"), (listed, "expected a mapping"),
                         (tmp_path / "nope.yaml", "no such file or preset")]:
        code, out, err, logs = _cli(["run", str(path)], "demo", as_user)
        assert code == 2 and str(path.name) in err and needle in err, err
        assert "Fix" in err, err
        _no_traceback(out, err, *logs)


def test_the_readme_set_form_takes_several_pairs(hub, as_user):
    """`--set a.b=1 c.d=2` (one --set, several pairs) and a repeated --set both apply."""
    import yaml

    for args in (["quickstart", "--set", "lora.r=4", "lora.alpha=16",
                  "--set", "training.max_steps=3"],
                 ["--set", "lora.r=4", "lora.alpha=16", "training.max_steps=3", "quickstart"]):
        code, out, err, _ = _cli(["validate", *args], "demo", as_user)
        assert code == 0, err
        resolved = yaml.safe_load(out)
        assert (resolved["lora"]["r"], resolved["lora"]["alpha"],
                resolved["training"]["max_steps"]) == (4, 16, 3)


# ---------------------------------------------------------- environment and Hub states

def _run_json(args: list[str], user: str | None, as_user, env: dict | None = None):
    code, out, err, logs = _cli(["run", "quickstart", "--json", "--set",
                                 f"publish.repo_id={REPO}", "data.eval_split=0",
                                 "training.max_steps=2", *args], user, as_user, env)
    report = json.loads(out.strip().splitlines()[-1])
    return code, report, out, err, logs


def _assert_not_pushed(hub) -> None:
    from huggingface_hub import HfApi

    assert not HfApi(endpoint=hub.url, token=hub.token("demo")).repo_exists(REPO)


# name → (user, env, extra --set pairs, error type, texts the message must contain)
RUN_CASES = {
    "env-no-token": (None, {}, [], "MissingTokenError", ["HF_TOKEN", "Fix:"]),
    "env-invalid-token": ("demo", {"HF_TOKEN": "hf_" + "x" * 34}, [], "InvalidTokenError",
                          ["HF_TOKEN", "401", "Fix:"]),
    "env-home-is-a-file": ("demo", {"LORAFLOW_HOME": "{tmp}/home-file"}, [], "SettingsError",
                           ["LORAFLOW_HOME={tmp}/home-file", "cannot write", "Fix:"]),
    "env-home-under-a-file": ("demo", {"LORAFLOW_HOME": "{tmp}/home-file/sub"}, [],
                              "SettingsError", ["LORAFLOW_HOME={tmp}/home-file/sub",
                                                "cannot write", "Fix:"]),
    "env-result-storage-url": ("demo", {"LORAFLOW_RESULT_STORAGE": "s3://bucket/results"}, [],
                               "SettingsError", ["LORAFLOW_RESULT_STORAGE='s3://bucket/results'",
                                                 "Fix:"]),
    "env-result-storage-no-block": ("demo", {"LORAFLOW_RESULT_STORAGE":
                                             "local-file-system/no-such-block"}, [],
                                    "SettingsError", ["LORAFLOW_RESULT_STORAGE=",
                                                      "no saved Prefect block", "Fix:"]),
    "env-lock-lease-not-a-number": ("demo", {"LORAFLOW_LOCK_LEASE_S": "soon"}, [],
                                    "SettingsError", ["LORAFLOW_LOCK_LEASE_S='soon'", "Fix:"]),
    "hub-gated": ("reader", {}, [], "GatedRepoError", ["tinylabs/tiny-llama", "request access",
                                                       "Fix:"]),
    "hub-missing-model": ("demo", {}, ["model.id=tinylabs/no-such-model"], "RepoNotFoundError",
                          ["tinylabs/no-such-model", "model.id", "Fix:"]),
    "hub-missing-revision": ("demo", {}, ["model.revision=no-such-branch"],
                             "RevisionNotFoundError", ["'no-such-branch'", "model.revision",
                                                       "Fix:"]),
    "hub-missing-dataset": ("demo", {}, ["data.dataset=tinylabs/no-such-data"],
                            "RepoNotFoundError", ["tinylabs/no-such-data", "data.dataset",
                                                  "Fix:"]),
    "hub-read-only-token-publish": ("reader", {}, BERT, "WritePermissionError",
                                    ["publish.repo_id:", "read-only token", "Fix:"]),
    "hub-other-namespace-publish": ("demo", {}, ["publish.repo_id=tinylabs/not-mine"],
                                    "WritePermissionError",
                                    ["publish.repo_id:", "'tinylabs'", "Fix:"]),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_bad_environment_or_hub_state_fails_the_run_in_one_line(case, hub, as_user, own_home,
                                                                 tmp_path):
    user, env, extra, error_type, needles = RUN_CASES[case]
    (tmp_path / "home-file").write_text("not a directory\n")
    env = {k: v.replace("{tmp}", str(tmp_path)) for k, v in env.items()}
    needles = [n.replace("{tmp}", str(tmp_path)) for n in needles]
    before = _cached(own_home)
    code, report, out, err, logs = _run_json(extra, user, as_user, env)
    assert code == 1, report
    assert report["status"] == "failed" and report["steps"]["train"]["state"] == "skipped"
    error = report["error"]
    print(f"\n[{case}] {error['type']}: {error['message']}")  # docs/bad-input.md quotes it
    assert error["type"] == error_type, error
    for needle in needles:
        assert needle in error["message"], error["message"]
    assert "\n" not in error["message"]
    _no_traceback(out, err, *logs, error["message"])
    # The run's own end state carries the same one line (what the UI shows).
    assert any("Finished in state Failed(" in line and f"{error_type}: " in line
               for line in logs), logs
    assert _cached(own_home) == before
    _assert_not_pushed(hub)


def test_private_adapter_into_an_existing_public_repo_is_refused(hub, as_user, own_home):
    """publish.private true (the default) and the repo exists as public: refused at
    publish, the repo's head unchanged; the trained run is kept for a re-publish."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=hub.token("demo"))
    api.create_repo(PUBLIC_REPO, private=False, exist_ok=True)
    head = api.model_info(PUBLIC_REPO).sha
    code, out, err, logs = _cli(["run", "quickstart", "--json", "--set",
                                 f"publish.repo_id={PUBLIC_REPO}", "data.eval_split=0",
                                 "training.max_steps=2"], "demo", as_user)
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 1 and report["steps"]["publish"]["state"] == "failed", report
    message = report["error"]["message"]
    assert message.startswith("publish.private: ") and PUBLIC_REPO in message \
        and "Fix:" in message, message
    _no_traceback(out, err, *logs, message)
    assert api.model_info(PUBLIC_REPO).sha == head
    assert [t.name for t in api.list_repo_refs(PUBLIC_REPO).tags] == []


def test_debug_shows_the_tracebacks_that_are_otherwise_left_out(hub, as_user, own_home):
    """`loraflow --debug`: the same typed error, now with Prefect's tracebacks (so the
    assertions above see a traceback whenever one reaches a log handler)."""
    try:
        code, out, err, logs = _cli(["--debug", "run", "quickstart", "--json", "--set",
                                     f"publish.repo_id={REPO}",
                                     "model.id=tinylabs/no-such-model"], "demo", as_user)
    finally:
        os.environ.pop("LORAFLOW_DEBUG", None)
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 1 and report["error"]["type"] == "RepoNotFoundError", report
    assert any("Traceback" in line for line in logs), logs
