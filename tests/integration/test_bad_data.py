"""Bad data gets one clear line: the file (or the Hub repo's file), the line or row, the fix.

Each case runs the real CLI in-process (`flows.cli.main(["run", "quickstart", "--json",
...])`) against localhub, with a local file written here or a dataset repo uploaded here,
and asserts: exit code 1, a failed dataset step, a DatasetError whose one-line message
starts with the field, names the file and (where there is one) the line or row, and says
"Fix:"; no traceback; nothing cached (no finished datasets/<key>/ directory, no Prefect
result record of the dataset step) and nothing pushed (the publish repo does not exist).

All cases share one LORAFLOW_HOME, so the base model is downloaded by the first case only;
every case fails in the dataset step, before any training. docs/bad-input.md lists them.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from homes import loraflow_home  # tests/

from flows.cli import main as cli_main

REPO = "loraflow-demo/bad-data-never-published"
HUB_DATA = "loraflow-demo/bad-rows"
ALPACA = b'{"instruction": "Say hi.", "output": "hi"}\n'
CHAT = (b'{"messages": [{"role": "user", "content": "hi"}, '
        b'{"role": "assistant", "content": "yo"}]}\n')


@pytest.fixture(scope="module")
def own_home(session_dir):
    with loraflow_home(session_dir / "loraflow-bad-data") as home:
        yield home


def _parquet(rows: dict, truncate: bool = False) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(rows), buf)
    data = buf.getvalue()
    return data[:len(data) // 2] if truncate else data


# name → (file name, bytes, data.format, text the message must contain (file and place))
LOCAL_CASES = {
    "jsonl-malformed-line": ("train.jsonl", ALPACA * 2 + b'{"instruction": "x" "output": "y"}\n',
                             "alpaca", ["line 3 is not valid JSON", "Expecting ','"]),
    "jsonl-empty": ("empty.jsonl", b"", "alpaca", ["is empty", "no rows"]),
    "jsonl-whitespace-only": ("blank.jsonl", b"\n  \n", "alpaca", ["no rows"]),
    "jsonl-latin1": ("latin1.jsonl", ALPACA + '{"instruction": "café", "output": "y"}\n'
                     .encode("latin-1"), "alpaca",
                     ["is not UTF-8", "line 2", f"byte {len(ALPACA) + 20}", "UTF-8"]),
    "jsonl-utf16": ("utf16.jsonl", ALPACA.decode().encode("utf-16"), "alpaca",
                    ["is not UTF-8", "UTF-16"]),
    "jsonl-line-not-object": ("scalars.jsonl", ALPACA + b"42\n", "alpaca",
                              ["line 2 is a number, not a row"]),
    "jsonl-mixed-types": ("mixed.jsonl", CHAT + b"\n" + b'{"messages": "hello"}\n', "chat",
                          ["line 3: 'messages' is text where line 1 has a list"]),
    "json-list-of-strings": ("strings.json", b'["Say hi.", "hi"]', "alpaca",
                             ["JSON list of values (text first), not of rows"]),
    "json-truncated": ("cut.json", b'[{"instruction": "a", "output": "b"}, {"instr', "alpaca",
                       ["line 1 is not valid JSON", "truncated"]),
    "json-empty-list": ("none.json", b"[]", "alpaca", ["empty JSON list", "no rows"]),
    "field-is-text-not-messages": ("chat.jsonl", CHAT + b'{"messages": "hello"}\n' + CHAT,
                                   "chat", ["row 1 (line 2)", "'messages' is text",
                                            "expected a list of messages"]),
    "field-is-null": ("nulls.jsonl", ALPACA + b'{"instruction": null, "output": "y"}\n',
                      "alpaca", ["row 1 (line 2)", "'instruction' is missing or null"]),
    "field-is-a-number": ("numbers.jsonl", b'{"prompt": 7, "completion": "seven"}\n',
                          "prompt-completion", ["row 0 (line 1)", "'prompt' is a number"]),
    "csv-header-only": ("header.csv", b"instruction,output\n", "alpaca",
                        ["header line but no rows"]),
    "csv-extra-field": ("extra.csv", b"instruction,output\nSay hi.,hi\nSay a, b.,ab\n", "alpaca",
                        ["line 3 has 3 fields where the header has 2"]),
    "csv-empty-cell": ("cells.csv", b"instruction,output\nSay hi.,hi\n\nSay yo.,\n", "alpaca",
                       ["row 1 (line 4)", "'output' is missing or null"]),
    "csv-missing-columns": ("cols.csv", b"question,answer\nSay hi.,hi\n", "alpaca",
                            ["needs columns", "missing ['instruction', 'output']"]),
    "parquet-truncated": ("cut.parquet", _parquet({"instruction": ["a"] * 50, "output": ["b"] * 50},
                                                  truncate=True), "alpaca",
                          ["not a readable Parquet file", "truncated"]),
    "parquet-zero-rows": ("none.parquet", b"", "alpaca", ["no rows"]),  # bytes made below
    "unknown-suffix": ("rows.txt", ALPACA, "alpaca", ["is a .txt file", ".jsonl, .json"]),
}


def _run(as_user, overrides: list[str]) -> tuple[int, dict]:
    """`loraflow run quickstart --json --set …` in-process: (exit code, the JSON report).

    stdout is redirected here rather than with capsys: Prefect's console log handler,
    made during the first flow run, keeps the stream it found, and capsys closes its own
    stream when the test ends."""
    args = ["run", "quickstart", "--json", "--set", f"publish.repo_id={REPO}",
            "--set", "data.eval_split=0", "--set", "training.max_steps=2"]
    for override in overrides:
        args += ["--set", override]
    out = io.StringIO()
    with as_user("demo"), contextlib.redirect_stdout(out):
        code = cli_main(args)
    return code, json.loads(out.getvalue().strip().splitlines()[-1])


def _assert_refused(code: int, report: dict, own_home: Path, hub, needles: list[str],
                    step: str = "dataset") -> str:
    assert code == 1, report
    assert report["status"] == "failed"
    assert report["steps"][step]["state"] == "failed", report["steps"]
    assert report["steps"]["train"]["state"] == "skipped"
    error = report["error"]
    assert error["type"] == "DatasetError", error
    message = error["message"]
    for needle in needles + ["Fix:"]:
        assert needle in message, message
    assert "Traceback" not in message and "\n" not in message and 'File "' not in message
    # Nothing cached: no finished dataset directory, no Prefect record of the step …
    datasets_dir = own_home / "datasets"
    finished = [p.name for p in datasets_dir.iterdir()] if datasets_dir.exists() else []
    assert finished == [], finished
    results = own_home / "results"
    records = [p.name for p in results.iterdir() if p.name.startswith("dataset-")] \
        if results.exists() else []
    assert records == []
    # … and nothing pushed.
    from huggingface_hub import HfApi

    assert not HfApi(endpoint=hub.url, token=hub.token("demo")).repo_exists(REPO)
    return message


@pytest.mark.parametrize("case", list(LOCAL_CASES))
def test_a_bad_local_file_is_named_with_its_line_and_the_fix(case, hub, as_user, own_home,
                                                            tmp_path):
    name, content, fmt, needles = LOCAL_CASES[case]
    if case == "parquet-zero-rows":
        import pyarrow as pa

        content = _parquet({"instruction": pa.array([], pa.string()),
                            "output": pa.array([], pa.string())})
    path = tmp_path / name
    path.write_bytes(content)
    code, report = _run(as_user, [f"data.dataset={path}", f"data.format={fmt}"])
    message = _assert_refused(code, report, own_home, hub, needles)
    assert str(path) in message
    field = "data.format" if case == "csv-missing-columns" else "data.dataset"
    assert message.startswith(f"{field}: "), message


def test_a_wrong_label_type_is_named_by_row(hub, as_user, own_home, tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_bytes(b'{"text": "red", "label": "colorful"}\n'
                     b'{"text": "grey", "label": ["plain", "dull"]}\n')
    code, report = _run(as_user, [
        "model.id=tinylabs/tiny-bert", "model.task=seq-classification",
        f"data.dataset={path}", "data.format=text-label", "data.max_length=32"])
    message = _assert_refused(code, report, own_home, hub,
                              [str(path), "row 1 (line 2)", "'label' is a list"])
    assert message.startswith("data.dataset: ")


# ------------------------------------------------------------------------ Hub datasets

HUB_FILES = {
    "data/broken.jsonl": ALPACA * 2 + b'{"instruction": "x", "output": }\n',
    "data/latin1.jsonl": ALPACA * 3 + '{"instruction": "naïve", "output": "y"}\n'.encode(
        "latin-1"),
    "data/chat.jsonl": CHAT + b'{"messages": "hello"}\n',
    "data/empty.jsonl": b"",
}


@pytest.fixture(scope="module")
def bad_hub_dataset(hub):
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub.url, token=hub.token("demo"))
    api.create_repo(HUB_DATA, repo_type="dataset", private=True, exist_ok=True)
    api.create_commit(HUB_DATA, repo_type="dataset", commit_message="bad rows", operations=[
        CommitOperationAdd(path_in_repo=p, path_or_fileobj=b) for p, b in HUB_FILES.items()])
    return HUB_DATA


HUB_CASES = {
    "hub-malformed-line": ("data/broken.jsonl", "alpaca",
                           ["file data/broken.jsonl", "line 3 is not valid JSON"]),
    "hub-not-utf8": ("data/latin1.jsonl", "alpaca",
                     ["file data/latin1.jsonl", "is not UTF-8", "line 4"]),
    "hub-empty-file": ("data/empty.jsonl", "alpaca", ["file data/empty.jsonl", "no rows"]),
    "hub-field-type": ("data/chat.jsonl", "chat", ["(data_files data/chat.jsonl, split train) "
                                                   "row 1: 'messages' is text"]),
}


@pytest.mark.parametrize("case", list(HUB_CASES))
def test_a_bad_hub_dataset_file_is_named_in_its_repo(case, bad_hub_dataset, hub, as_user,
                                                     own_home):
    data_file, fmt, needles = HUB_CASES[case]
    code, report = _run(as_user, [f"data.dataset={bad_hub_dataset}",
                                          f"data.data_files={data_file}", f"data.format={fmt}"])
    message = _assert_refused(code, report, own_home, hub, needles)
    assert message.startswith("data.dataset: ") and bad_hub_dataset in message


def test_hub_data_files_that_match_nothing_name_the_setting(bad_hub_dataset, hub, as_user,
                                                            own_home):
    code, report = _run(as_user, [f"data.dataset={bad_hub_dataset}",
                                          "data.data_files=data/nope.jsonl"])
    message = _assert_refused(code, report, own_home, hub,
                              [bad_hub_dataset, "'data/nope.jsonl'"])
    assert message.startswith("data.data_files: ")
