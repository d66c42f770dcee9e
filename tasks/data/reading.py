"""Reading a dataset's rows, and saying exactly what is wrong with bad ones.

`load_rows` reads a local json/jsonl/csv/parquet file or a Hub dataset at its commit
through `datasets`, translating what it raises while reading once, by type: the Hub's
errors into their typed loraflow errors, a connection failure left for the retry policy,
and unreadable data into a DatasetError naming the file (for a Hub dataset: the repo's
file and commit), the line, byte offset or row, and the fix. `datasets`' own messages lack
the place ("Expected object or value at position 35"), so after a failure the file is
scanned for it (`diagnose_file`). `check_columns` checks that every row's format columns
hold the right kind of value before anything is tokenized. docs/bad-input.md lists the cases.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from profiles.schema import DataSection
from tasks import errors, settings
from tasks.contracts import DatasetRef

log = logging.getLogger("loraflow.dataset")

REQUIRED_COLUMNS = {"alpaca": {"instruction", "output"}, "chat": {"messages"},
                    "prompt-completion": {"prompt", "completion"}, "text": {"text"},
                    "text-label": {"text", "label"}, "tokens-tags": {"tokens", "tags"},
                    "input-target": {"input", "target"}}
# Local file suffix → the `datasets` packaged reader.
READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Columns that hold text, per format: a CSV's are read as text (see load_rows).
TEXT_COLUMNS = {"alpaca": ("instruction", "input", "output"), "prompt-completion":
                ("prompt", "completion"), "text": ("text",), "text-label": ("text",),
                "input-target": ("input", "target")}

@dataclass
class _Finding:
    """What is wrong with a data file, found by scanning it (see diagnose_file)."""
    problem: str  # completes "data.dataset: <file> …"
    fix: str
    line: Optional[int] = None
    offset: Optional[int] = None


def _kind(value) -> str:
    """A JSON-ish value's kind, as a user would name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _rows_hint(fmt: str) -> str:
    columns = ", ".join(f'"{c}": …' for c in sorted(REQUIRED_COLUMNS[fmt]))
    return f"{{{columns}}}"


