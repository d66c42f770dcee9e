"""Never redo work: content-keyed caching end to end, against localhub.

- A matrix that changes one input at a time and asserts which steps re-run.
- Two processes started together on one profile train once; the other reports cached.
- Several machines: artifacts on shared storage + a result-storage block; a second
  "host" (a new process with its own local Hub cache) finds every step cached, without
  importing torch or transformers.
- `loraflow cache ls` / `cache clear`.

Every run publishes to a repo of its own, so the other test modules' tags are untouched,
and uses a LORAFLOW_HOME of its own.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows.cli import main as cli_main
from flows.cli import run_profile
from profiles.loader import load_profile

REPO = Path(__file__).resolve().parents[2]
BASE = "tinylabs/tiny-llama"
CACHED_STEPS = ("download", "dataset", "train")


def _states(report) -> dict:
    assert report["status"] == "completed", report["error"]
    return {s: report["steps"][s]["state"] for s in CACHED_STEPS}


def _expect(**states) -> dict:
    return {s: states.get(s, "cached") for s in CACHED_STEPS}


def _env_for_process(hub, **extra) -> dict:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token("demo"),
           "HF_HUB_DISABLE_XET": "1", **{k: str(v) for k, v in extra.items()}}
    env.pop("PYTHONPATH", None)
    return env


def _cli_cmd(overrides) -> list[str]:
    cmd = [sys.executable, "-m", "flows.cli", "run", "quickstart", "--json"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


class _Env:
    """Set environment variables for a module-scoped fixture; restore them after."""

    def __init__(self, **values):
        self.values, self.saved = values, {}

    def __enter__(self):
        for k, v in self.values.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = str(v)
        return self

    def __exit__(self, *exc):
        for k, old in self.saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


# ---------------------------------------------------------------------------- matrix

@pytest.fixture(scope="module")
def matrix(hub, as_user, tmp_path_factory):
    """A LORAFLOW_HOME, a local dataset file, two extra base revisions (one with other
    weights, one with another tokenizer file) pushed by the seeded `owner`, and a
    function running the quickstart with overrides on top of the baseline's."""
    from huggingface_hub import HfApi, hf_hub_download
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("matrix")
    rows = root / "rows.jsonl"
    shutil.copy(hf_hub_download("tinylabs/tiny-instruct", "data/train.jsonl",
                                repo_type="dataset", cache_dir=root / "hf",
                                token=hub.token("demo")), rows)
    owner = HfApi(endpoint=hub.url, token=hub.token("owner"))
    main = hub.commit(BASE)
    revisions = {}
    for branch in ("weights-v2", "tokenizer-v2"):
        owner.create_branch(BASE, branch=branch, revision=main, exist_ok=True)
    weights = load_file(hf_hub_download(BASE, "model.safetensors", revision=main,
                                        cache_dir=root / "hf", token=hub.token("owner")))
    name = next(k for k in sorted(weights) if k.endswith("norm.weight"))
    weights[name] = weights[name] * 1.01
    save_file(weights, str(root / "model.safetensors"), metadata={"format": "pt"})
    revisions["weights-v2"] = owner.upload_file(
        path_or_fileobj=str(root / "model.safetensors"), path_in_repo="model.safetensors",
        repo_id=BASE, revision="weights-v2", commit_message="other weights").oid
    config = json.loads(Path(hf_hub_download(BASE, "tokenizer_config.json", revision=main,
                                             cache_dir=root / "hf",
                                             token=hub.token("owner"))).read_text())
    config["model_max_length"] = 4096
    revisions["tokenizer-v2"] = owner.upload_file(
        path_or_fileobj=json.dumps(config, indent=2).encode(),
        path_in_repo="tokenizer_config.json", repo_id=BASE, revision="tokenizer-v2",
        commit_message="tokenizer: longer model_max_length").oid

    baseline = ["training.max_steps=4", "training.save_steps=4", "training.logging_steps=2",
                f"data.dataset={rows}", "publish.repo_id=loraflow-demo/caching-matrix"]
    home = root / "loraflow"

    def run(*overrides):
        with as_user("demo"):
            return run_profile("quickstart",
                               load_profile("quickstart", baseline + list(overrides)))

    with _Env(LORAFLOW_HOME=home):
        yield {"run": run, "rows": rows, "root": root, "home": home, "baseline": baseline,
               "main": main, "revisions": revisions}


