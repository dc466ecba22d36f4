"""RRHF and PRO losses and the ranking accuracy against hand-derived values (k = 2 and k = 3)."""

import pytest
import torch

from recipes.modules.losses import DPOLoss
from recipes.modules.ranking_losses import PROLoss, RRHFLoss, ranking_accuracy


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# --- RRHF ------------------------------------------------------------------------------------------------------
def test_rrhf_k2_violated_pair():
    """logps [-6, -2], lengths [3, 2], scores [1, 0] -> p = [-6/3, -2/2] = [-2, -1].

    The better response (score 1) has the lower p: L_rank = max(0, p_worse - p_better) = max(0, -1 + 2) = 1.
    L_ft (sum) = -logp(best) = 6; total = 1 + 6 = 7. With sft_reduction mean, L_ft = 6 / 3 = 2, total 3.
    """
    losses, rank, sft = RRHFLoss()(t([-6.0, -2.0]), t([3.0, 2.0]), t([1.0, 0.0]))
    torch.testing.assert_close(losses, t(7.0))
    torch.testing.assert_close(rank, t(1.0))
    torch.testing.assert_close(sft, t(6.0))
    losses, _, sft = RRHFLoss(sft_reduction="mean")(t([-6.0, -2.0]), t([3.0, 2.0]), t([1.0, 0.0]))
    torch.testing.assert_close(losses, t(3.0))
    torch.testing.assert_close(sft, t(2.0))


def test_rrhf_k2_satisfied_pair_has_no_rank_loss():
    """logps [-2, -6], lengths [2, 3] -> p = [-1, -2]; the better one is ahead: L_rank = max(0, -2 + 1) = 0;
    L_ft = 2."""
    losses, rank, _ = RRHFLoss()(t([-2.0, -6.0]), t([2.0, 3.0]), t([1.0, 0.0]))
    torch.testing.assert_close(rank, t(0.0))
    torch.testing.assert_close(losses, t(2.0))


def test_rrhf_k3_sums_hinges_over_ordered_pairs():
    """logps [-3, -2, -8], lengths [3, 1, 4] -> p = [-1, -2, -2]; scores [0.5, 2, -1]: order y2 > y1 > y3.

    (y1 below y2): max(0, p1 - p2) = max(0, -1 + 2) = 1; (y3 below y2): max(0, -2 + 2) = 0;
    (y3 below y1): max(0, -2 + 1) = 0. L_rank = 1. Best is y2: L_ft = 2.
    rank_weight 0.5, sft_weight 1: 0.5 * 1 + 2 = 2.5.
    """
    losses, rank, sft = RRHFLoss(rank_weight=0.5)(t([-3.0, -2.0, -8.0]), t([3.0, 1.0, 4.0]), t([0.5, 2.0, -1.0]))
    torch.testing.assert_close(rank, t(1.0))
    torch.testing.assert_close(sft, t(2.0))
    torch.testing.assert_close(losses, t(2.5))


def test_rrhf_hinge_gradient_pushes_better_up_and_worse_down():
    """Violated k = 2 pair above, ranking term only: L = p_worse - p_better = logps_1 / 2 - logps_0 / 3, so
    dL/dlogps = [-1/3, +1/2] (gradient descent raises the better response, lowers the worse). A satisfied pair
    gives a zero gradient."""
    logps = t([-6.0, -2.0]).requires_grad_()
    RRHFLoss(sft_weight=0.0)(logps, t([3.0, 2.0]), t([1.0, 0.0]))[0].sum().backward()
    torch.testing.assert_close(logps.grad, t([-1 / 3, 1 / 2]))
    logps = t([-2.0, -6.0]).requires_grad_()
    RRHFLoss(sft_weight=0.0)(logps, t([2.0, 3.0]), t([1.0, 0.0]))[0].sum().backward()
    torch.testing.assert_close(logps.grad, t([0.0, 0.0]))


def test_rrhf_equal_scores_are_not_a_pair_and_sft_takes_the_first_best():
    """scores [1, 1]: no ordered pair, L_rank = 0; the tie goes to the first: L_ft = -(-4) = 4."""
    _, rank, sft = RRHFLoss()(t([-4.0, -1.0]), t([2.0, 1.0]), t([1.0, 1.0]))
    torch.testing.assert_close(rank, t(0.0))
    torch.testing.assert_close(sft, t(4.0))


# --- PRO -------------------------------------------------------------------------------------------------------
def test_pro_k3_plackett_luce():
    """lengths 1, p = logps = [0, -1, -2], scores [3, 2, 1] (already sorted), beta = 0:
    L = -log(e^0 / (e^0 + e^-1 + e^-2)) - log(e^-1 / (e^-1 + e^-2))
      = log(1 + 0.3678794 + 0.1353353) + log(1 + 0.3678794) = 0.4076060 + 0.3132617 = 0.7208677."""
    losses, rank, _ = PROLoss(beta=0.0)(t([0.0, -1.0, -2.0]), t([1.0, 1.0, 1.0]), t([3.0, 2.0, 1.0]))
    torch.testing.assert_close(losses, t(0.7208677))
    torch.testing.assert_close(rank, t(0.7208677))