def _scan_utf8(path: Path) -> Optional[_Finding]:
    """The first byte that is not UTF-8, with its offset and line, read in 1 MiB chunks."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed = newlines = 0
    with path.open("rb") as f:
        head = f.read(4)
        f.seek(0)
        while True:
            chunk = f.read(1 << 20)
            # Bytes of a character cut at the end of the last chunk, kept by the decoder:
            # positions in its error count from them.
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                offset = consumed - pending + exc.start
                bad = exc.object[exc.start]
                # Pending bytes are ≥ 0x80, never a newline: count only this chunk's part.
                line = newlines + chunk[:max(0, offset - consumed)].count(b"\n") + 1
                break
            if not chunk:
                return None
            consumed += len(chunk)
            newlines += chunk.count(b"\n")
    utf16 = head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    return _Finding(
        f"is not UTF-8 text: byte {offset} (line {line}) is 0x{bad:02x}, which UTF-8 cannot "
        f"decode{' (the file starts with a UTF-16 byte-order mark)' if utf16 else ''}",
        "re-save the file as UTF-8 (e.g. `iconv -f <its encoding> -t UTF-8 in > out`, "
        "or your editor's 'save with encoding: UTF-8')", line=line, offset=offset)


class _Found(Exception):
    """Carries a finding out of a generator that scans rows (see _jsonl_rows)."""

    def __init__(self, finding: "_Finding"):
        super().__init__(finding.problem)
        self.finding = finding


def _jsonl_rows(path: Path, rows: str):
    """(line number, object) for each non-blank line, read one line at a time.

    Raises:
        _Found: at the first line that is not JSON, or not a JSON object.
    """
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _Found(_Finding(f"line {number} is not valid JSON ({exc.msg}: column "
                                      f"{exc.colno})", "correct that line: JSON Lines hold "
                                      f"{rows}, each on one line", line=number)) from None
            if not isinstance(value, dict):
                raise _Found(_Finding(f"line {number} is {_kind(value)}, not a row (a JSON "
                                      f"object)", f"make every line one JSON object: {rows}",
                                      line=number))
            yield number, value


def _scan_json(path: Path, fmt: str) -> Optional[_Finding]:
    """The first line that is not JSON, or the top-level shape that is not rows.

    A file that starts with `[` (or a .json file whose first line is not a JSON value on
    its own) is read as one JSON document, as `datasets` reads it; else as JSON Lines,
    one line at a time.
    """
    rows = (f"one JSON object per row with the columns of data.format {fmt} "
            f"({_rows_hint(fmt)})")
    with path.open(encoding="utf-8-sig") as f:
        first_line = next((line for line in f if line.strip()), None)
    if first_line is None:
        return _Finding("holds only whitespace: it has no rows",
                        f"give at least one row: {rows}")
    document = first_line.lstrip().startswith("[")
    if not document and path.suffix.lower() != ".jsonl":
        try:
            json.loads(first_line)
        except ValueError:
            document = True  # e.g. one object pretty-printed over several lines
    if not document:
        try:
            return _mixed_types(_jsonl_rows(path, rows), "line")
        except _Found as found:
            return found.finding
    text = path.read_text(encoding="utf-8-sig")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        ends = ", where the file ends: is it truncated?" if _cut_at(text, exc.pos) else ""
        return _Finding(f"line {exc.lineno} is not valid JSON ({exc.msg}: column "
                        f"{exc.colno}{ends})", f"correct that line; the file must hold "
                        f"{rows} (a JSON list of them, or JSON Lines)", line=exc.lineno)
    if isinstance(value, dict):
        return None
    if not isinstance(value, list):
        return _Finding(f"holds a single JSON value ({_kind(value)}), not rows",
                        f"give a JSON list of rows or JSON Lines: {rows}")
    if not value:
        return _Finding("is an empty JSON list: it has no rows",
                        f"give at least one row: {rows}")
    bad = next((i for i, v in enumerate(value) if not isinstance(v, dict)), None)
    if bad is not None:
        return _Finding(f"is a JSON list whose element {bad} is {_kind(value[bad])}, not a "
                        "row (an object)", f"make every element an object: {rows}")
    return _mixed_types(enumerate(value), "element")


def _mixed_types(rows, unit: str) -> Optional[_Finding]:
    """The first row whose column holds another kind of value than in the first row
    that has it (null aside): valid JSON that pyarrow cannot put in one column.

    Args:
        rows: (line number or element index, row object) pairs.
        unit: "line" or "element", for the message.
    """
    first: dict[str, tuple[int, str]] = {}
    for where, row in rows:
        for column, value in row.items():
            if value is None:
                continue
            kind = _kind(value)
            seen = first.setdefault(column, (where, kind))
            if seen[1] != kind:
                return _Finding(
                    f"{unit} {where}: '{column}' is {kind} where {unit} {seen[0]} has "
                    f"{seen[1]}", f"give '{column}' the same kind of value in every row",
                    line=where if unit == "line" else None)
    return None


def _cut_at(text: str, pos: int) -> bool:
    """True when a JSON parse error at `pos` means the text ends too early: nothing but
    whitespace follows, or a string opens there and never closes."""
    rest = text[pos:].rstrip()
    if not rest:
        return True
    if rest[0] != '"':
        return False
    i = 1
    while i < len(rest):
        if rest[i] == "\\":
            i += 2
            continue
        if rest[i] == '"':
            return False
        i += 1
    return True


def _scan_csv(path: Path, fmt: str) -> Optional[_Finding]:
    """A CSV with no header, no rows, or a line with more fields than its header."""
    import csv

    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next((r for r in reader if r), None)
            if header is None:
                return _Finding("holds only whitespace: no header line, no rows",
                                f"give a header line with the columns of data.format {fmt} "
                                f"({', '.join(sorted(REQUIRED_COLUMNS[fmt]))}) and a row "
                                "per example")
            count = 0
            for record in reader:
                if not record:
                    continue
                count += 1
                if len(record) > len(header):
                    return _Finding(
                        f"line {reader.line_num} has {len(record)} fields where the header "
                        f"has {len(header)}", "quote the fields that contain a comma "
                        '("a, b"), or remove the extra fields', line=reader.line_num)
        except csv.Error as exc:
            return _Finding(f"line {reader.line_num} is not valid CSV ({exc})",
                            "correct that line", line=reader.line_num)
    if count == 0:
        return _Finding("has a header line but no rows", "add at least one row under the "
                        "header")
    return None


def _scan_parquet(path: Path) -> Optional[_Finding]:
    """A Parquet file whose footer or row groups cannot be read, or that has no rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fix = ("re-export it (pandas DataFrame.to_parquet, datasets Dataset.to_parquet) and "
           "check that the copy is complete")
    try:
        parquet = pq.ParquetFile(path)
        if parquet.metadata.num_rows == 0:
            return _Finding("has no rows (a Parquet file with 0 rows)",
                            "write the rows into it")
        for group in range(parquet.num_row_groups):
            try:
                parquet.read_row_group(group)
            except (pa.ArrowException, OSError) as exc:
                return _Finding(f"is damaged: row group {group} cannot be read ({exc})", fix)
    except (pa.ArrowException, OSError) as exc:
        return _Finding(f"is not a readable Parquet file ({path.stat().st_size} bytes: "
                        f"{exc}); it is truncated, corrupt or not Parquet", fix)
    return None


