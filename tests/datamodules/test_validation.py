"""Data module settings outside their domain are refused at construction (batch sizes, val_fraction, token budgets);
a split or a token budget that leaves nothing to train on is refused at setup, truncation counts are logged and kept,
and a DPO-Iter reward returning nan is refused naming the rows."""

import logging

import pytest
import torch

from recipes.datamodules.io import DataFormatError
from recipes.datamodules.online_preference import OnlinePreferenceDataModule
from recipes.datamodules.preference import PreferenceDataModule
from recipes.datamodules.prompts import PromptDataModule
from recipes.datamodules.ranking import RankingDataModule
from recipes.datamodules.sft import SFTDataModule
from recipes.modules.guards import NonFiniteError
from recipes.modules.reward_functions import CharacterFractionReward
from tests.conftest import write_jsonl

SPLIT_MODULES = [SFTDataModule, PreferenceDataModule, RankingDataModule]


def online(**kwargs):
    return OnlinePreferenceDataModule(reward=CharacterFractionReward(), **kwargs)


@pytest.mark.parametrize("build, message", [
    (lambda: SFTDataModule(batch_size=0), r"SFTDataModule: batch_size=0 must be >= 1\. Each batch needs at least one "
                                          r"row; set data.batch_size >= 1"),
    (lambda: PreferenceDataModule(batch_size=0), r"PreferenceDataModule: batch_size=0 must be >= 1"),
    (lambda: RankingDataModule(batch_size=-2), r"RankingDataModule: batch_size=-2 must be >= 1"),
    (lambda: PromptDataModule(rollout_batch_size=0), r"PromptDataModule: rollout_batch_size=0 must be >= 1"),
    (lambda: online(batch_size=0), r"OnlinePreferenceDataModule: batch_size=0 must be >= 1"),
    (lambda: online(prompts_per_round=0), r"OnlinePreferenceDataModule: prompts_per_round=0 must be >= 1"),
    (lambda: online(margin=-1.0), r"OnlinePreferenceDataModule: margin=-1.0 must be >= 0"),
    (lambda: SFTDataModule(max_rows=0), r"SFTDataModule: max_rows=0 must be >= 1\. Use null to read every row"),
], ids=["sft", "preference", "ranking", "prompts", "online", "prompts_per_round", "margin", "max_rows"])
def test_sizes_outside_their_domain_are_refused_at_construction(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("cls", SPLIT_MODULES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("fraction", [1.0, -0.1])
def test_val_fraction_must_leave_training_rows(cls, fraction):
    """val_fraction 1.0 used to train on 0 rows and exit 0."""
    with pytest.raises(ValueError, match=rf"{cls.__name__}: val_fraction={fraction} must be in \[0.0, 1.0\)\. 1 would "
                                         r"hold out every row and train on none"):
        cls(val_fraction=fraction)


@pytest.mark.parametrize("cls, row", [
    (SFTDataModule, {"instruction": "Echo.", "output": "ab"}),
    (PreferenceDataModule, {"prompt": "Q", "chosen": "yes", "rejected": "no"}),
    (RankingDataModule, {"prompt": "Q", "responses": ["yes", "no"], "scores": [1.0, 0.0]}),
], ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_a_holdout_of_every_row_is_refused_at_setup(cls, row, tmp_path):
    """One row and val_fraction 0.05: at least one row is held out, so none would be left to train on."""
    dm = cls(data=str(write_jsonl(tmp_path / "one.jsonl", [row])), val_fraction=0.05, max_length=64)
    with pytest.raises(DataFormatError, match=r"one.jsonl: has 1 usable rows and val_fraction=0.05 holds out all of "
                                              r"them, leaving none to train on\. add rows, lower data.val_fraction"):
        dm.setup("fit")


def test_sft_prompt_budget_must_leave_room_for_the_response():
    with pytest.raises(ValueError, match=r"SFTDataModule: max_prompt_length \(64\) must be in \(0, max_length=64\): a "
                                         r"prompt cut to max_prompt_length must leave the response at least one token"):
        SFTDataModule(max_length=64, max_prompt_length=64)


def test_sft_truncation_counts_are_logged_and_kept(tmp_path, caplog):
    """max_length 8, prompt budget 4: the 10-byte prompt keeps 4 bytes, so 4 of the 5 tokens of 'abcd' + EOS fit."""
    rows = [{"instruction": "x" * 10, "output": "abcd"}, {"instruction": "q", "output": "r"}]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    dm = SFTDataModule(data=path, prompt_format="plain", max_length=8, val_fraction=0.0)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert "d.jsonl: 1 of 2 rows had the prompt truncated from the left" in caplog.text
    assert dm.counts == {f"{path}: had the prompt truncated from the left": 1,
                         f"{path}: had the response truncated from the right (no EOS learned)": 1}
    assert [len(e["response_ids"]) for e in dm.train_set] == [4, 2]


@pytest.mark.parametrize("cls, row", [
    (PreferenceDataModule, {"prompt": "Q", "chosen": "the same start, then A", "rejected": "the same start, then B"}),
    (RankingDataModule, {"prompt": "Q", "responses": ["the same start A", "the same start B"], "scores": [1.0, 0.0]}),
], ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_a_max_length_that_leaves_no_difference_is_refused(cls, row, tmp_path, caplog):
    """max_length 6: both responses keep only 'the s' (5 of the 6 tokens, after the 1-byte prompt), so every row is
    dropped as identical; this used to train on 0 rows and exit 0."""
    dm = cls(data=str(write_jsonl(tmp_path / "p.jsonl", [row] * 3)), max_length=6, val_fraction=0.0)
    refused = pytest.raises(DataFormatError, match=r"p.jsonl: has no (pair|row) left after fitting 3 \w+ into "
                                                   r"max_length=6")
    with caplog.at_level(logging.WARNING), refused:
        dm.setup("fit")
    assert "3 of 3 rows" in caplog.text  # the drops are counted in the log as well


def test_a_dpo_iter_reward_returning_nan_is_refused(tiny_model):
    dm = OnlinePreferenceDataModule(reward=lambda p, r, m=None: torch.tensor([float("nan")] + [1.0] * (len(r) - 1)),
                                    max_length=48, max_new_tokens=4, prompts_per_round=2, k=2, max_rows=8)
    dm.setup("fit")
    with pytest.raises(NonFiniteError, match=r"DPO-Iter round 0: reward function <lambda> returned non-finite "
                                             r"scores for rows \[0\] of 4"):
        dm.generate_round(tiny_model, 0)
