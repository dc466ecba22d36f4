"""Faults in data files, through every data module that reads files (SFT, preference and its predict file, prompts,
DPO-Iter's online prompts, ranking, unpaired, code problems): each error names the file, the row (or line, counted
from 1) and the field, and says what to do (issue 16)."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from recipes.datamodules.code import load_problems
from recipes.datamodules.io import DataFormatError
from recipes.datamodules.online_preference import OnlinePreferenceDataModule
from recipes.datamodules.preference import PreferenceDataModule
from recipes.datamodules.prompts import PromptDataModule
from recipes.datamodules.ranking import RankingDataModule
from recipes.datamodules.sft import SFTDataModule
from recipes.datamodules.unpaired import UnpairedDataModule


@dataclass
class Reader:
    """One way of reading a file: a good row, its main text field, and the call that reads the file."""

    name: str
    row: dict[str, Any]
    field: str
    read: Callable[[str], Any]


def _fit(cls, **kw):
    def read(path: str) -> None:
        cls(tokenizer="builtin:byte", data=path, max_length=64, **kw).setup("fit")
    return read


def _predict(path: str) -> None:
    PreferenceDataModule(max_length=64, predict_data=path).setup("predict")


HUMANEVAL = {"task_id": "t/0", "prompt": "def f():\n", "test": "def check(f):\n    pass\n", "entry_point": "f"}
READERS = [
    Reader("sft", {"prompt": "a", "response": "b"}, "response",
           _fit(SFTDataModule, source_format="prompt_response", prompt_format="plain", val_fraction=0.0, batch_size=1)),
    Reader("sft-alpaca", {"instruction": "a", "input": "x", "output": "b"}, "output",
           _fit(SFTDataModule, source_format="alpaca", val_fraction=0.0, batch_size=1)),
    Reader("preference", {"prompt": "a", "chosen": "b", "rejected": "c"}, "chosen",
           _fit(PreferenceDataModule, val_fraction=0.0, batch_size=1)),
    Reader("preference-predict", {"prompt": "a", "response": "b"}, "response", _predict),
    Reader("prompts", {"prompt": "a"}, "prompt", _fit(PromptDataModule, rollout_batch_size=1)),
    Reader("prompts-alpaca", {"instruction": "a", "input": "x"}, "instruction",
           _fit(PromptDataModule, source_format="alpaca", rollout_batch_size=1)),
    Reader("ranking", {"prompt": "a", "responses": ["b", "c"], "scores": [1.0, 0.0]}, "prompt",
           _fit(RankingDataModule, val_fraction=0.0, batch_size=1)),
    Reader("unpaired", {"prompt": "a", "completion": "b", "label": True}, "completion",
           _fit(UnpairedDataModule, source_format="unpaired", val_fraction=0.0, batch_size=2)),
    Reader("online-preference", {"prompt": "a"}, "prompt", _fit(OnlinePreferenceDataModule, reward=lambda *a: None)),
    Reader("code", HUMANEVAL, "prompt", load_problems),
    Reader("code-prompts", HUMANEVAL, "prompt", _fit(PromptDataModule, source_format="code", rollout_batch_size=1)),
]
IDS = [r.name for r in READERS]


def _rows(reader: Reader, n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        row = dict(reader.row)
        if "task_id" in row:
            row["task_id"] = f"t/{i}"  # code problems need unique ids
        rows.append(row)
    return rows


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.mark.parametrize("reader", READERS, ids=IDS)
def test_a_byte_that_is_not_utf8_names_line_and_field(tmp_path, reader):
    """Line 3 holds a Latin-1 'é' (byte 0xe9) in the reader's text field: was a bare UnicodeDecodeError."""
    rows = _rows(reader, 3)
    rows[2][reader.field] = "caf\x00"
    raw = _jsonl(rows).replace(b"caf\\u0000", b"caf\xe9")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(raw)
    with pytest.raises(DataFormatError, match=rf"latin1.jsonl, line 3, field '{reader.field}': byte 0xe9 at column "
                                              r"\d+ is not UTF-8.*The file must be UTF-8 text: save it as UTF-8"):
        reader.read(str(path))


