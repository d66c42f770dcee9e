"""What a training stores depends on its key alone; where it is published is said at
publish time — through the real flow, CLI and clients against localhub.

- Two runs with one train key but other publish sections and profile names, each in a
  fresh LORAFLOW_HOME, leave byte-identical training outputs (apart from the listed
  per-run fields), and nothing of publish.* in them.
- An approval of a cached training publishes where the approval names, creating it.
- Repo ids are checked with huggingface_hub's own rule on the field, for every command.
- A seq-classification adapter on a base without a pad token, published with the
  tokenizer training used: the card's own loading snippet runs a batch of two.
- After a resume, train_loss is the mean over every step, not only those after it.
- Two versions in one repo: the card of the first, loaded by its tag, loads the first
  version through its snippet and every one-call line it shows (the main branch holding
  the second); the loading path it warns about fails as it says; `pipeline` generates
  from the adapter repo alone.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from flows.cli import main as cli_main
from flows.cli import run_profile
from profiles.loader import load_profile
from tasks.train import PER_RUN_FIELDS, PER_RUN_FILES

STEPS = ["training.max_steps=6", "training.save_steps=3", "training.logging_steps=2"]
FIRST = {"name": "quickstart", "repo": "loraflow-demo/outputs-first",
         "publish": ["publish.when=on_approval"]}
SECOND = {"name": "renamed-profile", "repo": "loraflow-demo/outputs-second",
          "publish": ["publish.when=on_approval", "publish.private=false", "publish.tag=x1",
                      "publish.license=mit"]}


@contextmanager
def _home(path: Path):
    """LORAFLOW_HOME set to `path` for the duration."""
    old = os.environ.get("LORAFLOW_HOME")
    os.environ["LORAFLOW_HOME"] = str(path)
    try:
        yield path
    finally:
        os.environ["LORAFLOW_HOME"] = old


def _run(as_user, name: str, overrides: list[str]) -> dict:
    with as_user("demo"):
        return run_profile(name, load_profile("quickstart", overrides))


def _api(hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=hub.token("demo"))


def _without(record: dict, dotted: tuple[str, ...]) -> dict:
    record = json.loads(json.dumps(record))
    for path in dotted:
        *parents, leaf = path.split(".")
        node = record
        for p in parents:
            node = node[p]
        node.pop(leaf)
    return record


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): _training_bytes(p)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _training_bytes(path: Path) -> bytes:
    """The file's bytes; for a checkpoint's rng_state.pth (Trainer's saved Python, numpy
    and torch generator states), the numpy and torch states only: Python's global
    `random` is shared with every library in the process (Prefect's service loops draw
    jittered sleeps from it), so its state at a checkpoint is not a training output."""
    if path.name != "rng_state.pth":
        return path.read_bytes()
    state = torch.load(path, weights_only=False)  # our own file: numpy arrays inside
    kind, keys, *position = state["numpy"]
    return pickle.dumps((kind, keys.tobytes(), position, state["cpu"].numpy().tobytes()))


@pytest.fixture(scope="module")
def two_runs(hub, as_user, tmp_path_factory):
    """The same training twice, each in a fresh LORAFLOW_HOME at one path (the first is
    moved aside before the second starts: files that name the home's path, like a
    checkpoint's training_args, compare equal), with other publish.* and another
    profile name. Returns the two run directories and the second run's report."""
    root = tmp_path_factory.mktemp("homes")
    home, reports = root / "home", []
    for spec in (FIRST, SECOND):
        if home.exists():
            home.rename(root / "first")
        with _home(home):
            report = _run(as_user, spec["name"],
                          [f"publish.repo_id={spec['repo']}", *STEPS, *spec["publish"]])
        assert report["status"] == "completed", report["error"]
        assert report["steps"]["train"]["state"] == "completed"
        reports.append(report)
    key = Path(reports[1]["adapter"]["path"]).parent.name
    assert Path(reports[0]["adapter"]["path"]).parent.name == key  # one train key
    return [root / "first" / "runs" / key, home / "runs" / key], reports[1]


def _manifest_without_per_run(data: bytes) -> dict:
    """The run's manifest.json less what it says of per-run data: the record's hash and
    every file's mtime."""
    manifest = json.loads(data)
    manifest["files"].pop("record.json")
    for entry in manifest["files"].values():
        entry.pop("mtime_ns", None)
    return manifest


def test_training_outputs_depend_only_on_the_train_key(two_runs):
    dirs, _ = two_runs
    files = [_files(d) for d in dirs]
    assert set(files[0]) == set(files[1])
    assert "adapter/adapter_model.safetensors" in files[0]
    assert "adapter/tokenizer_config.json" in files[0]
    records = [json.loads(f.pop("record.json")) for f in files]
    assert records[0]["flow_run_id"] != records[1]["flow_run_id"]
    assert _without(records[0], PER_RUN_FIELDS) == _without(records[1], PER_RUN_FIELDS)
    manifests = [_manifest_without_per_run(f.pop("manifest.json")) for f in files]
    assert manifests[0] == manifests[1]
    for f in files:
        for name in PER_RUN_FILES:
            f.pop(name)
    differing = [name for name in files[0] if files[0][name] != files[1][name]]
    assert differing == [], differing
    # Nothing of publish.*, nor the profile's name, in what training stored.
    for d in dirs:
        for name, data in _files(d).items():
            for spec in (FIRST, SECOND):
                assert spec["repo"].encode() not in data, name
                assert spec["repo"].split("/")[1].encode() not in data, name
            assert b"renamed-profile" not in data, name
    assert "publish" not in records[0]["profile"]


def test_approving_a_cached_training_publishes_where_the_approval_says(two_runs, hub,
                                                                       as_user, tmp_path,
                                                                       capsys):
    """The second request is a cache hit of a training asked for another repo: the
    approval publishes where the request (then the command) names, and creates it."""
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import RepositoryNotFoundError

    wanted, elsewhere = "loraflow-demo/approved-here", "loraflow-demo/approved-elsewhere"
    home = two_runs[0][1].parents[1]
    with _home(home):
        report = _run(as_user, "quickstart", [f"publish.repo_id={wanted}", *STEPS,
                                              "publish.when=on_approval"])
        assert report["status"] == "completed", report["error"]
        assert report["steps"]["train"]["state"] == "cached"
        run_dir = str(Path(report["adapter"]["path"]).parent)
        assert report["approval"]["repo_id"] == wanted
        assert f"--set publish.repo_id={wanted}" in report["approval"]["command"]
        with pytest.raises(RepositoryNotFoundError):
            _api(hub).model_info(wanted)
        with as_user("demo"):
            assert cli_main(["publish", run_dir, "--json"]) == 0
            first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            assert cli_main(["publish", run_dir, "--set", f"publish.repo_id={elsewhere}",
                             "--json"]) == 0
            second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (first["repo_id"], second["repo_id"]) == (wanted, elsewhere)
    for repo, result in ((wanted, first), (elsewhere, second)):
        files = set(_api(hub).list_repo_files(repo, revision=result["commit"]))
        assert {"adapter_model.safetensors", "README.md", "loraflow.json",
                "tokenizer_config.json"} <= files
        card = ModelCard.load(repo, token=hub.token("demo"))
        assert card.data.model_name == repo and re.search(
            rf'PeftModel.from_pretrained\(base, "{repo}"(, revision="v\d+")?\)', card.text)
    for never in (FIRST["repo"], SECOND["repo"]):
        with pytest.raises(RepositoryNotFoundError):
            _api(hub).model_info(never)

    # The tokenizer travels with the adapter: the adapter repo alone gives a tokenizer and
    # a text-generation pipeline; the card's snippet generates for a batch of two.
    from transformers import AutoTokenizer, pipeline

    with as_user("demo"):
        tokenizer = AutoTokenizer.from_pretrained(wanted)
        base_tokenizer = AutoTokenizer.from_pretrained("tinylabs/tiny-llama")
        assert tokenizer.pad_token == base_tokenizer.pad_token
        assert tokenizer.chat_template == base_tokenizer.chat_template
        generator = pipeline("text-generation", model=wanted)
        out = generator("Below is an instruction", max_new_tokens=4, do_sample=False)
        assert out[0]["generated_text"].startswith("Below is an instruction")
        scope: dict = {}
        exec(_card_snippet(ModelCard.load(wanted, token=hub.token("demo")).text), scope)
    assert scope["output"].shape[0] == 2


def _card_snippet(card_text: str) -> str:
    """The card's loading snippet: its first python code block."""
    return re.search(r"```python\n(.+?)```", card_text, re.S).group(1)


@pytest.mark.parametrize("bad", ["loraflow-demo/my..adapter", "loraflow-demo/--x",
                                 "loraflow-demo/x.git", "no-namespace", "-demo/x"])
def test_run_refuses_a_repo_id_the_hub_rejects_before_anything_runs(bad, hub, as_user,
                                                                    capsys):
    before = len(hub.requests())
    with as_user("demo"):
        code = cli_main(["run", "quickstart", "--set", f"publish.repo_id={bad}"])
    err = capsys.readouterr().err
    assert code != 0
    assert "publish.repo_id:" in err and "Fix:" in err and bad in err
    assert "Traceback" not in err
    assert len(hub.requests()) == before  # nothing ran: not even preflight


def test_publish_and_sweep_refuse_bad_repo_ids(two_runs, hub, as_user, capsys):
    run_dir = str(two_runs[0][1])
    before = len(hub.requests())
    with as_user("demo"):
        code = cli_main(["publish", run_dir, "--set", "publish.repo_id=loraflow-demo/a..b"])
    err = capsys.readouterr().err
    assert code != 0 and "publish.repo_id:" in err and "Fix:" in err
    # A sweep publishing every variant to <repo_id>-<variant>: the derived names are checked
    # too (here the name is at the Hub's 96-character limit without the suffix).
    longest = "loraflow-demo/" + "x" * 96
    with as_user("demo"):
        code = cli_main(["sweep", "quickstart", "--grid", "lora.r=4,8", "--publish", "all",
                         "--set", f"publish.repo_id={longest}"])
    err = capsys.readouterr().err
    assert code != 0 and "publish.repo_id:" in err and f"{longest}-r4" in err
    assert len(hub.requests()) == before


def test_model_ids_and_deployment_parameters_are_checked_on_the_field():
    """model.id / model.base_id refuse what the Hub refuses; a deployment's parameters
    are refused by the same rule through Prefect's own parameter validation (the JSON
    schema the UI and API check)."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import (
        build_error_obj,
        is_valid_schema,
        validate,
    )

    from flows.finetune import finetune
    from tasks.errors import ProfileError

    for field in ("model.id", "model.base_id"):
        with pytest.raises(ProfileError, match=rf"{re.escape(field)}: .*Fix:"):
            load_profile("quickstart", [f"{field}=tinylabs/tiny..llama"])
    # The schema a deployment of the flow stores (what `prefect deploy` computes).
    schema = parameter_schema(finetune.fn).model_dump_for_openapi()
    is_valid_schema(schema)
    good = load_profile("quickstart").model_dump(mode="json")
    assert build_error_obj(validate({"profile": good}, schema, raise_on_error=False))["valid"]
    bad = {**good, "publish": {**good["publish"], "repo_id": "loraflow-demo/my..adapter"}}
    assert not build_error_obj(validate({"profile": bad}, schema,
                                        raise_on_error=False))["valid"]


def test_resumed_train_loss_is_the_mean_over_every_step(hub, as_user, tmp_path):
    """Resume a finished training from its middle checkpoint (what a kill after it
    leaves): the reported train_loss equals the uninterrupted run's."""
    with _home(tmp_path / "home"):
        overrides = ["publish.repo_id=loraflow-demo/resume-loss", *STEPS,
                     "training.save_total_limit=3", "publish.when=on_approval"]
        first = _run(as_user, "quickstart", overrides)
        assert first["status"] == "completed", first["error"]
        run_dir = Path(first["adapter"]["path"]).parent
        shutil.rmtree(run_dir / "checkpoints" / "checkpoint-6")
        shutil.rmtree(run_dir / "adapter")
        (run_dir / "manifest.json").unlink()
        (run_dir / "record.json").unlink()
        again = _run(as_user, "quickstart", overrides)
    assert again["status"] == "completed", again["error"]
    assert again["steps"]["train"]["state"] == "completed"
    assert again["metrics"]["resumed_from"] == "checkpoint-3"
    assert again["metrics"]["train_loss"] == pytest.approx(first["metrics"]["train_loss"],
                                                          rel=1e-4)


@pytest.fixture(scope="module")
def padless_base(hub, tmp_path_factory) -> str:
    """A tiny Llama whose tokenizer and config define no pad token (as Llama-3 and
    GPT-2 ship), uploaded to localhub with the plain client."""
    from localhub import seed_data

    repo = "loraflow-demo/padless-llama"
    files = seed_data.model_files()
    tok_config = json.loads(files["tokenizer_config.json"])
    tok_config.pop("pad_token")
    config = json.loads(files["config.json"])
    config["pad_token_id"] = None
    special = json.loads(files["special_tokens_map.json"])
    special.pop("pad_token", None)
    files.update({"tokenizer_config.json": json.dumps(tok_config).encode(),
                  "config.json": json.dumps(config).encode(),
                  "special_tokens_map.json": json.dumps(special).encode()})
    folder = tmp_path_factory.mktemp("padless")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    api = _api(hub)
    api.create_repo(repo, private=True, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    return repo


def test_seq_classification_on_a_padless_base_works_batched_from_the_card(
        padless_base, hub, as_user, tmp_path, capsys):
    """Fault 11: the pad token training chose (EOS) travels with the adapter, and the
    card's own snippet classifies a batch of two of different lengths, each row as it
    would alone. A local dataset is named in the card by its file name only; the run's
    summary and the card say how many rows were read."""
    import torch
    from huggingface_hub import ModelCard, hf_hub_download
    from transformers import AutoTokenizer

    from localhub import seed_models

    with as_user("demo"):
        assert AutoTokenizer.from_pretrained(padless_base).pad_token is None
    data = tmp_path / "colors.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in seed_models.classification_rows()[:96]))
    repo = "loraflow-demo/padless-classifier"
    overrides = [f"model.id={padless_base}", "model.task=seq-classification",
                 "data.format=text-label", f"data.dataset={data}", "data.max_length=32",
                 "data.eval_split=0.1", "training.max_steps=8", "training.logging_steps=2",
                 f"publish.repo_id={repo}"]
    with _home(tmp_path / "home"), as_user("demo"):
        code = cli_main(["run", "quickstart", *[a for o in overrides for a in ("--set", o)]])
    summary = capsys.readouterr().out
    assert code == 0, summary
    assert "Data: 96 rows read" in summary  # the rows the file holds
    with as_user("demo"):
        tokenizer = AutoTokenizer.from_pretrained(repo)
        card = ModelCard.load(repo, token=hub.token("demo"))
        lineage = Path(hf_hub_download(repo, "loraflow.json")).read_text()
        scope: dict = {}
        exec(_card_snippet(card.text), scope)
    assert tokenizer.pad_token == tokenizer.eos_token  # what training padded with
    texts = ["a first example", "a second example, a little longer"]
    batch = scope["logits"]
    assert batch.shape[0] == 2
    with torch.no_grad():
        alone = torch.cat([scope["model"](**tokenizer([t], return_tensors="pt")).logits
                           for t in texts])
    assert torch.allclose(batch, alone, atol=1e-5), (batch, alone)
    assert str(tmp_path) not in card.text and "96 rows read" in card.text
    assert str(tmp_path) not in lineage and "colors.jsonl" in lineage  # by name, not path
    assert card.data.eval_results[0].dataset_name == "colors.jsonl"


def _lora_weights(model) -> dict:
    """The model's LoRA tensors by a name every loading path shares (from `layers.`,
    without the adapter's name): a PeftModel's, or a transformers model's with an
    adapter loaded."""
    return {re.sub(r"\.default\.", ".", name[name.index("layers."):]): p.detach().clone()
            for name, p in model.named_parameters() if ".lora_" in name}


def _file_weights(path: str) -> dict:
    from safetensors.torch import load_file

    return {name[name.index("layers."):]: t for name, t in load_file(path).items()}


def _same(loaded: dict, saved: dict) -> bool:
    import torch

    return set(loaded) == set(saved) and all(torch.equal(loaded[k].float(), saved[k].float())
                                             for k in saved)


def test_the_cards_snippets_load_the_version_of_its_tag(hub, as_user, tmp_path):
    import transformers
    from huggingface_hub import hf_hub_download

    repo = "loraflow-demo/two-versions"
    with _home(tmp_path / "home"):
        for tag, lr in (("t1", "2e-4"), ("t2", "1e-3")):  # two trainings, two adapters
            report = _run(as_user, "quickstart", [f"publish.repo_id={repo}", *STEPS,
                                                  f"training.learning_rate={lr}",
                                                  f"publish.tag={tag}"])
            assert report["status"] == "completed", report["error"]
            assert report["hub"]["tag"] == tag
    with as_user("demo"):
        card = Path(hf_hub_download(repo, "README.md", revision="t1")).read_text()
        saved = {t: _file_weights(hf_hub_download(repo, "adapter_model.safetensors",
                                                  revision=t)) for t in ("t1", "t2")}
        assert not _same(saved["t1"], saved["t2"])  # main holds another adapter than t1

        scope: dict = {}
        exec(_card_snippet(card), scope)
        assert _same(_lora_weights(scope["model"]), saved["t1"])
        assert scope["tokenizer"].name_or_path == repo
        assert "version `t1`" in card

        # Every one-call line the card shows, run as written.
        section = card.split("In one call")[1].split("\n## ")[0]
        calls = re.findall(r"^- `(.+?)`", section, re.M)
        assert len(calls) == 3, section
        import peft

        for call in calls:
            names = {n: getattr(peft if n.startswith("AutoPeft") else transformers, n)
                     for n in re.findall(r"\b(Auto\w+|pipeline)\b", call)}
            loaded = eval(call, names)
            model = getattr(loaded, "model", loaded)  # a pipeline holds its model
            assert _same(_lora_weights(model), saved["t1"]), call
        pipe = eval(calls[-1], names)  # the last line: pipeline
        out = pipe("Below is an instruction", max_new_tokens=4, do_sample=False)
        assert out[0]["generated_text"].startswith("Below is an instruction")

        # The warning is true: the tag passed as `revision` reaches the base, which has no
        # such tag.
        assert 'Not `revision="t1"`' in section
        with pytest.raises(OSError, match="t1"):
            transformers.AutoModelForCausalLM.from_pretrained(repo, revision="t1")

        # The adapter repo alone (its tokenizer too) generates through `pipeline`.
        generator = transformers.pipeline("text-generation", model=repo, tokenizer=repo)
        assert _same(_lora_weights(generator.model), saved["t2"])
        out = generator("Below is an instruction", max_new_tokens=4, do_sample=False)
        assert out[0]["generated_text"].startswith("Below is an instruction")
