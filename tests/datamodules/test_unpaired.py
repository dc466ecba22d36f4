"""UnpairedDataModule: TRL-format rows, conversion from pairs (labels, order, pair-wise holdout, identical pairs),
errors naming file/row/field, drop and truncation counts, the mismatched KL batch, the lone last batch, resume."""

import logging

import pytest
import torch

from recipes.datamodules.collate import collate_unpaired
from recipes.datamodules.io import DataFormatError
from recipes.datamodules.unpaired import UnpairedDataModule
from tests.conftest import write_jsonl

ROWS = [{"prompt": "Q1 ", "completion": "yes", "label": True}, {"prompt": "Q2 ", "completion": "no", "label": False},
        {"prompt": "Q3 ", "completion": "maybe", "label": True}]


def _dm(path, **kw):
    kw.setdefault("max_length", 128)
    kw.setdefault("source_format", "unpaired")
    return UnpairedDataModule(tokenizer="builtin:byte", data=str(path), val_fraction=0.0, batch_size=2, **kw)


def _texts(dm, examples):
    dec = dm.tokenizer.decode
    return [(dec(e["prompt_ids"]), dec(e["completion_ids"][:-1]), e["label"]) for e in examples]


def test_trl_unpaired_rows_are_read_with_eos_and_labels(tmp_path):
    dm = _dm(write_jsonl(tmp_path / "kto.jsonl", ROWS))
    dm.setup("fit")
    assert _texts(dm, dm.train_set) == [("Q1 ", "yes", True), ("Q2 ", "no", False), ("Q3 ", "maybe", True)]
    assert all(e["completion_ids"][-1] == dm.tokenizer.eos_token_id for e in dm.train_set)
    assert [e["index"] for e in dm.train_set] == [0, 1, 2]


def test_prompt_format_renders_unpaired_prompts(tmp_path):
    dm = _dm(write_jsonl(tmp_path / "kto.jsonl", ROWS[:2]), prompt_format="hh")
    dm.setup("fit")
    assert _texts(dm, dm.train_set)[0][0] == "\n\nHuman: Q1 \n\nAssistant:"


def test_pairs_convert_to_chosen_true_rejected_false(tmp_path, caplog):
    """Two usable pairs and one identical pair (dropped, counted). Order: pair A's chosen, pair C's rejected, then
    the other halves, so that neighbours differ in prompt and labels alternate."""
    pairs = [{"prompt": "A ", "chosen": "good", "rejected": "bad"},
             {"prompt": "B ", "chosen": "same", "rejected": "same"},
             {"prompt": "C ", "chosen": "fine", "rejected": "poor"}]
    dm = _dm(write_jsonl(tmp_path / "pairs.jsonl", pairs), source_format="generic")
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert _texts(dm, dm.train_set) == [("A ", "good", True), ("C ", "poor", False), ("A ", "bad", False),
                                        ("C ", "fine", True)]
    assert "1 of 3 rows dropped: identical chosen and rejected" in caplog.text
    assert dm.drop_counts == {"dropped: identical chosen and rejected (one completion labelled both ways)": 1}


def test_builtin_pairs_are_held_out_whole():
    """40 built-in pairs, a quarter held out: 30 pairs -> 60 training rows, 10 pairs -> 20 validation rows, and no
    validation prompt is a training prompt (a pair's two rows stay in one split)."""
    dm = UnpairedDataModule(max_length=64, batch_size=4, max_rows=40, val_fraction=0.25)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (60, 20)
    prompts = {split: {tuple(e["prompt_ids"]) for e in getattr(dm, split)} for split in ("train_set", "val_set")}
    assert len(prompts["val_set"]) == 10 and not prompts["val_set"] & prompts["train_set"]
    assert [e["label"] for e in dm.val_set] == [True, False] * 5 + [False, True] * 5
    assert all(a["prompt_ids"] != b["prompt_ids"] for a, b in zip(dm.val_set, dm.val_set[1:]))
    prompt, completion, _ = _texts(dm, dm.val_set[:1])[0]
    assert completion == (completion.upper() if "capital" in prompt else completion.lower())


