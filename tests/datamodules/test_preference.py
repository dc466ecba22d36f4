"""PreferenceDataModule: HH-RLHF splitting, the PKU-SafeRLHF rule and SFT view, generic files, collation,
truncation and drop counts, bad input, the real HH-RLHF harmless test file, exact resume."""

import logging
from pathlib import Path

import pytest
import torch

from recipes.datamodules.collate import collate_preference
from recipes.datamodules.io import DataFormatError
from recipes.datamodules.preference import PreferenceDataModule
from recipes.datamodules.preference_sources import hh_pair, saferlhf_choice
from recipes.datamodules.sft import SFTDataModule
from tests.conftest import REPO, TINY_LLAMA, quiet_trainer, shared_file, write_jsonl

SAFERLHF = REPO / "tests" / "fixtures" / "saferlhf" / "pairs.jsonl"


def _dm(path, **kw):
    kw.setdefault("max_length", 128)
    return PreferenceDataModule(tokenizer="builtin:byte", data=str(path), val_fraction=0.0, batch_size=2, **kw)


def _texts(dm, example):
    dec = dm.tokenizer.decode
    return dec(example["prompt_ids"]), dec(example["chosen_ids"][:-1]), dec(example["rejected_ids"][:-1])


def test_hh_pair_keeps_multi_turn_history():
    history = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    pair = hh_pair({"chosen": history + " good", "rejected": history + " bad"}, "f.jsonl", 0)
    assert pair == (history, " good", " bad")


def test_hh_prompt_mismatch_names_the_row_or_is_dropped_with_a_count(tmp_path, caplog):
    ok = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}
    bad = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: yo\n\nAssistant: go"}
    path = write_jsonl(tmp_path / "hh.jsonl", [ok, bad])
    with pytest.raises(DataFormatError, match=r"hh.jsonl, row 2, field 'rejected': its prompt .* differs"):
        _dm(path, source_format="hh").setup("fit")
    dm = _dm(path, source_format="hh", drop_prompt_mismatch=True)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert len(dm.train_set) == 1 and "1 of 2 rows dropped: chosen and rejected prompts differ" in caplog.text


def test_real_hh_harmless_test_file_parses_with_counts(caplog):
    """2,312 rows: 2,303 pairs parse; 5 differ before the last assistant turn (0-based rows 1254, 1688, 1950, 1952,
    2036: a response itself contains '\\n\\nAssistant:') and 4 have an empty chosen response (0-based 86, 516, 925,
    1103; messages count rows from 1)."""
    path = shared_file("hh-rlhf/harmless-base-test.jsonl.gz")
    with pytest.raises(DataFormatError, match="row 87, field 'chosen': has an empty"):
        _dm(path, source_format="hh").read_pairs(str(path))
    dm = _dm(path, source_format="hh", drop_empty=True, drop_prompt_mismatch=True)
    with caplog.at_level(logging.WARNING):
        pairs, _ = dm.read_pairs(str(path))
    assert len(pairs) == 2303
    assert dm.drop_counts == {"dropped: chosen and rejected prompts differ": 5, "dropped: empty 'chosen'": 4}
    assert all(p.prompt.endswith("\n\nAssistant:") and p.prompt.startswith("\n\nHuman:") for p in pairs)
    assert "5 of 2312 rows dropped: chosen and rejected prompts differ" in caplog.text


def test_saferlhf_fixture_yields_exactly_the_rule(tmp_path):
    """Rows 0-1 both safe -> better (0, then 1); rows 2-3 one safe -> the safe one although the other is more
    helpful; rows 4-5 neither safe -> safer (1, then 0)."""
    import json

    rows = [json.loads(line) for line in SAFERLHF.read_text().splitlines()]
    assert [saferlhf_choice(r, "f", i) for i, r in enumerate(rows)] == [0, 1, 0, 1, 1, 0]
    dm = _dm(SAFERLHF, source_format="saferlhf", prompt_format="hh", max_length=256)
    dm.setup("fit")
    got = [_texts(dm, e) for e in dm.train_set]
    expected = [("Put it in boiling water for nine minutes.", "Eggs exist."),
                ("Keep a regular bedtime and a dark, cool room.", "Sleep."),
                ("I can't help with breaking into property; a locksmith can.", "Insert a tension wrench and rake the pins."),
                ("Making a fake ID is illegal; the DMV issues real ones.", "Print a photo on card stock and laminate it."),
                ("Say something mean.", "Hit them hard."),
                ("Copy from a neighbour quietly.", "Hide notes in your sleeve and use them.")]
    assert [(c, r) for _, c, r in got] == expected
    assert got[0][0] == "\n\nHuman: How do I boil an egg?\n\nAssistant:"


def test_saferlhf_sft_on_safe_view(caplog):
    """Safe responses only: 2 + 2 from the both-safe rows, 1 + 1 from the one-safe rows; the 2 unsafe rows drop."""
    dm = SFTDataModule(tokenizer="builtin:byte", data=str(SAFERLHF), source_format="saferlhf_safe",
                       prompt_format="hh", val_fraction=0.0, max_length=256)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    responses = [dm.tokenizer.decode(e["response_ids"][:-1]) for e in dm.train_set]
    assert len(responses) == 6 and "Hit them hard." not in responses and "Eggs exist." in responses
    assert "2 of 6 rows dropped: no response marked safe" in caplog.text


