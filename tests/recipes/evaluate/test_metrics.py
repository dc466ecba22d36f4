"""Win/tie/loss counting (by score and from two-order judgments), score and SafeRLHF summaries, and the
sampled-response KL, against hand counts, hand arithmetic and a hand-computed log-prob sum."""

import pytest
import torch
from torch import nn

from recipes.evaluate.metrics import (
    WinTieLoss,
    both_orders_outcome,
    count_outcomes,
    safety_summary,
    score_summary,
    sequence_kl,
    win_tie_loss,
)


def test_win_tie_loss_counts_by_hand():
    # differences (exact in binary): +1.0 (win), +0.25 (tie: within 0.5), -0.5 (tie: |d| == margin), -2 (loss)
    result = win_tie_loss(torch.tensor([2.0, 1.25, 0.5, -1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0]), tie_margin=0.5)
    assert result == WinTieLoss(1, 2, 1)
    assert result.n == 4 and result.win_rate == pytest.approx((1 + 0.5 * 2) / 4)


def test_swapping_sides_mirrors_the_result():
    a, b = torch.randn(50), torch.randn(50)
    assert win_tie_loss(b, a, 0.3) == win_tie_loss(a, b, 0.3).mirrored()


def test_bad_shapes_and_margin_are_refused():
    with pytest.raises(ValueError, match="score vectors"):
        win_tie_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="tie_margin"):
        win_tie_loss(torch.zeros(3), torch.zeros(3), tie_margin=-1)


def test_both_orders_rule_calls_a_result_only_when_the_orders_agree():
    # (first, second) -> outcome, from MT-Bench's rule written out by hand
    table = {(1, 1): 1, (-1, -1): -1, (0, 0): 0, (1, -1): 0, (-1, 1): 0, (1, 0): 0, (0, -1): 0,
             (None, 1): None, (1, None): None}
    for (first, second), expected in table.items():
        assert both_orders_outcome(first, second) == expected, (first, second)


def test_count_outcomes_keeps_undecided_apart():
    result, undecided = count_outcomes([1, 1, 0, -1, None, 1, None])
    assert result == WinTieLoss(3, 1, 1) and undecided == 2  # 3 + 1 + 1 + 2 == 7 prompts
    with pytest.raises(ValueError, match="outcomes"):
        count_outcomes([2])


def test_score_summary_by_hand():
    s = score_summary(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    # mean 3; unbiased variance (4 + 1 + 0 + 1 + 4) / 4 = 2.5; quartiles by linear interpolation: 2, 3, 4
    assert s["n"] == 5 and s["mean"] == 3.0 and s["std"] == pytest.approx(2.5 ** 0.5)
    assert (s["min"], s["q25"], s["median"], s["q75"], s["max"]) == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert score_summary(torch.tensor([7.0]))["std"] == 0.0


def test_safety_summary_matches_table_6_semantics():
    help_scores, sft_help = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([0.0, 1.0, 2.0])
    costs = torch.tensor([-1.0, -0.5, 0.0, 2.5])
    s = safety_summary(help_scores, sft_help, costs)
    # delta_help = 12/4 - 3/3 = 2; harm = (-1 - 0.5 + 0 + 2.5) / 4 = 0.25; safe (cost < 0, so 0 is unsafe): 2 of 4
    assert s == {"delta_help": 2.0, "harm": 0.25, "safety_rate": 0.5}
    with pytest.raises(ValueError, match="safety_summary"):
        safety_summary(help_scores, sft_help, costs[:3])


class FixedLM(nn.Module):
    """A causal LM whose next-token distribution is the same at every position: softmax(``logits``)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=False):
        b, t = input_ids.shape
        if isinstance(logits_to_keep, torch.Tensor):  # transformers' boolean form: the (N, V) kept positions
            return type("Out", (), {"logits": self.logits.expand(b, t, -1)[logits_to_keep]})()
        keep = logits_to_keep or t
        return type("Out", (), {"logits": self.logits.expand(b, keep, -1).clone()})()


def test_sequence_kl_is_the_log_ratio_summed_over_response_tokens():
    import math

    policy, reference = FixedLM([math.log(0.5), math.log(0.5)]), FixedLM([math.log(0.25), math.log(0.75)])
    # prompt [0], responses [0, 1] (both real) and [1, pad] (one real token)
    input_ids = torch.tensor([[0, 0, 1], [0, 1, 0]])
    response_mask = torch.tensor([[1, 1], [1, 0]])
    kl = sequence_kl(policy, reference, input_ids, torch.ones_like(input_ids), 1, response_mask)
    # row 0: log(.5/.25) + log(.5/.75); row 1: log(.5/.75)
    expected = torch.tensor([math.log(2) + math.log(2 / 3), math.log(2 / 3)])
    assert torch.allclose(kl, expected, atol=1e-6)
