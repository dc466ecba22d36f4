"""Reading records from local files or the hub through `datasets`, with errors that name the file, row and field."""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
_PARQUET_SUFFIXES = (".parquet",)


class DataFormatError(ValueError):
    """A record that cannot be used, located by file, row (0-based) and field, with what to do about it."""

    def __init__(self, source: str, row: int | None, field: str | None, problem: str, fix: str = "") -> None:
        where = source
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        message = f"{where}: {problem}"
        if fix:
            message += f". {fix}"
        super().__init__(message)
        self.source, self.row, self.field = source, row, field


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


def _locate_json_error(path: str) -> DataFormatError | None:
    """Find the first unreadable line of a JSON/JSONL file (the slow path, run only after `datasets` failed)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return DataFormatError(path, None, None, f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}",
                                   "fix the file or convert it to JSON Lines")
        return None
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return DataFormatError(path, i, None, f"line {i + 1} is not JSON ({e.msg})",
                                   "each line of a JSONL file must be one JSON object")
        if not isinstance(row, dict):
            return DataFormatError(path, i, None, f"line {i + 1} is a {type(row).__name__}, not an object",
                                   "each line of a JSONL file must be one JSON object")
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
    hub id. A file that `datasets` cannot read is re-scanned to name the offending line.
    """
    import datasets

    if is_local(source):
        builder = _builder_for(source)
        try:
            ds = datasets.load_dataset(builder, data_files={split: source}, split=split)
        except Exception as e:  # datasets wraps parser errors in several types; locate the row ourselves
            located = _locate_json_error(source) if builder == "json" else None
            if located is not None:
                raise located from e
            raise DataFormatError(source, None, None, f"could not be read ({e})") from e
    else:
        try:
            ds = datasets.load_dataset(source, name, split=split)
        except Exception as e:
            raise FileNotFoundError(
                f"'{source}' is neither a local file nor a reachable hub dataset ({type(e).__name__}: {e}). "
                "Download it once with `datasets` (or huggingface-cli) on a connected machine and pass the local "
                "file path instead."
            ) from e
    return ds.to_list()


def require_text(record: Mapping[str, Any], field: str, source: str, row: int, allow_empty: bool = False) -> str:
    """Return ``record[field]`` as a string, or raise an error naming the file, row and field."""
    if field not in record or record[field] is None:
        present = ", ".join(sorted(record)) or "none"
        raise DataFormatError(source, row, field, f"missing (fields present: {present})",
                              "add the field or map your column names to it")
    value = record[field]
    if not isinstance(value, str):
        raise DataFormatError(source, row, field, f"expected text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise EmptyFieldError(source, row, field, "is empty",
                              "remove the row, fill in the text, or set drop_empty: true to drop such rows with a count")
    return value


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