def diagnose_file(path: Path, fmt: str) -> Optional[_Finding]:
    """What makes a data file unreadable, with its line or byte offset where there is one.

    Why a scan of our own: `datasets` reports these as ValueError("Expected object or
    value at position 35"), a bare StopIteration, pyarrow's ArrowInvalid or a
    DatasetGenerationError around them, none of which names the file or (for JSON) the
    line; and pyarrow's JSON reader takes bytes that are not UTF-8 inside strings
    without a word (the row fails later, when read). It runs only once reading has
    failed, so a good file is read once.

    Args:
        path: the file (a local file, or a Hub dataset's file downloaded).
        fmt: data.format, for the shape the fix describes.

    Returns:
        The finding, or None when the scan sees nothing wrong.
    """
    kind = path.suffix.lower()
    if path.stat().st_size == 0:
        return _Finding("is empty (0 bytes): it has no rows",
                        f"give a file with at least one row of data.format {fmt} "
                        f"({_rows_hint(fmt)})")
    if kind == ".parquet":
        return _scan_parquet(path)
    found = _scan_utf8(path)
    if found is None and kind in (".json", ".jsonl"):
        found = _scan_json(path, fmt)
    elif found is None and kind == ".csv":
        found = _scan_csv(path, fmt)
    return found


class _DropErrorRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextmanager
def _library_error_logs_dropped():
    """While `datasets` reads: drop the ERROR lines it logs ("Failed to load JSON from
    file …") just before it raises. The raise is translated into one line naming the
    file and the line (load_rows), so the library's line would be a second, rawer copy
    of the same error; its warnings still show."""
    drop = _DropErrorRecords()
    names = [n for n in list(logging.root.manager.loggerDict)
             if n == "datasets" or n.startswith("datasets.")]
    loggers = [logging.getLogger(n) for n in names]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def _read_error_types() -> tuple[type[BaseException], ...]:
    """What `datasets` raises for data it cannot read: its own errors (the
    DatasetGenerationError wrapping pyarrow's or pandas' error), pyarrow's, a bare
    StopIteration (an empty JSON Lines file), ValueError (pandas' JSON fallback,
    UnicodeDecodeError, "corresponds to no data"), and the FileNotFoundError it raises
    when data.data_files matches no file of a Hub dataset."""
    import pyarrow as pa
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DatasetsError

    return (DatasetsError, EmptyDatasetError, StopIteration, ValueError, pa.ArrowException)


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _where(source: DatasetRef, data: Optional[DataSection] = None) -> str:
    """How a message names the rows: the local file, or the Hub dataset (with the
    data files and split it was read with, when given)."""
    if source.source == "file":
        return source.id
    if data is None:
        return f"dataset '{source.id}'"
    files = f"data_files {data.data_files}, " if data.data_files else ""
    return f"dataset '{source.id}' ({files}split {data.split})"


