"""Critic-free advantage estimators on literal groups, the arithmetic written out."""

import pytest
import torch

from recipes.modules.advantages import GroupNormalizedAdvantage, LeaveOneOutAdvantage


def test_group_normalized_advantage_standardizes_each_group():
    """Groups [1, 2, 3] and [0, 0, 4]: means 2 and 4/3; unbiased stds 1 and sqrt(((4/3)^2 * 2 + (8/3)^2) / 2)
    = sqrt(16/3) = 2.3094; so A = [-1, 0, 1] / (1 + 1e-4) and [-4/3, -4/3, 8/3] / (2.3094 + 1e-4)."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])
    std2 = (16 / 3) ** 0.5
    expected = torch.tensor([-1 / 1.0001, 0.0, 1 / 1.0001, -4 / 3 / (std2 + 1e-4), -4 / 3 / (std2 + 1e-4),
                             8 / 3 / (std2 + 1e-4)])
    torch.testing.assert_close(GroupNormalizedAdvantage()(rewards, 3), expected)


def test_dr_grpo_only_centers():
    """``scale_by_std=False``: [1, 2, 3] -> [-1, 0, 1]; [0, 0, 4] -> [-4/3, -4/3, 8/3]."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])
    expected = torch.tensor([-1.0, 0.0, 1.0, -4 / 3, -4 / 3, 8 / 3])
    torch.testing.assert_close(GroupNormalizedAdvantage(scale_by_std=False)(rewards, 3), expected)


@pytest.mark.parametrize("estimator", [GroupNormalizedAdvantage(), GroupNormalizedAdvantage(scale_by_std=False),
                                       LeaveOneOutAdvantage()])
def test_a_group_of_equal_rewards_has_zero_advantage(estimator):
    """All four responses scored 10: nothing to prefer, advantage exactly 0 (no 0/0)."""
    advantages = estimator(torch.tensor([10.0, 10.0, 10.0, 10.0, 0.0, 10.0, 0.0, 10.0]), 4)
    assert advantages[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert torch.isfinite(advantages).all() and advantages[4:].abs().sum() > 0


def test_leave_one_out_baseline():
    """[1, 2, 6]: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 -> A = [-3, -1.5, 4.5]
    (= 3/2 * (r - mean 3)); [5, 1]: A = [4, -4]."""
    advantages = LeaveOneOutAdvantage()(torch.tensor([1.0, 2.0, 6.0]), 3)
    torch.testing.assert_close(advantages, torch.tensor([-3.0, -1.5, 4.5]))
    torch.testing.assert_close(LeaveOneOutAdvantage()(torch.tensor([5.0, 1.0]), 2), torch.tensor([4.0, -4.0]))


@pytest.mark.parametrize("estimator", [GroupNormalizedAdvantage(), LeaveOneOutAdvantage()])
def test_group_estimators_refuse_groups_of_one_and_ragged_batches(estimator):
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        estimator(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="do not form groups of 2"):
        estimator(torch.tensor([1.0, 2.0, 3.0]), 2)