@pytest.fixture(scope="module")
def baseline_run(matrix):
    report = matrix["run"]()
    assert _states(report) == _expect(download="completed", dataset="completed",
                                      train="completed")
    return report


def test_same_inputs_again_every_step_cached(matrix, baseline_run):
    again = matrix["run"]()
    assert _states(again) == _expect()
    assert again["adapter"]["sha256"] == baseline_run["adapter"]["sha256"]
    assert again["hub"]["new_commit"] is False


@pytest.mark.parametrize("overrides, rerun", [
    (["lora.r=4"], {"train"}),
    (["training.learning_rate=0.001"], {"train"}),
    (["data.max_length=48"], {"dataset", "train"}),
    # Checkpoint cadence and the moving ref name are not inputs of the adapter:
    (["training.save_steps=2"], set()),
    (["model.revision=MAIN_SHA"], set()),
    (["model.revision=weights-v2"], {"download", "train"}),  # tokenizer files unchanged
    (["model.revision=tokenizer-v2"], {"download", "dataset", "train"}),
], ids=["lora.r", "learning_rate", "max_length", "save_steps", "revision-as-sha",
        "base-weights", "tokenizer-file"])
def test_changing_one_input_reruns_exactly_the_steps_downstream(matrix, baseline_run,
                                                                overrides, rerun):
    overrides = [o.replace("MAIN_SHA", matrix["main"]) for o in overrides]
    report = matrix["run"](*overrides)
    assert _states(report) == _expect(**dict.fromkeys(rerun, "completed")), overrides
    if "download" in rerun:
        assert report["base_model"]["commit"] != matrix["main"]


def test_dataset_file_is_keyed_by_its_bytes_not_its_path(matrix, baseline_run):
    moved = matrix["root"] / "elsewhere" / "same-rows.jsonl"
    moved.parent.mkdir(exist_ok=True)
    shutil.copy(matrix["rows"], moved)
    same = matrix["run"](f"data.dataset={moved}")
    assert _states(same) == _expect()
    lines = moved.read_text().splitlines()
    row = json.loads(lines[0])
    row["output"] = row["output"] + " Indeed."
    moved.write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
    edited = matrix["run"](f"data.dataset={moved}")
    assert _states(edited) == _expect(dataset="completed", train="completed")


