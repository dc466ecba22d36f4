"""OnlinePreferenceDataModule and form_pairs: hand-made rewards give literal pairs; rounds are reproducible and
their pairs survive a state_dict round trip."""

import pytest
import torch

from recipes.datamodules.online_preference import OnlinePreferenceDataModule, form_pairs
from recipes.modules.reward_functions import CharacterFractionReward


def test_best_vs_worst_takes_first_max_against_first_min():
    """Rewards [1, 3, 1, 2]: the maximum is index 1, the first minimum index 0."""
    assert form_pairs([1.0, 3.0, 1.0, 2.0]) == ([(1, 0)], {"ties": 0, "below_margin": 0})
    assert form_pairs([0.5, -2.0, 4.0])[0] == [(2, 1)]


def test_best_vs_worst_drops_a_prompt_whose_responses_all_tie():
    assert form_pairs([2.0, 2.0, 2.0]) == ([], {"ties": 1, "below_margin": 0})


def test_all_pairs_above_margin_zero_keeps_every_strict_preference():
    """Rewards [1, 3, 1, 2], margin 0: pairs (i<j) 0-1 -> (1,0), 0-2 tie, 0-3 -> (3,0), 1-2 -> (1,2), 1-3 -> (1,3),
    2-3 -> (3,2); one tie dropped."""
    pairs, counts = form_pairs([1.0, 3.0, 1.0, 2.0], "all_pairs_above_margin", 0.0)
    assert pairs == [(1, 0), (3, 0), (1, 2), (1, 3), (3, 2)]
    assert counts == {"ties": 1, "below_margin": 0}


def test_all_pairs_above_margin_drops_small_gaps_and_counts_them():
    """Margin 1: gaps 2 (0-1), 0 (0-2, tie), 1 (0-3, not > 1), 2 (1-2), 1 (1-3), 1 (2-3)."""
    pairs, counts = form_pairs([1.0, 3.0, 1.0, 2.0], "all_pairs_above_margin", 1.0)
    assert pairs == [(1, 0), (1, 2)]
    assert counts == {"ties": 1, "below_margin": 3}


def test_unknown_pairing_is_an_error():
    with pytest.raises(ValueError, match="best_vs_worst"):
        form_pairs([1.0, 2.0], "best_of_n")


class FirstCharReward:
    """1 if a response starts with a lowercase letter, else 0 (coarse on purpose: ties happen)."""

    def __call__(self, prompts, responses, metadata=None):
        return torch.tensor([float(bool(r) and r[0].islower()) for r in responses])


def make_dm(**kwargs):
    kwargs.setdefault("reward", CharacterFractionReward(scale=10.0))
    dm = OnlinePreferenceDataModule(**{"max_length": 48, "max_new_tokens": 6, "prompts_per_round": 8, "k": 3,
                                       "batch_size": 4, "max_rows": 32, **kwargs})
    dm.setup("fit")
    return dm


def test_round_pairs_are_reproducible_and_ties_are_counted(tiny_model):
    dm = make_dm(reward=FirstCharReward())
    pairs = dm.generate_round(tiny_model, 0)
    entry = dm.history[-1]
    assert entry["pairs"] + entry["ties"] == 8 and entry["ties"] > 0  # best_vs_worst: one pair or one tie a prompt
    assert len(pairs) == entry["pairs"] and [p["index"] for p in pairs] == list(range(len(pairs)))
    for p in pairs:
        assert p["chosen_ids"] != p["rejected_ids"] and len(p["chosen_ids"]) <= 6
    again = make_dm(reward=FirstCharReward()).generate_round(tiny_model, 0)
    assert [(p["chosen_ids"], p["rejected_ids"]) for p in again] == [(p["chosen_ids"], p["rejected_ids"]) for p in pairs]


def test_reward_mean_is_the_mean_over_all_k_samples(tiny_model):
    dm = make_dm(reward=lambda prompts, responses, metadata=None: torch.arange(len(responses), dtype=torch.float))
    dm.generate_round(tiny_model, 0)
    assert dm.history[-1]["reward_mean"] == pytest.approx(sum(range(24)) / 24)  # 8 prompts x k=3 samples
    assert dm.history[-1]["pairs"] == 8


def test_state_dict_restores_the_round_pairs_and_the_generator(tiny_model):
    dm = make_dm()
    dm.train_set, dm.round = dm.generate_round(tiny_model, 0), 0
    state = dm.state_dict()
    restored = make_dm()
    restored.load_state_dict(state)
    assert restored.round == 0 and restored.train_set == dm.train_set and restored.history == dm.history
    next_a, next_b = dm.generate_round(tiny_model, 1), restored.generate_round(tiny_model, 1)
    assert [p["chosen_ids"] for p in next_a] == [p["chosen_ids"] for p in next_b]  # the generator went on alike


def test_a_round_without_pairs_is_an_error(tiny_model):
    dm = make_dm(reward=lambda prompts, responses, metadata=None: torch.zeros(len(responses)))
    with pytest.raises(RuntimeError, match="no pairs"):
        dm.generate_round(tiny_model, 0)
    assert dm.history[-1]["ties"] == 8


def test_k_below_two_is_an_error():
    with pytest.raises(ValueError, match="k=1"):
        OnlinePreferenceDataModule(reward=CharacterFractionReward(), k=1)