def _hub_finding(data: DataSection, source: DatasetRef) -> Optional[tuple[str, _Finding]]:
    """Which file of a Hub dataset is unreadable, and why: the split's files as `datasets`
    resolves them (its builder's data_files), each downloaded at the pinned commit into a
    temporary directory and scanned (diagnose_file). Only called once reading failed.

    Returns:
        (the file, named by repo, path in the repo and commit; the finding), or None.
    """
    import tempfile

    import datasets
    from huggingface_hub import HfFileSystem, hf_hub_download

    token = settings.hub_token()
    builder = datasets.load_dataset_builder(
        source.id, revision=source.commit, data_files=data.data_files, token=token,
        cache_dir=str(settings.loraflow_home() / "datasets-cache"))
    files = builder.config.data_files or {}
    split = data.split.split("[")[0]
    urls = list(files.get(split) or [u for group in files.values() for u in group])
    fs = HfFileSystem(endpoint=settings.hub_endpoint(), token=token)
    with tempfile.TemporaryDirectory(prefix="loraflow-diagnose-") as tmp:
        for url in urls:
            in_repo = fs.resolve_path(str(url)).path_in_repo
            local = hf_hub_download(source.id, in_repo, repo_type="dataset",
                                    revision=source.commit, token=token, local_dir=tmp,
                                    endpoint=settings.hub_endpoint())
            found = diagnose_file(Path(local), data.format)
            if found is not None:
                return (f"{source.id} file {in_repo} (commit {source.commit[:12]})", found)
    return None


def _unreadable(exc: BaseException, data: DataSection, source: DatasetRef
                ) -> errors.LoraflowError:
    """The one error for rows `datasets` could not read (see _read_error_types): the
    Hub's own error when one is in the chain, else a DatasetError naming the file and
    what the scan found there (or, when it finds nothing, the library's reason).

    Args:
        exc: what `datasets` raised.
        data: the data section.
        source: the rows' source.

    Returns:
        The error to raise.

    Raises:
        Exception: a connection failure met while fetching a Hub file to scan, as it
            is (the retry policy's to handle).
    """
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DataFilesNotFoundError, DatasetsError
    from huggingface_hub import errors as hf

    chain = _chain(exc)
    hub = next((e for e in chain if isinstance(e, hf.HfHubHTTPError)), None)
    if hub is not None:
        return errors.translate_hub_error(hub, repo_id=source.id, repo_type="dataset",
                                          revision=source.commit,
                                          endpoint=settings.hub_endpoint())
    if source.source == "hub" and isinstance(exc, (DataFilesNotFoundError, EmptyDatasetError)):
        return _no_data_files(data, source)
    label, found = source.id, None
    try:
        if source.source == "file":
            found = diagnose_file(Path(source.id), data.format)
        else:
            label, found = _hub_finding(data, source) or (label, None)
    except hf.HfHubHTTPError as hub_exc:
        return errors.translate_hub_error(hub_exc, repo_id=source.id, repo_type="dataset",
                                          revision=source.commit,
                                          endpoint=settings.hub_endpoint())
    except Exception as diagnosis_exc:  # noqa: BLE001 - the scan only adds detail
        if errors.is_transient(diagnosis_exc):
            raise
        # Without the scan's detail the library's own reason is still given below.
        log.warning("could not pinpoint why %s is unreadable: %s: %s", label,
                    type(diagnosis_exc).__name__, diagnosis_exc)
    if found is not None:
        return errors.DatasetError(f"data.dataset: {label} {found.problem}. Fix: "
                                   f"{found.fix}.", field="data.dataset", file=label,
                                   line=found.line, offset=found.offset)
    root = next((e for e in chain if not isinstance(e, DatasetsError)), exc)
    said = " ".join(str(root).split())[:300] or "no message"
    kind = Path(source.id).suffix.lower().lstrip(".") if source.source == "file" \
        else "data files"
    return errors.DatasetError(
        f"data.dataset: {_where(source, data)} could not be read as {kind} "
        f"({type(root).__name__}: {said}). Fix: check that it holds rows of data.format "
        f"{data.format} ({_rows_hint(data.format)}) as valid UTF-8 JSON Lines, JSON, CSV "
        "or Parquet.", field="data.dataset", file=source.id)


