"""PromptDataModule: each source format, left padding, counted drops of long prompts, clear errors on empty files."""

import logging

import pytest

from recipes.datamodules.collate import pad_prompts
from recipes.datamodules.io import DataFormatError
from recipes.datamodules.prompts import PromptDataModule
from tests.conftest import write_jsonl


def _batch(dm):
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_left_padding_and_metadata(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "target": 1}, {"prompt": "hello you", "target": 2}])
    dm = PromptDataModule(data=str(path), rollout_batch_size=2, max_length=64)
    batch = _batch(dm)
    assert batch["input_ids"].shape == (2, 9)
    short = batch["prompts"].index("hi")
    assert batch["attention_mask"][short].tolist() == [0] * 7 + [1] * 2  # left-padded
    assert batch["metadata"][short] == {"target": 1}


def test_pad_prompts_by_hand():
    out = pad_prompts([{"input_ids": [5], "prompt": "a", "metadata": {}},
                       {"input_ids": [6, 7, 8], "prompt": "b", "metadata": {}}], pad_token_id=0)
    assert out["input_ids"].tolist() == [[0, 0, 5], [6, 7, 8]]
    assert out["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]


def test_source_formats(tmp_path):
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: and?\n\nAssistant: ok",
                                              "rejected": "x"}])
    dm = PromptDataModule(data=str(hh), source_format="hh", rollout_batch_size=1)
    assert _batch(dm)["prompts"] == ["\n\nHuman: hi\n\nAssistant: yo\n\nHuman: and?\n\nAssistant:"]
    safe = write_jsonl(tmp_path / "safe.jsonl", [{"prompt": "How do I fix a bike?", "response_0": "..."}])
    dm = PromptDataModule(data=str(safe), source_format="saferlhf", prompt_format="hh", rollout_batch_size=1)
    assert _batch(dm)["prompts"] == ["\n\nHuman: How do I fix a bike?\n\nAssistant:"]
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "1 2", "output": "3"}])
    dm = PromptDataModule(data=str(alpaca), source_format="alpaca", prompt_format="alpaca", rollout_batch_size=1,
                          max_length=512)
    assert _batch(dm)["prompts"][0].endswith("### Input:\n1 2\n\n### Response:\n")
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\n")
    dm = PromptDataModule(data=str(txt), rollout_batch_size=2)
    assert sorted(_batch(dm)["prompts"]) == ["first", "second"]


def test_long_prompts_are_dropped_and_counted(tmp_path, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x" * n} for n in (4, 40, 5, 50)])
    dm = PromptDataModule(data=str(path), rollout_batch_size=2, max_length=20, max_prompt_length=10)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert len(dm.train_set) == 2 and dm.counts["kept"] == 2 and dm.counts["rows"] == 4
    assert "2 of 4 rows dropped: longer than max_prompt_length=10" in caplog.text
    dm = PromptDataModule(data=str(path), rollout_batch_size=2, max_prompt_length=10, long_prompts="truncate")
    dm.setup("fit")
    assert max(len(r["input_ids"]) for r in dm.train_set) == 10 and len(dm.train_set) == 4


def test_empty_file_and_nothing_usable_are_errors_with_counts(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataFormatError, match=r"empty.txt: has no prompts \(0 rows\)"):
        PromptDataModule(data=str(empty)).setup("fit")
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 40}] * 3)
    with pytest.raises(DataFormatError, match="has no usable prompt: .*'rows': 3, 'kept': 0"):
        PromptDataModule(data=str(path), max_prompt_length=10, rollout_batch_size=1).setup("fit")
    few = write_jsonl(tmp_path / "few.jsonl", [{"prompt": "a"}])
    with pytest.raises(DataFormatError, match="fewer than one rollout"):
        PromptDataModule(data=str(few), rollout_batch_size=4).setup("fit")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}])
    with pytest.raises(DataFormatError, match="row 1, field 'prompt'"):
        PromptDataModule(data=str(bad), rollout_batch_size=1).setup("fit")