@pytest.mark.parametrize("reader", READERS, ids=IDS)
def test_a_gzip_file_cut_halfway_names_where_it_ends(tmp_path, reader):
    """The first half of a gzip stream: was a bare EOFError ("Compressed file ended before the end-of-stream
    marker"). The message says how many complete lines precede the cut and what to do."""
    data = gzip.compress(_jsonl(_rows(reader, 400)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match=r"cut.jsonl.gz, line \d+: the compressed data ends before the end of "
                                              r"the gzip stream \(a truncated file\); \d+ complete lines .*gzip -t"):
        reader.read(str(path))


@pytest.mark.parametrize("reader", READERS, ids=IDS)
def test_an_empty_file_says_so(tmp_path, reader):
    """A 0-byte file: was "could not be read ()"."""
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(DataFormatError, match=r"empty.jsonl: is empty \(0 bytes\): there are no rows to read\. point "
                                              r"`data` at a file that holds the rows"):
        reader.read(str(path))


@pytest.mark.parametrize("reader", READERS, ids=IDS)
def test_a_null_field_is_not_called_missing(tmp_path, reader):
    """Row 3 has ``"<field>": null``: the message said "missing (fields present: ..., <field>)"."""
    rows = _rows(reader, 3)
    rows[2][reader.field] = None
    path = tmp_path / "null.jsonl"
    path.write_bytes(_jsonl(rows))
    with pytest.raises(DataFormatError, match=rf"null.jsonl, row 3, field '{reader.field}': has no value \(null, or "
                                              r"absent from this row") as info:
        reader.read(str(path))
    present = str(info.value).split("fields with a value: ")[1].split(".")[0]
    assert reader.field not in present.split(", ")


@pytest.mark.parametrize("reader", [r for r in READERS if r.name in ("sft-alpaca", "prompts-alpaca")],
                         ids=["sft-alpaca", "prompts-alpaca"])
def test_alpaca_input_that_is_not_text(tmp_path, reader):
    """Row 2 has ``"input": 5``: was ``AttributeError: 'int' object has no attribute 'strip'``."""
    rows = _rows(reader, 2)
    rows[1]["input"] = 5
    path = tmp_path / "alpaca.jsonl"
    path.write_bytes(_jsonl(rows))
    with pytest.raises(DataFormatError, match=r"alpaca.jsonl, row 2, field 'input': expected text, got int 5\. write "
                                              r"the value as a JSON string \(in quotes, e.g. \"5\"\)"):
        reader.read(str(path))


def test_alpaca_input_null_or_absent_is_no_input(tmp_path):
    """``input`` is optional in Alpaca: null and absent both mean no input block, as an empty string does."""
    rows = [{"instruction": "a", "input": None, "output": "b"}, {"instruction": "a", "output": "b"},
            {"instruction": "a", "input": "", "output": "b"}]
    path = tmp_path / "alpaca.jsonl"
    path.write_bytes(_jsonl(rows))
    dm = SFTDataModule(data=str(path), val_fraction=0.0, batch_size=1, max_length=256)
    dm.setup("fit")
    assert len({tuple(e["prompt_ids"]) for e in dm.train_set}) == 1


def test_apps_starter_code_that_is_not_text(tmp_path):
    row = {"problem_id": 1, "question": "q", "input_output": json.dumps({"inputs": ["1"], "outputs": ["1"]}),
           "starter_code": 5}
    path = tmp_path / "apps.jsonl"
    path.write_bytes(_jsonl([row]))
    with pytest.raises(DataFormatError, match=r"apps.jsonl, row 1, field 'starter_code': expected text, got int"):
        load_problems(str(path))


def test_prompt_text_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"first\n\nsecond \xff prompt\n")
    with pytest.raises(DataFormatError, match=r"prompts.txt, line 3: byte 0xff at column 8 is not UTF-8"):
        PromptDataModule(data=str(path), rollout_batch_size=1, max_length=64).setup("fit")


def test_prompt_text_file_lines_split_as_in_text_mode(tmp_path):
    """``\\r\\n`` and ``\\r`` end lines; a form feed inside a prompt does not (``str.splitlines`` would split it)."""
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"one\r\ntwo\x0cthree\rfour\n\n")
    dm = PromptDataModule(data=str(path), rollout_batch_size=1, max_length=64)
    dm.setup("fit")
    assert [r["prompt"] for r in dm.train_set] == ["one", "two\x0cthree", "four"]


def test_json_array_with_a_bad_byte_names_its_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(b'[\n {"instruction": "a", "output": "b"},\n {"instruction": "a",\n  "output": "caf\xe9"},\n'
                     b' {"instruction": "a", "output": "b"}\n]\n')
    with pytest.raises(DataFormatError, match=r"rows.json, line 4, field 'output': byte 0xe9 at column 17"):
        SFTDataModule(data=str(path), val_fraction=0.0, batch_size=1).setup("fit")


def test_a_file_named_gz_that_is_not_gzip(tmp_path):
    path = Path(tmp_path / "plain.jsonl.gz")
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n')
    with pytest.raises(DataFormatError, match=r"plain.jsonl.gz: is not a valid gzip file .*gzip -t"):
        READERS[0].read(str(path))