def _value_is(*dtypes: str):
    import datasets

    return lambda f: isinstance(f, datasets.Value) and (not dtypes or f.dtype in dtypes) \
        and f.dtype != "null"


def _list_of(inner):
    import datasets

    # datasets < 4 has no List feature (Sequence instead): those columns go row by row.
    kind = getattr(datasets, "List", None)
    return lambda f: kind is not None and isinstance(f, kind) and inner(f.feature)


def _column_rules(fmt: str) -> dict[str, tuple]:
    """Per column of the format: (what it must hold, a check of one value, a check of
    the column's `datasets` feature under which only nulls can be wrong, whether null
    is allowed)."""
    string = _value_is("string", "large_string")
    text = ("text", lambda v: isinstance(v, str), string, False)
    rules = {
        "alpaca": {"instruction": text, "output": text,
                   "input": ("text or null", lambda v: v is None or isinstance(v, str),
                             string, True)},
        "chat": {"messages": ('a list of messages ({"role": …, "content": …})',
                              lambda v: isinstance(v, list) and all(
                                  isinstance(m, dict) and isinstance(m.get("role"), str)
                                  for m in v),
                              _list_of(lambda f: isinstance(f, dict)
                                       and string(f.get("role"))), False),
                 "tools": ("a list of tool schemas, their JSON text, or null",
                           lambda v: v is None or isinstance(v, (str, list)),
                           lambda f: string(f) or _list_of(lambda _: True)(f), True)},
        "prompt-completion": {"prompt": text, "completion": text},
        "text": {"text": text},
        "text-label": {"text": text,
                       "label": ("a label (text or a number)",
                                 lambda v: isinstance(v, (str, int, float)), _value_is(),
                                 False)},
        "tokens-tags": {"tokens": ("a list of words (text)", lambda v: isinstance(v, list)
                                   and all(isinstance(w, str) for w in v),
                                   _list_of(string), False),
                        "tags": ("a list of tags (text or numbers), one per word",
                                 lambda v: isinstance(v, list) and all(
                                     isinstance(t, (str, int)) for t in v),
                                 _list_of(_value_is()), False)},
        "input-target": {"input": text, "target": text},
    }
    return rules[fmt]


def _first_bad_row(rows, column: str, rule: tuple) -> Optional[tuple[int, object]]:
    """The first row whose `column` breaks `rule`: by the column's Arrow type and null
    count where the type settles it (no Python objects made), else row by row."""
    import pyarrow.compute as pc

    _, ok, fast, nullable = rule
    if fast(rows.features[column]):
        values = rows.data.column(column)
        if nullable or values.null_count == 0:
            return None
        index = pc.index(pc.is_null(values), True).as_py()
        return index, None
    start = 0
    for batch in rows.select_columns([column]).iter(batch_size=1024):
        for offset, value in enumerate(batch[column]):
            if not ok(value) and not (nullable and value is None):
                return start + offset, value
        start += len(batch[column])
    return None