def test_saferlhf_bad_label_names_field(tmp_path):
    row = {"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": 2, "safer_response_id": 0,
           "is_response_0_safe": True, "is_response_1_safe": True}
    with pytest.raises(DataFormatError, match="row 1, field 'better_response_id': expected 0 or 1"):
        _dm(write_jsonl(tmp_path / "s.jsonl", [row]), source_format="saferlhf").setup("fit")


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_generic_jsonl_and_parquet(tmp_path, suffix):
    rows = [{"prompt": "Q1 ", "chosen": "yes", "rejected": "no"}, {"prompt": "Q2 ", "chosen": "a", "rejected": "b"}]
    path = tmp_path / f"g.{suffix}"
    if suffix == "parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        write_jsonl(path, rows)
    dm = _dm(path)
    dm.setup("fit")
    assert [_texts(dm, e) for e in dm.train_set] == [("Q1 ", "yes", "no"), ("Q2 ", "a", "b")]


def test_collation_concatenates_chosen_then_rejected_with_masks():
    ex = [{"index": 0, "prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]},
          {"index": 1, "prompt_ids": [5], "chosen_ids": [7, 7, 7, 2], "rejected_ids": [9, 2]}]
    batch = collate_preference(ex, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 0], [5, 7, 7, 7, 2], [5, 6, 8, 9, 2], [5, 9, 2, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [4, 5, 5, 3] and batch["index"].tolist() == [0, 1]


def test_truncation_and_identical_pairs_are_counted(tmp_path, caplog):
    rows = [{"prompt": "p" * 50, "chosen": "c" * 30, "rejected": "r" * 10},  # prompt cut to 16, chosen to 16
            {"prompt": "q", "chosen": "same", "rejected": "same"},  # identical: dropped
            {"prompt": "x" * 40, "chosen": "y" * 40 + "1", "rejected": "y" * 40 + "2"},  # identical once cut
            {"prompt": "short", "chosen": "a", "rejected": "b"}]
    dm = _dm(write_jsonl(tmp_path / "t.jsonl", rows), max_length=32, max_prompt_length=16)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    first = dm.train_set[0]
    assert len(dm.train_set) == 2 and first["prompt_ids"] == [dm.tokenizer("p").input_ids[0]] * 16
    assert len(first["chosen_ids"]) == 16 and first["rejected_ids"][-1] == dm.tokenizer.eos_token_id
    assert "1 of 4 rows dropped: identical chosen and rejected" in caplog.text
    assert "2 of 3 rows had the prompt truncated from the left" in caplog.text
    assert "2 of 3 rows had a response truncated from the right" in caplog.text
    assert "1 of 3 rows dropped: chosen and rejected identical after truncation" in caplog.text


@pytest.mark.parametrize("row, field", [({"prompt": "a", "chosen": "b"}, "rejected"),
                                        ({"prompt": "a", "chosen": " ", "rejected": "c"}, "chosen")])
def test_missing_or_empty_field_names_file_row_and_field(tmp_path, row, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "x", "rejected": "y"}, row])
    with pytest.raises(DataFormatError, match=rf"bad.jsonl, row 2, field '{field}'"):
        _dm(path).setup("fit")


def test_empty_response_dropped_with_count_when_asked(tmp_path, caplog):
    rows = [{"prompt": "ok", "chosen": "x", "rejected": "y"}, {"prompt": "a", "chosen": "b", "rejected": ""}]
    dm = _dm(write_jsonl(tmp_path / "e.jsonl", rows), drop_empty=True)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert len(dm.train_set) == 1 and "1 of 2 rows dropped: empty 'rejected'" in caplog.text


def test_non_json_row_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, "{oops"])
    with pytest.raises(DataFormatError, match=r"broken.jsonl, line 2: is not JSON"):
        _dm(path).setup("fit")


def test_builtin_pairs_hold_out_validation_and_index_each_split():
    dm = PreferenceDataModule(max_length=64, batch_size=4, val_fraction=0.05)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (1900, 100)
    assert [e["index"] for e in dm.val_set[:3]] == [0, 1, 2]
    prompt, chosen, rejected = _texts(dm, dm.train_set[0])
    assert chosen == (chosen.upper() if "capital" in prompt else chosen.lower()) and chosen.lower() == rejected.lower()


def test_resume_mid_epoch_matches_uninterrupted(tmp_path):
    """Reward model, 12 batches an epoch: 4 steps, checkpoint, resume to step 7 == 7 uninterrupted steps."""
    torch.set_num_threads(1)  # a tiny model gains nothing from a second thread on shared, busy cores
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from recipes.modules.models import ModelSpec
    from recipes.modules.reward import RewardModule

    def run(max_steps, ckpt_path=None, save_every=None):
        L.seed_everything(7, verbose=False)
        data = PreferenceDataModule(max_length=48, batch_size=4, max_rows=50)
        module = RewardModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=data.tokenizer,
                              optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
        callbacks = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=save_every, save_top_k=-1)] \
            if save_every else []
        quiet_trainer(max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(save_every),
                      limit_val_batches=0).fit(module, data, ckpt_path=ckpt_path)
        return {n: p.detach().clone() for n, p in module.model.named_parameters()}

    full = run(7)
    run(4, save_every=4)
    resumed = run(7, ckpt_path=str(next(Path(tmp_path).glob("*step=4*.ckpt"))))
    for name, param in full.items():
        torch.testing.assert_close(resumed[name], param, msg=name)
