"""Chat data through the real flow against localhub, and a dataset step that cannot serve
rows tokenized by older code.

- The seeded tiny Llama's chat data (`data/chat.jsonl` of tinylabs/tiny-instruct) through
  `run_profile`: the rows saved under LORAFLOW_HOME/datasets/<key>/ are the template's own
  rendering (one `<s>`, then `<|user|>`) with labels on the answer and its `</s>` only.
- A helper's body edited in a copy of tasks/dataset.py: the re-keyed dataset step saves
  the new rows (`datasets`' own map cache must not answer), and no bytecode is printed
  while print is captured as Prefect's log_prints captures it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from homes import loraflow_home  # tests/

from flows.cli import run_profile
from profiles.loader import load_profile

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def own_home(session_dir):
    with loraflow_home(session_dir / "loraflow-chat-data") as home:
        yield home


def test_seeded_chat_rows_through_the_flow_are_the_templates_rendering(hub, as_user, own_home,
                                                                       tiny_llama_dir):
    import datasets
    from huggingface_hub import hf_hub_download
    from transformers import AutoTokenizer

    overrides = ["data.format=chat", "data.data_files=data/chat.jsonl", "data.eval_split=0",
                 "training.max_steps=2", "training.save_steps=2", "training.logging_steps=1",
                 "publish.repo_id=loraflow-demo/chat-data"]
    with as_user("demo"):
        report = run_profile("quickstart", load_profile("quickstart", overrides))
        rows_file = hf_hub_download("tinylabs/tiny-instruct", "data/chat.jsonl",
                                    repo_type="dataset", token=hub.token("demo"),
                                    cache_dir=own_home / "hf")
    assert report["status"] == "completed", report["error"]
    [saved] = [p for p in (own_home / "datasets").iterdir()
               if p.name.startswith("dataset-") and ".partial" not in p.name]
    train = datasets.load_from_disk(str(saved / "train"))
    manifest = json.loads((saved / "manifest.json").read_text())
    conversations = [json.loads(line)["messages"] for line in
                     Path(rows_file).read_text().splitlines()]

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    bos, user = tok.bos_token_id, tok.convert_tokens_to_ids("<|user|>")
    for messages, row in zip(conversations[:32], train.select(range(32))):
        rendering = tok.apply_chat_template(messages, tokenize=False)
        assert row["input_ids"] == tok(rendering, add_special_tokens=False).input_ids
        assert row["input_ids"][:2] == [bos, user] and row["input_ids"].count(bos) == 1
        answer = tok(messages[-1]["content"], add_special_tokens=False).input_ids
        assert [x for x in row["labels"] if x != -100] == answer + [tok.eos_token_id]
    assert len(train) == len(conversations)
    assert (manifest["rows_read"], manifest["dropped"], manifest["truncated"]) == (
        len(conversations), {}, 0)


# ------------------------------------------------------------------------ stale rows

PREPARE = r'''
import builtins, hashlib, json, sys
from pathlib import Path

captured = []
real_print = builtins.print
# What Prefect's log_prints does: every print goes to a logger, whatever its `file`.
builtins.print = lambda *args, **kwargs: captured.append(" ".join(map(str, args)))

import datasets
from profiles.schema import DataSection
from tasks.dataset import run_prepare_dataset
from tasks.download import SnapshotManifest
from tasks.preflight import DatasetRef

rows, tok_dir = Path(sys.argv[1]), Path(sys.argv[2])
files = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
         for p in sorted(tok_dir.iterdir()) if p.is_file()}
snap = SnapshotManifest(repo_id="tinylabs/tiny-llama", commit="0" * 40, local_dir=str(tok_dir),
                        files=files)
source = DatasetRef(source="file", id=str(rows), sha256=hashlib.sha256(rows.read_bytes()).hexdigest())
data = DataSection(dataset=str(rows), format="alpaca", max_length=64, eval_split=0.25)
manifest = run_prepare_dataset(data, source, snap, 42)
train = datasets.load_from_disk(manifest.path + "/train")
bytecode = [line for line in captured if "LOAD_" in line or "RETURN_" in line]
real_print(json.dumps({"key": manifest.key, "first": train[0]["input_ids"],
                       "bytecode": bytecode[:5]}))
'''


def test_an_edited_helper_body_reaches_the_saved_rows(tmp_path, tiny_llama_dir):
    """Run the dataset step, edit the body of format_example (a helper the map function
    calls), run again on the same LORAFLOW_HOME: the rows must be the new code's."""
    from transformers import AutoTokenizer

    from localhub import seed_data

    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(seed_data.jsonl(seed_data.instruct_rows()[:32]))
    tree = tmp_path / "tree"
    for pkg in ("tasks", "profiles", "flows"):
        shutil.copytree(REPO / pkg, tree / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["LORAFLOW_HOME"] = str(tmp_path / "home")  # shared by both runs, datasets' cache too

    def prepare() -> dict:
        proc = subprocess.run([sys.executable, "-c", PREPARE, str(rows), str(tiny_llama_dir)],
                              cwd=tree, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    before = prepare()
    dataset_py = tree / "tasks" / "dataset.py"
    source = dataset_py.read_text()
    body = 'row["output"].strip()'
    assert source.count(body) == 1
    dataset_py.write_text(source.replace(body, 'row["output"].strip() + " yes"'))
    after = prepare()

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    assert after["key"] != before["key"]  # the step re-keyed on its code …
    # … and its rows are the edited code's: the answer gained " yes" before EOS.
    assert after["first"] == before["first"][:-1] + [tok.convert_tokens_to_ids("yes"),
                                                     tok.eos_token_id]
    assert before["bytecode"] == [] and after["bytecode"] == []