def _line_of_row(source: DatasetRef, index: int) -> Optional[int]:
    """The line where row `index` of a local JSON Lines or CSV file starts (blank lines
    skipped, as the readers skip them); None for other files."""
    if source.source != "file":
        return None
    path = Path(source.id)
    try:
        if path.suffix.lower() in (".json", ".jsonl"):
            with path.open(encoding="utf-8-sig") as f:
                seen = -1
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if seen == -1 and line.lstrip().startswith("["):
                        return None  # one JSON list: rows are not lines
                    seen += 1
                    if seen == index:
                        return number
        elif path.suffix.lower() == ".csv":
            import csv

            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                seen, start = -2, 1  # the header is row -1
                for record in reader:
                    if record:
                        seen += 1
                        if seen == index:
                            return start
                    start = reader.line_num + 1
    except (OSError, ValueError):
        return None
    return None


def check_columns(rows, data: DataSection, source: DatasetRef) -> None:
    """Every row's format columns hold what the format needs (text, a list of messages,
    a label …), before any row is tokenized.

    Args:
        rows: the loaded rows (they have the format's columns).
        data: the data section (data.format).
        source: where the rows came from, for the message.

    Raises:
        DatasetError: naming the first wrong row (and its line in a local JSON Lines or
            CSV file), the column, what it holds and what it should.
    """
    for column, rule in _column_rules(data.format).items():
        if column not in rows.column_names:
            continue
        bad = _first_bad_row(rows, column, rule)
        if bad is None:
            continue
        index, value = bad
        line = _line_of_row(source, index)
        at = f"row {index}" + (f" (line {line})" if line else "")
        fix = (f"fill in '{column}' in that row, or remove the row" if value is None else
               f"give '{column}' as {rule[0]} in every row (data.format {data.format})")
        raise errors.DatasetError(
            f"data.dataset: {_where(source, data)} {at}: '{column}' is "
            f"{'missing or null' if value is None else _kind(value)}, expected {rule[0]}. "
            f"Fix: {fix}.", field="data.dataset", file=source.id,
            row=index, line=line)


def _no_data_files(data: DataSection, source: DatasetRef) -> errors.DatasetError:
    return errors.DatasetError(
        f"data.data_files: no file of dataset '{source.id}' at commit {source.commit[:12]} "
        f"matches {data.data_files!r}. Fix: give the path (or glob) of a data file in the "
        "repo, e.g. data/train.jsonl, or null for the repo's default configuration.",
        field="data.data_files")


def _check_hub_data_files(data: DataSection, source: DatasetRef) -> None:
    """data.data_files matches a file of the Hub dataset at its commit, resolved by
    `datasets`' own pattern matching.

    Why before loading: when it matches nothing, load_dataset falls back to whatever
    configuration of the same repo it has cached, and fails there with a ValueError
    about its cache that says nothing of data_files.

    Raises:
        DatasetError: no file matches (field data.data_files).
    """
    from datasets import DownloadConfig
    from datasets.data_files import resolve_pattern

    try:
        resolve_pattern(data.data_files, base_path=f"hf://datasets/{source.id}@{source.commit}",
                        download_config=DownloadConfig(token=settings.hub_token()))
    except FileNotFoundError as exc:
        if errors.is_transient(exc):
            raise
        raise _no_data_files(data, source) from None