@pytest.mark.parametrize("row, field, problem", [
    ({"prompt": "a", "completion": "b"}, "label", "has no value"),
    ({"prompt": "a", "completion": "b", "label": "yes"}, "label", "expected true/false, got 'yes'"),
    ({"prompt": "a", "completion": "b", "label": 1}, "label", "expected true/false, got 1"),
    ({"prompt": "a", "label": True}, "completion", "has no value"),  # other rows have it: datasets fills None
    ({"prompt": "a", "completion": " ", "label": True}, "completion", "is empty"),
    ({"prompt": 3, "completion": "b", "label": True}, "prompt", "expected text"),
])
def test_bad_row_names_file_row_and_field(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(DataFormatError, match=rf"bad.jsonl, row 2, field '{field}': {problem}"):
        _dm(path).setup("fit")


def test_empty_completion_dropped_with_count_when_asked(tmp_path, caplog):
    rows = [ROWS[0], {"prompt": "a", "completion": "", "label": False}, ROWS[1]]
    dm = _dm(write_jsonl(tmp_path / "e.jsonl", rows), drop_empty=True)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert len(dm.train_set) == 2 and "1 of 3 rows dropped: empty 'completion'" in caplog.text


def test_truncation_is_counted(tmp_path, caplog):
    rows = [{"prompt": "p" * 50, "completion": "c" * 30, "label": True},  # prompt cut to 16, completion to 16
            {"prompt": "short", "completion": "a", "label": False}]
    dm = _dm(write_jsonl(tmp_path / "t.jsonl", rows), max_length=32, max_prompt_length=16)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    first = dm.train_set[0]
    assert len(first["prompt_ids"]) == 16 and len(first["completion_ids"]) == 16
    assert first["completion_ids"][-1] != dm.tokenizer.eos_token_id
    assert "1 of 2 rows had the prompt truncated from the left" in caplog.text
    assert "1 of 2 rows had the completion truncated from the right" in caplog.text
    assert dm.truncation_counts == {"had the prompt truncated from the left": 1,
                                    "had the completion truncated from the right (no EOS learned)": 1}


def test_bad_settings_are_refused_at_construction():
    with pytest.raises(ValueError, match="batch_size=1 must be >= 2"):
        UnpairedDataModule(batch_size=1)
    with pytest.raises(ValueError, match="source_format='kto'"):
        UnpairedDataModule(source_format="kto")
    with pytest.raises(ValueError, match="max_prompt_length"):
        UnpairedDataModule(max_length=16, max_prompt_length=16)


def test_kl_batch_pairs_each_prompt_with_the_next_rows_completion():
    ex = [{"index": 0, "prompt_ids": [5, 6], "completion_ids": [7, 2], "label": True},
          {"index": 1, "prompt_ids": [5], "completion_ids": [8, 8, 8, 2], "label": False},
          {"index": 2, "prompt_ids": [4, 4, 4], "completion_ids": [9, 2], "label": True}]
    batch = collate_unpaired(ex, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 0], [5, 8, 8, 8, 2], [4, 4, 4, 9, 2]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert batch["kl_input_ids"].tolist() == [[5, 6, 8, 8, 8, 2], [5, 9, 2, 0, 0, 0], [4, 4, 4, 7, 2, 0]]
    assert batch["kl_completion_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]]
    assert batch["kl_attention_mask"].sum(1).tolist() == [6, 3, 5]
    assert batch["label"].tolist() == [True, False, True] and batch["index"].tolist() == [0, 1, 2]
    alone = collate_unpaired(ex[:1], pad_token_id=0)  # one row: its own completion (no other to borrow)
    assert alone["kl_input_ids"].tolist() == alone["input_ids"].tolist()


def test_lone_last_training_batch_is_left_out_with_a_warning(tmp_path, caplog):
    dm = _dm(write_jsonl(tmp_path / "kto.jsonl", ROWS))  # 3 rows, batch 2: the last batch would hold 1 row
    dm.setup("fit")
    with caplog.at_level(logging.WARNING):
        batches = list(dm.train_dataloader())
    assert [len(b["label"]) for b in batches] == [2] and "it is left out" in caplog.text
    dm = _dm(write_jsonl(tmp_path / "kto4.jsonl", ROWS + ROWS[:1]))
    dm.setup("fit")
    assert [len(b["label"]) for b in dm.train_dataloader()] == [2, 2]


def test_resume_skips_the_consumed_batches():
    """After 2 consumed batches a restored module's loader yields exactly the uninterrupted loader's batches 3..."""
    def module():
        dm = UnpairedDataModule(max_length=64, batch_size=4, max_rows=20, val_fraction=0.0)
        dm.setup("fit")
        return dm

    full = [b["index"].tolist() for b in module().train_dataloader()]
    resumed = module()
    resumed.load_state_dict({"consumed_batches": 2})
    assert len(full) == 10 and [b["index"].tolist() for b in resumed.train_dataloader()] == full[2:]
    assert torch.equal(torch.tensor(sorted(sum(full, []))), torch.arange(40))
