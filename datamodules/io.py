"""Reading records from local files or the hub through `datasets`, with errors that name the file, row and field."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
_PARQUET_SUFFIXES = (".parquet",)
_CONVERT = "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT` for a Latin-1 file)"


class DataFormatError(ValueError):
    """A record that cannot be used, located by file, row and field, with what to do about it.

    ``row`` is the record's 0-based index (as ``enumerate`` gives it); the message counts rows from 1, so row ``k`` of
    a JSON Lines file is its line ``k``. ``line`` locates a fault in the file's text instead (a line that is not JSON,
    a byte that is not UTF-8, where a truncated file ends).
    """

    def __init__(self, source: str, row: int | None, field: str | None, problem: str, fix: str = "",
                 line: int | None = None) -> None:
        where = source
        if row is not None:
            where += f", row {row + 1}"
        if line is not None:
            where += f", line {line}"
        if field is not None:
            where += f", field '{field}'"
        message = f"{where}: {problem}"
        if fix:
            message += f". {fix}"
        super().__init__(message)
        self.source, self.row, self.field, self.line = source, row, field, line


class EmptyFieldError(DataFormatError):
    """A required text field is present but empty (data modules may drop such rows with a count instead)."""


def is_local(source: str) -> bool:
    return os.path.exists(source)


def _builder_for(path: str) -> str:
    if path.endswith(_JSON_SUFFIXES):
        return "json"
    if path.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    raise DataFormatError(path, None, None, "unknown file type", "use .json, .jsonl, .json.gz, .jsonl.gz or .parquet")


def read_bytes(path: str) -> bytes:
    """The bytes of ``path``, decompressed for ``.gz``; a truncated or corrupt gzip stream is a `DataFormatError`
    naming the line it breaks off in."""
    if not path.endswith(".gz"):
        with open(path, "rb") as f:
            return f.read()
    chunks: list[bytes] = []
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                chunks.append(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        complete = b"".join(chunks).count(b"\n")
        problem = ("the compressed data ends before the end of the gzip stream (a truncated file)"
                   if isinstance(e, EOFError) else f"is not a valid gzip file ({e})")
        raise DataFormatError(path, None, None, f"{problem}; {complete} complete lines can be read before it",
                              "download or compress the file again (`gzip -t FILE` checks a gzip file)",
                              line=complete + 1 if isinstance(e, EOFError) else None) from e
    return b"".join(chunks)


def _not_utf8(path: str, raw: bytes, error: UnicodeDecodeError) -> DataFormatError:
    """Where a byte that is not UTF-8 sits: its line, column and, in JSON, the field it is in (the last key before
    it on its line)."""
    start = raw.rfind(b"\n", 0, error.start) + 1
    line, column = raw.count(b"\n", 0, error.start) + 1, error.start - start + 1
    before = raw[start:error.start].decode("utf-8", errors="replace")
    keys = re.findall(r'"((?:[^"\\]|\\.)*)"\s*:', before)
    byte = raw[error.start:error.start + 1].hex()
    return DataFormatError(path, None, keys[-1] if keys else None,
                           f"byte 0x{byte} at column {column} is not UTF-8 ({error.reason})",
                           f"The file must be UTF-8 text: {_CONVERT}", line=line)


def read_text(path: str) -> str:
    """The text of ``path`` (gunzipped for ``.gz``) as UTF-8, or a `DataFormatError` naming the line, column and
    field of the first byte that is not UTF-8."""
    raw = read_bytes(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, raw, e) from None


def read_text_lines(path: str) -> list[tuple[int, str]]:
    """``(line number from 1, text)`` of each non-blank line of a text file, read as UTF-8 (errors as `read_text`).

    Lines end at ``\n``, ``\r\n`` or ``\r``, as in a file opened in text mode (not at the other separators that
    ``str.splitlines`` knows)."""
    lines = read_text(path).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [(i, line) for i, line in enumerate(lines, 1) if line.strip()]


def _locate_json_error(path: str) -> DataFormatError | None:
    """Find the first unreadable byte or line of a JSON/JSONL file (the slow path, run only after `datasets` failed)."""
    text = read_text(path)
    if not text.strip():
        return DataFormatError(path, None, None, "has no rows (the file holds only blank lines)",
                               "point `data` at a file with one JSON object per line")
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return DataFormatError(path, None, None, f"not valid JSON at column {e.colno}: {e.msg}",
                                   "fix the file or convert it to JSON Lines", line=e.lineno)
        return None
    for i, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028 unescaped
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return DataFormatError(path, None, None, f"is not JSON ({e.msg} at column {e.colno})",
                                   "each line of a JSONL file must be one JSON object", line=i)
        if not isinstance(row, dict):
            return DataFormatError(path, None, None, f"is a JSON {type(row).__name__}, not an object",
                                   "each line of a JSONL file must be one JSON object", line=i)
    return None


def first_rows(records: list[dict[str, Any]], max_rows: int | None, source: str) -> list[dict[str, Any]]:
    """The first ``max_rows`` records (all of them when None), logging how many of how many are used."""
    if max_rows is not None and len(records) > max_rows:
        log.info("%s: using the first %d of %d rows (max_rows)", source, max_rows, len(records))
        return records[:max_rows]
    return records


def load_records(source: str, split: str = "train", name: str | None = None) -> list[dict[str, Any]]:
    """Load every record of a local JSON/JSONL(.gz)/Parquet file or a hub dataset as a list of dicts.

    Local files go through ``datasets.load_dataset("json"|"parquet", data_files=...)``; anything else is taken as a
    hub id. An empty file is refused first; a file that `datasets` cannot read is re-scanned to name the offending
    line (a byte that is not UTF-8, a truncated gzip stream, a line that is not a JSON object).
    """
    import datasets

    if is_local(source):
        builder = _builder_for(source)
        if os.path.getsize(source) == 0:
            raise DataFormatError(source, None, None, "is empty (0 bytes): there are no rows to read",
                                  "point `data` at a file that holds the rows (was a download or copy cut short?)")
        try:  # pyarrow reads bytes that are not UTF-8 and fails only when they become str, in to_list()
            return datasets.load_dataset(builder, data_files={split: source}, split=split).to_list()
        except Exception as e:  # datasets wraps parser errors in several types; locate the row ourselves
            located = _locate_json_error(source) if builder == "json" else None
            if located is not None:
                raise located from e
            fix = ("check that it is a complete Parquet file (download it again?)" if builder == "parquet"
                   else "check that it holds JSON objects, one per line or in one list")
            raise DataFormatError(source, None, None, f"could not be read ({type(e).__name__}: {e})", fix) from e
    try:
        ds = datasets.load_dataset(source, name, split=split)
    except Exception as e:
        raise FileNotFoundError(
            f"'{source}' is neither a local file nor a reachable hub dataset ({type(e).__name__}: {e}). "
            "Download it once with `datasets` (or huggingface-cli) on a connected machine and pass the local "
            "file path instead."
        ) from e
    return ds.to_list()


# `datasets` gives a field that only other rows of the file have the value None, so null and absent look alike here
_NO_VALUE = "has no value (null, or absent from this row while other rows have it)"


def _with_values(record: Mapping[str, Any]) -> str:
    return ", ".join(sorted(k for k, v in record.items() if v is not None)) or "none"


def require_text(record: Mapping[str, Any], field: str, source: str, row: int, allow_empty: bool = False) -> str:
    """Return ``record[field]`` as a string, or raise an error naming the file, row and field."""
    if field not in record:
        raise DataFormatError(source, row, field, f"missing (fields with a value: {_with_values(record)})",
                              "add the field or map your column names to it")
    value = record[field]
    if value is None:
        raise DataFormatError(source, row, field, _NO_VALUE + f"; fields with a value: {_with_values(record)}",
                              "fill in the text, or remove the row")
    if not isinstance(value, str):
        raise DataFormatError(source, row, field, f"expected text, got {type(value).__name__} {value!r:.40}",
                              "write the value as a JSON string (in quotes)")
    if not allow_empty and not value.strip():
        raise EmptyFieldError(source, row, field, "is empty",
                              "remove the row, fill in the text, or set drop_empty: true to drop such rows with a count")
    return value


def optional_text(record: Mapping[str, Any], field: str, source: str, row: int) -> str:
    """``record[field]`` as a string, ``""`` when it is absent or null; any other type raises naming the field."""
    value = record.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataFormatError(source, row, field, f"expected text, got {type(value).__name__} {value!r:.40}",
                              'write the value as a JSON string (in quotes, e.g. "5"), or leave it out or empty')
    return value


def require_value(record: Mapping[str, Any], field: str, source: str, row: int, needs: str) -> Any:
    """``record[field]``, or an error telling a missing field from a null one; ``needs`` says what a row must hold."""
    if field not in record:
        raise DataFormatError(source, row, field, f"missing (fields with a value: {_with_values(record)})", needs)
    if record[field] is None:
        raise DataFormatError(source, row, field, _NO_VALUE + f"; fields with a value: {_with_values(record)}", needs)
    return record[field]


class DropCounter:
    """Counts rows dropped or truncated, by reason, and logs the totals once (nothing disappears silently)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.counts: dict[str, int] = {}

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self.counts[reason] = self.counts.get(reason, 0) + n

    def total(self) -> int:
        return sum(self.counts.values())

    def report(self, out_of: int) -> None:
        for reason, n in sorted(self.counts.items()):
            log.warning("%s: %d of %d rows %s", self.what, n, out_of, reason)

    def items(self) -> Iterable[tuple[str, int]]:
        return self.counts.items()