def _refuse_scalar_list(path: Path, fmt: str) -> None:
    """A JSON file that is a list of scalars, not of rows. `datasets` reads one as a
    `text` column: kept for data.format text when they are strings, refused otherwise
    (the user never named a `text` column). Decided from the first element's first
    character, so a large file is not parsed again.

    Raises:
        DatasetError: naming the file, what its list holds and the shape expected.
    """
    if path.suffix.lower() not in (".json", ".jsonl"):
        return
    with path.open("rb") as f:
        head = f.read(4096).decode("utf-8-sig", errors="replace").lstrip()
    if not head.startswith("["):
        return
    first = head[1:].lstrip()[:1]
    kind = {'"': "text", "[": "a list", "t": "a boolean", "f": "a boolean",
            "n": "null"}.get(first, "a number")
    if first in ("{", "", "]") or (fmt == "text" and kind == "text"):
        return
    raise errors.DatasetError(
        f"data.dataset: {path} is a JSON list of values ({kind} first), not of rows. Fix: "
        f"make each element an object with the columns of data.format {fmt} "
        f"({_rows_hint(fmt)}), or write JSON Lines (one such object per line).",
        field="data.dataset", file=str(path))


def load_rows(data: DataSection, source: DatasetRef):
    """The raw rows through `datasets`: a Hub repo at its commit, or a local file.

    Reading errors are translated here, once, by type: the Hub's into its typed errors,
    a connection failure left as it is (the retry policy's), and data `datasets` cannot
    read into a DatasetError naming the file, the line and the fix (_unreadable).

    Args:
        data: the data section.
        source: the rows, pinned (preflight's DatasetRef).

    Returns:
        The rows (a `datasets.Dataset`), at least one.

    Raises:
        DatasetError: an unreadable, empty, wrongly encoded or wrongly shaped file.
        HubAccessError: the Hub refused the dataset's files.
    """
    settings.prepare_client_environment()
    import datasets
    import pyarrow as pa
    from huggingface_hub import errors as hf

    cache_dir = str(settings.loraflow_home() / "datasets-cache")
    if source.source == "file":
        suffix = Path(source.id).suffix.lower()
        kind = READERS.get(suffix)
        if kind is None:
            raise errors.DatasetError(
                f"data.dataset: {source.id} is a {suffix or 'suffix-less'} file; loraflow "
                f"reads local {', '.join(READERS)} files. Fix: convert the rows to one of "
                "these (e.g. JSON Lines: one JSON object per line) and name the file with "
                "its suffix.", field="data.dataset", file=source.id)
        arguments = dict(path=kind, data_files=source.id, split="train")
        if kind == "csv":
            # pandas would read a text column of digits ("42") as numbers; its converters
            # keep the cell's text (empty cells stay null).
            arguments["converters"] = {c: str for c in TEXT_COLUMNS.get(data.format, ())}
    else:
        arguments = dict(path=source.id, revision=source.commit, data_files=data.data_files,
                         split=data.split, token=settings.hub_token())
    try:
        if source.source == "hub" and data.data_files:
            _check_hub_data_files(data, source)
        with _library_error_logs_dropped():
            rows = datasets.load_dataset(**arguments, cache_dir=cache_dir)
    except hf.HfHubHTTPError as exc:
        raise errors.translate_hub_error(exc, repo_id=source.id, repo_type="dataset",
                                         revision=source.commit,
                                         endpoint=settings.hub_endpoint()) from None
    except _read_error_types() as exc:
        if errors.is_transient(exc):
            raise  # a connection failure while reading: the retry policy's to handle
        raise _unreadable(exc, data, source) from None
    try:
        # pyarrow's JSON reader keeps bytes that are not UTF-8 inside strings: a full
        # validation finds them now, not in the middle of tokenizing.
        rows.data.table.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise _unreadable(exc, data, source) from None
    if source.source == "file" and rows.column_names == ["text"]:
        _refuse_scalar_list(Path(source.id), data.format)
    if len(rows) == 0:
        raise errors.DatasetError(
            f"data.dataset: {_where(source, data)} has no rows. Fix: give "
            f"data with at least one row of data.format {data.format} "
            f"({_rows_hint(data.format)}).", field="data.dataset", file=source.id)
    return rows
