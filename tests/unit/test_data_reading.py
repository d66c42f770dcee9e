"""The places a bad-data message names are the places the libraries mean.

- A byte that is not UTF-8, past the first 1 MiB read chunk and after a multi-byte
  character cut by the chunk boundary: the offset is the one Python's own UTF-8 codec
  reports for the whole file, the line the one that holds it.
- The row index `datasets` gives a bad value maps to the line where that row starts, for
  JSON Lines with blank lines and for CSV with a quoted field over two lines.
- A CSV's text columns stay text when their cells are digits (pandas alone reads numbers).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from profiles.schema import DataSection
from tasks.contracts import DatasetRef
from tasks.data.reading import REQUIRED_COLUMNS, check_columns, diagnose_file, load_rows
from tasks.errors import DatasetError


def test_a_bad_byte_past_the_first_chunk_is_found_where_the_codec_finds_it(tmp_path):
    line = b'{"text": "' + b"a" * 88 + b'"}\n'  # 100 bytes
    body = bytearray(line * 11_000)  # > 1 MiB
    boundary = 1 << 20
    body[boundary - 1:boundary + 1] = "é".encode()  # a 2-byte character cut by the chunk
    bad = boundary + 30_017
    body[bad] = 0xFF
    path = tmp_path / "rows.jsonl"
    path.write_bytes(bytes(body))

    with pytest.raises(UnicodeDecodeError) as codec:
        bytes(body).decode("utf-8")
    found = diagnose_file(path, "text")
    assert found is not None and found.offset == codec.value.start == bad
    assert found.line == bytes(body[:bad]).count(b"\n") + 1
    assert f"byte {bad} (line {found.line}) is 0xff" in found.problem


def _refusal(path: Path, fmt: str) -> tuple[DatasetError, object]:
    data = DataSection(dataset=str(path), format=fmt, max_length=64)
    source = DatasetRef(source="file", id=str(path),
                        sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    rows = load_rows(data, source)
    assert REQUIRED_COLUMNS[fmt] <= set(rows.column_names)
    with pytest.raises(DatasetError) as err:
        check_columns(rows, data, source)
    return err.value, rows


def test_a_jsonl_row_is_named_by_the_line_it_is_on(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n'
                    '{"prompt": "c", "completion": "d"}\n   \n'
                    '{"prompt": null, "completion": "f"}\n')
    error, rows = _refusal(path, "prompt-completion")
    index = error.fields["row"]
    assert rows[index]["completion"] == "f"  # the row datasets numbers `index`
    assert error.fields["line"] == 5
    assert path.read_text().splitlines()[4].startswith('{"prompt": null')
    assert f"row {index} (line 5): 'prompt' is missing or null, expected text" in error.message


def test_a_csv_row_is_named_by_the_line_it_starts_on(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('instruction,output\n"two\nlines",x\n\nthird,\n')
    error, rows = _refusal(path, "alpaca")
    index = error.fields["row"]
    assert rows[index]["instruction"] == "third"  # the row datasets numbers `index`
    assert error.fields["line"] == 5
    assert f"row {index} (line 5): 'output' is missing or null" in error.message


def test_csv_text_columns_of_digits_stay_text(tmp_path):
    import pandas as pd

    path = tmp_path / "rows.csv"
    path.write_text("instruction,input,output\nAdd one.,41,42\nSay hi.,,hi\n")
    data = DataSection(dataset=str(path), format="alpaca", max_length=64)
    source = DatasetRef(source="file", id=str(path),
                        sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    rows = load_rows(data, source)
    check_columns(rows, data, source)  # nothing to refuse
    assert pd.read_csv(path)["input"].tolist()[0] == 41.0  # pandas alone: a float
    assert rows["input"] == ["41", None] and rows["output"] == ["42", "hi"]