def test_pro_reads_the_order_from_the_scores():
    """The same three responses stored as [y3, y1, y2]: the same 0.7208677."""
    losses, _, _ = PROLoss(beta=0.0)(t([-2.0, 0.0, -1.0]), t([1.0, 1.0, 1.0]), t([1.0, 3.0, 2.0]))
    torch.testing.assert_close(losses, t(0.7208677))


def test_pro_k2_is_reference_free_bradley_terry_on_normalized_logprobs():
    """k = 2: -log(e^p1 / (e^p1 + e^p2)) = log(1 + e^(p2 - p1)) = -log sigmoid(p1 - p2).

    logps [-3, -4], lengths [3, 2] -> p = [-1, -2]: log(1 + e^-1) = 0.3132617, which is also DPO with beta 1, no
    reference, on p. d/dp1 = -sigmoid(p2 - p1) = -0.2689414, d/dp2 = +0.2689414, so
    d/dlogps = [-0.2689414 / 3, 0.2689414 / 2] = [-0.0896471, 0.1344707].
    SFT (sum) on the best: 3; beta 0.05 -> 0.3132617 + 0.15 = 0.4632617.
    """
    logps = t([-3.0, -4.0]).requires_grad_()
    losses, rank, sft = PROLoss(beta=0.05)(logps, t([3.0, 2.0]), t([1.0, 0.0]))
    torch.testing.assert_close(rank, t(0.3132617))
    torch.testing.assert_close(sft, t(3.0))
    torch.testing.assert_close(losses, t(0.4632617))
    dpo, _, _ = DPOLoss(beta=1.0, reference_free=True)(t(-1.0), t(-2.0))
    torch.testing.assert_close(rank, dpo)
    logps.grad = None
    PROLoss(beta=0.0)(logps, t([3.0, 2.0]), t([1.0, 0.0]))[0].sum().backward()
    torch.testing.assert_close(logps.grad, t([-0.0896471, 0.1344707]))


def test_pro_reward_temperature():
    """p = [0, -1, -2], scores [3, 2, 0]. k = 1: 1/T to y2 = 1, to y3 = 3, own 1/T = max = 3:
    log(e^(0*3) + e^(-1*1) + e^(-2*3)) - 0 = log(1 + 0.3678794 + 0.0024788) = 0.3150722.
    k = 2: 1/T to y3 = 2 = own: log(e^-2 + e^-4) + 2 = log(1 + e^-2) = 0.1269280. Total 0.4420002."""
    losses, _, _ = PROLoss(beta=0.0, reward_temperature=True)(t([0.0, -1.0, -2.0]), t([1.0, 1.0, 1.0]),
                                                               t([3.0, 2.0, 0.0]))
    torch.testing.assert_close(losses, t(0.4420002))


def test_pro_ties_are_not_contrasted():
    """p = [0, -1, -2], scores [1, 1, 0]: y1 and y2 are each contrasted only with y3.
    log(1 + e^-2) + log(e^-1 + e^-2) + 1 = 0.1269280 + 0.3132617 = 0.4401897."""
    losses, _, _ = PROLoss(beta=0.0)(t([0.0, -1.0, -2.0]), t([1.0, 1.0, 1.0]), t([1.0, 1.0, 0.0]))
    torch.testing.assert_close(losses, t(0.4401897))


@pytest.mark.parametrize("loss", [RRHFLoss(), PROLoss()], ids=["rrhf", "pro"])
def test_padding_slots_change_nothing(loss):
    """A k = 3 row whose third slot is padding gives the k = 2 result, whatever that slot holds."""
    two = loss(t([-3.0, -4.0]), t([3.0, 2.0]), t([1.0, 0.0]))
    three = loss(t([-3.0, -4.0, 100.0]), t([3.0, 2.0, 1.0]), t([1.0, 0.0, 5.0]),
                 torch.tensor([[True, True, False]]))
    for a, b in zip(two, three):
        torch.testing.assert_close(a, b)


# --- accuracy --------------------------------------------------------------------------------------------------
def test_ranking_accuracy_counts_strictly_agreeing_pairs():
    """p = [-1, -2, -2], scores [0.5, 2, -1]. Ordered pairs: (y2 > y1): -2 > -1 no; (y2 > y3): -2 > -2 no
    (a tie in p is not agreement); (y1 > y3): -1 > -2 yes. 1 correct of 3."""
    correct, pairs = ranking_accuracy(t([-3.0, -2.0, -8.0]), t([3.0, 1.0, 4.0]), t([0.5, 2.0, -1.0]))
    torch.testing.assert_close(correct, t(1.0))
    torch.testing.assert_close(pairs, t(3.0))