def test_a_change_to_a_steps_helper_code_reruns_it_and_what_follows(matrix, baseline_run, hub,
                                                                     tmp_path):
    """The same run from a copy of the source tree in which tasks/dataset.py has one more
    helper: the copy is first on sys.path, so its code is what runs and what is hashed."""
    tree = tmp_path / "tree"
    for pkg in ("tasks", "profiles", "flows"):
        shutil.copytree(REPO / pkg, tree / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    dataset_py = tree / "tasks" / "dataset.py"
    source = dataset_py.read_text()
    assert "def format_example(" in source
    dataset_py.write_text(source.replace(
        "def format_example(",
        "def _normalize_newlines(text: str) -> str:\n    return text.replace('\\r\\n', '\\n')"
        "\n\n\ndef format_example(", 1))
    check = [sys.executable, "-c", "import tasks.dataset as d; print(d.__file__)"]
    where = subprocess.run(check, cwd=tree, env=_env_for_process(hub), capture_output=True,
                           text=True, timeout=120).stdout.strip()
    assert Path(where).resolve() == dataset_py.resolve()
    proc = subprocess.run(_cli_cmd(matrix["baseline"]), cwd=tree, timeout=400,
                          env=_env_for_process(hub, LORAFLOW_HOME=matrix["home"],
                                               PREFECT_HOME=tmp_path / "prefect"),
                          capture_output=True, text=True)
    report = _last_json(proc.stdout)
    assert _states(report) == _expect(dataset="completed", train="completed")


def test_cache_ls_and_clear(matrix, baseline_run, hub, capsys):
    assert cli_main(["cache", "ls", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    entries = listing["entries"]
    assert {e["step"] for e in entries} == set(CACHED_STEPS)
    assert all(e["state"] == "complete" and e["size_bytes"] > 0 and e["inputs"]
               for e in entries), [(e["key"], e["state"]) for e in entries]
    trains = [e for e in entries if e["step"] == "train"]
    assert {e["inputs"]["lora"]["r"] for e in trains} >= {4, 8}
    assert {e["inputs"]["base"]["commit"] for e in trains} >= {matrix["main"],
                                                              *matrix["revisions"].values()}
    assert hub.token("demo") not in json.dumps(listing)

    assert cli_main(["cache", "ls"]) == 0
    text = capsys.readouterr().out
    assert "lora r=4" in text and "complete" in text and "total" in text

    assert cli_main(["cache", "clear", "--step", "train", "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out
    assert all(Path(e["path"]).is_dir() for e in trains)

    assert cli_main(["cache", "clear", "--step", "train", "--json"]) == 0
    cleared = json.loads(capsys.readouterr().out)
    assert len(cleared["removed"]) == len(trains) and cleared["freed_bytes"] > 0
    assert not any(Path(e["path"]).exists() for e in trains)
    assert not any((matrix["home"] / "results" / e["key"]).exists() for e in trains)
    again = matrix["run"]()
    assert _states(again) == _expect(train="completed")


def test_cache_clear_rejects_an_unknown_step(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["cache", "clear", "--step", "publish"])
    assert exc.value.code == 2
    assert "invalid choice: 'publish'" in capsys.readouterr().err


# ----------------------------------------------------------------------- concurrency

def _stream(proc: subprocess.Popen, lines: list, start: float) -> None:
    for line in proc.stderr:
        lines.append((time.monotonic() - start, line.rstrip("\n")))


def test_two_processes_started_together_train_once(hub, tmp_path):
    home, prefect_home = tmp_path / "loraflow", tmp_path / "prefect"  # both shared
    overrides = ["training.max_steps=40", "training.save_steps=20",
                 "publish.repo_id=loraflow-demo/caching-concurrent"]
    env = _env_for_process(hub, LORAFLOW_HOME=home, PREFECT_HOME=prefect_home)
    # Create the shared Prefect database first: two ephemeral servers migrating one new
    # SQLite file at the same moment can crash one of them (Prefect's start-up, not
    # loraflow's caching, which is what this test is about).
    subprocess.run([sys.executable, "-c", "from prefect import flow\n"
                    "flow(name='warm-up')(lambda: None)()"], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=300)
    start = time.monotonic()
    procs = [subprocess.Popen(_cli_cmd(overrides), cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [[], []]
    readers = [threading.Thread(target=_stream, args=(p, log, start), daemon=True)
               for p, log in zip(procs, logs)]
    for r in readers:
        r.start()
    outs = [p.stdout.read() for p in procs]  # stderr belongs to the reader threads
    for p, r in zip(procs, readers):
        p.wait(timeout=500)
        r.join(timeout=10)
    assert all(out.strip() for out in outs), "a process printed no report:\n" + "\n".join(
        line for log in logs for _, line in log[-40:])
    reports = [_last_json(out) for out in outs]
    states = [_states(r) for r in reports]
    for step in CACHED_STEPS:  # one process computed each step, the other reused it
        assert sorted(s[step] for s in states) == ["cached", "completed"], states
    trainer = next(i for i in (0, 1) if states[i]["train"] == "completed")
    waiter = 1 - trainer
    # The trainings overlap in time: the waiter entered its train step before the
    # trainer finished, and left it only after (the step times are Prefect's: the task
    # run's creation and its final state, one clock for both processes).
    from datetime import datetime

    def when(report, edge):
        return datetime.fromisoformat(report["steps"]["train"][edge]).timestamp() - start0

    start0 = min(datetime.fromisoformat(r["steps"]["preflight"]["started"]).timestamp()
                 for r in reports)
    t_start = [when(r, "started") for r in reports]
    t_end = [when(r, "finished") for r in reports]
    print(f"train step (seconds after the first preflight): trainer {t_start[trainer]:.1f}–"
          f"{t_end[trainer]:.1f}, waiter {t_start[waiter]:.1f}–{t_end[waiter]:.1f}")
    assert t_start[waiter] < t_end[trainer] <= t_end[waiter] + 0.5, (t_start, t_end)
    assert t_start[trainer] < t_end[waiter]
    waited = reports[waiter]["steps"]["train"]["seconds"]
    assert waited > 1.0, reports[waiter]["steps"]
    # One training attempt in the shared run directory, the same adapter in both reports.
    from tasks.training.checkpoints import read_step_log

    (run_dir,) = list((home / "runs").iterdir())
    assert [e["event"] for e in read_step_log(run_dir)].count("start") == 1
    assert reports[0]["adapter"]["sha256"] == reports[1]["adapter"]["sha256"]
    assert not list((home / "locks").glob("*.lock"))


# -------------------------------------------------------------------- several hosts

NO_HEAVY_IMPORTS = """
import atexit, json, runpy, sys
heavy = ("torch", "transformers", "peft", "datasets", "bitsandbytes", "accelerate")
atexit.register(lambda: print("IMPORTED " + json.dumps(
    sorted(m for m in heavy if m in sys.modules)), file=sys.stderr, flush=True))
sys.argv = ["loraflow"] + sys.argv[1:]
runpy.run_module("flows.cli", run_name="__main__")
"""


def test_two_hosts_share_one_cache_through_shared_storage_and_a_result_block(
        hub, as_user, tmp_path, session_dir, monkeypatch):
    """Host A (this process) and host B (a new process with its own Hub cache) mount the
    same shared directory: LORAFLOW_HOME (artifacts, locks) on it, and Prefect result
    records in a LocalFileSystem block whose base path is on it. B finds every step
    cached and never imports torch."""
    from prefect.filesystems import LocalFileSystem

    shared = tmp_path / "shared-mount"
    LocalFileSystem(basepath=str(shared / "prefect-results")).save(
        "loraflow-test-shared", overwrite=True)
    config = {"LORAFLOW_HOME": str(shared / "loraflow"),
              "LORAFLOW_RESULT_STORAGE": "local-file-system/loraflow-test-shared"}
    for k, v in config.items():
        monkeypatch.setenv(k, v)
    overrides = ["training.max_steps=4", "publish.repo_id=loraflow-demo/caching-shared"]
    with as_user("demo"):
        a = run_profile("quickstart", load_profile("quickstart", overrides))
    assert _states(a) == _expect(download="completed", dataset="completed", train="completed")
    records = {p.name.split("-")[0] for p in (shared / "prefect-results").iterdir()}
    assert set(CACHED_STEPS) <= records
    assert not (shared / "loraflow" / "results").exists()

    cmd = [sys.executable, "-c", NO_HEAVY_IMPORTS, "run", "quickstart", "--json"]
    for o in overrides:
        cmd += ["--set", o]
    env = _env_for_process(hub, HF_HOME=tmp_path / "host-b-hf-home",
                           PREFECT_HOME=session_dir / "prefect", **config)
    b = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    report = _last_json(b.stdout)
    assert _states(report) == _expect(), report["steps"]
    assert report["steps"]["verify"]["state"] == "cached"
    assert report["adapter"]["sha256"] == a["adapter"]["sha256"]
    imported = json.loads(next(line for line in b.stderr.splitlines()
                               if line.startswith("IMPORTED "))[len("IMPORTED "):])
    assert imported == [], imported
    token = hub.token("demo").encode()  # never in keys, records, manifests, locks or logs
    assert token not in b.stdout.encode() + b.stderr.encode()
    assert not [p for p in shared.rglob("*") if p.is_file() and token in p.read_bytes()]
