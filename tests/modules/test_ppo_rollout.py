"""Hand-derived values for modules/ppo_rollout.py: the critic's running-moment units, the scoring of decoded
responses (standardize, clip, penalty) and the rollout metrics."""

import math

import pytest
import torch

from recipes.modules.ppo_rollout import (
    in_reward_units,
    rollout_metrics,
    score_responses,
    standardize_values,
    value_scale,
)
from recipes.modules.rl_utils import RunningMoments
from recipes.modules.types import ScoredResponses


def moments_of(*values):
    moments = RunningMoments()
    moments.update(torch.tensor(values))
    return moments


def test_value_scale_is_the_identity_until_two_returns():
    assert value_scale(None) == (0.0, 1.0) and value_scale(RunningMoments()) == (0.0, 1.0)
    assert value_scale(moments_of(3.0)) == (0.0, 1.0)
    # 2 and 9: mean 5.5, unbiased std sqrt(2 x 3.5^2) = 4.9497
    assert value_scale(moments_of(2.0, 9.0)) == pytest.approx((5.5, math.sqrt(24.5)))


def test_in_reward_units_and_standardize_values_by_hand():
    """Values (1, -1) under moments of (2, 9) are 5.5 +- 4.9497 in reward units. Then returns 2, 2 and 9, 9, 9 (one
    padded entry) join no earlier moments: mean 31 / 5 = 6.2, unbiased var (2 x 4.2^2 + 3 x 2.8^2) / 4 = 14.7."""
    torch.testing.assert_close(in_reward_units(torch.tensor([1.0, -1.0]), moments_of(2.0, 9.0)),
                               torch.tensor([5.5 + 24.5**0.5, 5.5 - 24.5**0.5]))
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    returns = torch.tensor([[2.0, 2, 7], [9, 9, 9]])  # the 7 is padding: not counted, and 0 afterwards
    raw_values = torch.tensor([[6.2, 0.0, 1.0], [2.0, 6.2 + 14.7**0.5, 3.0]])
    moments = RunningMoments()
    values, standardized = standardize_values(raw_values, returns, mask, moments)
    assert moments.count == 5 and (moments.mean, moments.var) == pytest.approx((6.2, 14.7))
    s = 14.7**0.5
    torch.testing.assert_close(standardized, torch.tensor([[-4.2 / s, -4.2 / s, 0], [2.8 / s, 2.8 / s, 2.8 / s]]))
    torch.testing.assert_close(values, torch.tensor([[0.0, -6.2 / s, 0], [-4.2 / s, 1.0, -3.2 / s]]))


class Tokens:
    """A tokenizer whose ids are characters: 0 is EOS (a special token), the rest ``chr(id)``."""

    def batch_decode(self, rows, skip_special_tokens):
        return ["".join(chr(int(i)) for i in row if not (skip_special_tokens and int(i) == 0)) for row in rows]


def test_score_responses_standardizes_then_clips_then_penalizes():
    """Responses "ab" + EOS and "bbb" (cut, no EOS), raw scores 2 and 9: standardized by their own moments
    (mean 5.5, std 4.9497) to -0.7071 and 0.7071, clipped to +-0.5; the cut one gets the penalty -1 instead."""
    calls = []

    def reward(prompts, responses, metadata=None):
        calls.append((prompts, responses, metadata))
        return torch.tensor([2, 9])  # integers: cast to float

    a, b = ord("a"), ord("b")
    ids, mask = torch.tensor([[a, b, 0, 0], [b, b, b, b]]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    batch = {"prompts": ["p1", "p2"], "metadata": [{}, {"x": 1}]}
    moments = RunningMoments()
    scored = score_responses(reward, Tokens(), batch, ids, mask, torch.tensor([True, False]), -1.0, 0.5, moments,
                             torch.device("cpu"))
    assert calls == [(["p1", "p2"], ["ab", "bbbb"], [{}, {"x": 1}])] and scored.texts == ["ab", "bbbb"]
    torch.testing.assert_close(scored.raw_scores, torch.tensor([2.0, 9.0]))
    torch.testing.assert_close(scored.scores, torch.tensor([-0.5, -1.0]))
    assert moments.count == 2
    unnormalized = score_responses(reward, Tokens(), batch, ids, mask, torch.tensor([True, True]), None, None, None,
                                   torch.device("cpu"))
    torch.testing.assert_close(unnormalized.scores, torch.tensor([2.0, 9.0]))


def test_rollout_metrics_by_hand():
    """Two rows of 2 and 1 response tokens; k1 KL = logprob - ref: row sums 0.5 + 0.25 and 1.0, mean 0.875.
    Entropy token mean (1 + 2 + 3) / 3 = 2; lengths 2 and 1; advantages token mean (1 + 3 + 5) / 3 = 3."""
    mask = torch.tensor([[1.0, 1], [1, 0]])
    old, ref = torch.tensor([[-1.0, -1.0], [-1.0, -5.0]]), torch.tensor([[-1.5, -1.25], [-2.0, 0.0]])
    scored = ScoredResponses(["x", "y"], torch.tensor([1.0, 3.0]), torch.tensor([0.5, -1.0]))
    metrics = rollout_metrics(scored, old, ref, torch.tensor([[1.0, 2], [3, 9]]), torch.tensor([True, False]),
                              torch.tensor([[1.0, 3], [5, 7]]), mask, "k1")
    expected = {"ppo/reward": 2.0, "ppo/score": -0.25, "ppo/kl": 0.875, "ppo/entropy": 2.0,
                "ppo/response_length": 1.5, "ppo/eos_rate": 0.5, "ppo/advantage_mean": 3.0}
    assert list(metrics) == list(expected)  # the logged names, in the logged order
    assert {k: float(v) for k, v in metrics.items()} == pytest.approx(expected)
