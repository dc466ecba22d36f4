"""Hand-derived values for modules/losses.py: DPO (+cDPO, reference-free), IPO, hinge, Bradley-Terry, PPO."""

import pytest
import torch

from recipes.modules.losses import DPOLoss, HingeLoss, IPOLoss, PairwiseRewardLoss, PPOPolicyLoss, PPOValueLoss

# Three pairs with h = (pi_c - ref_c) - (pi_r - ref_r) = 2, 0, -5.
POLICY_CHOSEN = torch.tensor([-1.0, -2.0, -5.0])
POLICY_REJECTED = torch.tensor([-3.0, -2.0, -1.0])
REF_CHOSEN = torch.tensor([-2.0, -2.0, -1.0])
REF_REJECTED = torch.tensor([-2.0, -2.0, -2.0])


def test_dpo_loss_and_rewards():
    """beta = 0.1; loss = log(1 + exp(-beta h)).

    h = 2:  log(1 + e^-0.2) = log(1.8187308) = 0.5981389
    h = 0:  log 2                            = 0.6931472
    h = -5: log(1 + e^0.5)  = log(2.6487213) = 0.9740770
    chosen rewards 0.1 * (pi_c - ref_c) = (0.1, 0, -0.4); rejected 0.1 * (pi_r - ref_r) = (-0.1, 0, 0.1).
    """
    losses, chosen_rewards, rejected_rewards = DPOLoss(beta=0.1)(
        POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED
    )
    torch.testing.assert_close(losses, torch.tensor([0.5981389, 0.6931472, 0.9740770]))
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.1, 0.0, -0.4]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.1, 0.0, 0.1]))


def test_dpo_label_smoothing_is_conservative_dpo():
    """eps = 0.1, h = 2: 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2) = 0.9 * 0.5981389 + 0.1 * 0.7981389 = 0.6181389.

    (log(1 + e^z) = z + log(1 + e^-z), so the smoothed loss is the plain loss + eps * beta * h = 0.5981389 + 0.02.)
    """
    loss_fn = DPOLoss(beta=0.1, label_smoothing=0.1)
    losses, _, _ = loss_fn(POLICY_CHOSEN[:1], POLICY_REJECTED[:1], REF_CHOSEN[:1], REF_REJECTED[:1])
    torch.testing.assert_close(losses, torch.tensor([0.6181389]))


def test_dpo_reference_free_equals_zero_reference():
    zeros = torch.zeros(3)
    free = DPOLoss(beta=0.1, reference_free=True)(POLICY_CHOSEN, POLICY_REJECTED, None, None)
    zero_ref = DPOLoss(beta=0.1)(POLICY_CHOSEN, POLICY_REJECTED, zeros, zeros)
    for a, b in zip(free, zero_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_dpo_missing_reference_raises():
    with pytest.raises(ValueError, match="reference_free"):
        DPOLoss()(POLICY_CHOSEN, POLICY_REJECTED, None, None)


def test_dpo_gradient():
    """d loss / d pi_c = -beta * sigmoid(-beta h) = -0.1 * sigmoid(-0.2) = -0.1 * 0.4501660 = -0.0450166; the rejected
    gradient is its negative; the rewards are detached."""
    policy_chosen = POLICY_CHOSEN[:1].clone().requires_grad_()
    policy_rejected = POLICY_REJECTED[:1].clone().requires_grad_()
    losses, chosen_rewards, rejected_rewards = DPOLoss(beta=0.1)(
        policy_chosen, policy_rejected, REF_CHOSEN[:1], REF_REJECTED[:1]
    )
    losses.sum().backward()
    torch.testing.assert_close(policy_chosen.grad, torch.tensor([-0.0450166]))
    torch.testing.assert_close(policy_rejected.grad, torch.tensor([0.0450166]))
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_dpo_zero_probability_rejected_gives_zero_loss():
    """pi(y_r) = 0 makes h = +inf and the loss exactly 0 (the Theorem 4.1 toy relies on this)."""
    losses, _, _ = DPOLoss(beta=0.1)(
        torch.log(torch.tensor([0.1])),
        torch.log(torch.tensor([0.0])),
        torch.log(torch.tensor([0.5])),
        torch.log(torch.tensor([0.5])),
    )
    assert losses.item() == 0.0


def test_ipo_loss():
    """tau = 0.1, target 1 / (2 tau) = 5: (2 - 5)^2 = 9, (0 - 5)^2 = 25, (-5 - 5)^2 = 100."""
    losses, chosen_rewards, _ = IPOLoss(beta=0.1)(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)
    torch.testing.assert_close(losses, torch.tensor([9.0, 25.0, 100.0]))
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.1, 0.0, -0.4]))


def test_hinge_loss():
    """beta = 0.1: relu(1 - 0.2) = 0.8, relu(1 - 0) = 1, relu(1 + 0.5) = 1.5, and h = 20: relu(1 - 2) = 0."""
    losses, _, _ = HingeLoss(beta=0.1)(
        torch.cat([POLICY_CHOSEN, torch.tensor([0.0])]),
        torch.cat([POLICY_REJECTED, torch.tensor([-20.0])]),
        torch.cat([REF_CHOSEN, torch.tensor([0.0])]),
        torch.cat([REF_REJECTED, torch.tensor([0.0])]),
    )
    torch.testing.assert_close(losses, torch.tensor([0.8, 1.0, 1.5, 0.0]))


def test_pairwise_reward_loss_plain_and_accuracy():
    """-log sigmoid(r_c - r_r) = log(1 + e^-d): d = 1 -> 0.3132617; d = 0 -> log 2 = 0.6931472;
    d = -2 -> log(1 + e^2) = 2.1269280. Accuracy is 1 only where r_c > r_r (a tie counts as wrong)."""
    losses, accuracies = PairwiseRewardLoss()(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 3.0]))
    torch.testing.assert_close(losses, torch.tensor([0.3132617, 0.6931472, 2.1269280]))
    torch.testing.assert_close(accuracies, torch.tensor([1.0, 0.0, 0.0]))


def test_pairwise_reward_loss_margin_and_centering():
    """margin (0.5, 0, 0.5), center_coef 0.01:
    pair 1: log(1 + e^-(1 - 0.5)) + 0.01 * (2 + 1)^2 = 0.4740770 + 0.09 = 0.5640770
    pair 2: log 2 + 0                                 = 0.6931472
    pair 3: log(1 + e^(2 + 0.5)) + 0.01 * (1 + 3)^2   = 2.5788897 + 0.16 = 2.7388897
    """
    loss_fn = PairwiseRewardLoss(center_coef=0.01)
    losses, _ = loss_fn(
        torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 3.0]), margin=torch.tensor([0.5, 0.0, 0.5])
    )
    torch.testing.assert_close(losses, torch.tensor([0.5640770, 0.6931472, 2.7388897]))


def _ppo(ratio, advantages, mask):
    logprobs = torch.log(torch.tensor(ratio)).requires_grad_()
    loss, approx_kl, clipfrac = PPOPolicyLoss(clip_eps=0.2)(
        logprobs, torch.zeros_like(logprobs), torch.tensor(advantages), torch.tensor(mask)
    )
    loss.backward()
    return loss, approx_kl, clipfrac, logprobs.grad


def test_ppo_policy_clipped_high_positive_advantage():
    """ratio 1.5, A = 2: max(-1.5 * 2, -1.2 * 2) = -2.4, clipped so no gradient; k3 = 0.5 - log 1.5 = 0.0945349."""
    loss, approx_kl, clipfrac, grad = _ppo([[1.5]], [[2.0]], [[1.0]])
    torch.testing.assert_close(loss, torch.tensor(-2.4))
    torch.testing.assert_close(approx_kl, torch.tensor(0.0945349))
    assert clipfrac.item() == 1.0 and grad.abs().sum().item() == 0.0


def test_ppo_policy_clipped_low_negative_advantage():
    """ratio 0.5, A = -1: max(0.5, 0.8) = 0.8, clipped; k3 = -0.5 - log 0.5 = 0.1931472."""
    loss, approx_kl, clipfrac, grad = _ppo([[0.5]], [[-1.0]], [[1.0]])
    torch.testing.assert_close(loss, torch.tensor(0.8))
    torch.testing.assert_close(approx_kl, torch.tensor(0.1931472))
    assert clipfrac.item() == 1.0 and grad.abs().sum().item() == 0.0


def test_ppo_policy_not_clipped_with_padding():
    """Tokens (ratio, A): (1.1, 1) inside the range -> -1.1; (1.5, -1) outside but pessimistic -> max(1.5, 1.2) = 1.5;
    the padded token (ratio 3, A = 100) is ignored. loss = (-1.1 + 1.5) / 2 = 0.2; d loss / d logprob = -A * ratio / 2
    = (-0.55, 0.75, 0)."""
    loss, _, clipfrac, grad = _ppo([[1.1, 1.5, 3.0]], [[1.0, -1.0, 100.0]], [[1.0, 1.0, 0.0]])
    torch.testing.assert_close(loss, torch.tensor(0.2))
    assert clipfrac.item() == 0.0
    torch.testing.assert_close(grad, torch.tensor([[-0.55, 0.75, 0.0]]))


def test_ppo_value_loss_clipped():
    """clip 0.2, old V = 0.5, new V = 1.0 (clipped to 0.7):
    R = 0: max((1 - 0)^2, (0.7 - 0)^2) = max(1, 0.49) = 1    (unclipped term wins, gradient 2 * 1.0 * 0.5 / 2)
    R = 2: max((1 - 2)^2, (0.7 - 2)^2) = max(1, 1.69) = 1.69 (clipped, no gradient)
    loss = 0.5 * (1 + 1.69) / 2 = 0.6725; clipfrac 1/2; grad = (0.5 * 2 * (1 - 0) / 2, 0) = (0.5, 0)."""
    values = torch.tensor([[1.0, 1.0]], requires_grad=True)
    loss, clipfrac = PPOValueLoss(clip_eps=0.2)(
        values, torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, 2.0]]), torch.ones(1, 2)
    )
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.6725))
    torch.testing.assert_close(clipfrac, torch.tensor(0.5))
    torch.testing.assert_close(values.grad, torch.tensor([[0.5, 0.0]]))


def test_ppo_value_loss_unclipped():
    """clip None: 0.5 * ((1 - 0)^2 + (1 - 2)^2) / 2 = 0.5; grad 0.5 * 2 * (V - R) / 2 = (0.5, -0.5)."""
    values = torch.tensor([[1.0, 1.0]], requires_grad=True)
    loss, clipfrac = PPOValueLoss(clip_eps=None)(
        values, torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, 2.0]]), torch.ones(1, 2)
    )
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.5))
    assert clipfrac.item() == 0.0
    torch.testing.assert_close(values.grad, torch.tensor([[0.5, -0.5]]))


@pytest.mark.parametrize("loss_cls", [IPOLoss, HingeLoss])
def test_ipo_and_hinge_reference_free_equal_zero_reference(loss_cls):
    free = loss_cls(beta=0.1, reference_free=True)(POLICY_CHOSEN, POLICY_REJECTED)
    zero = loss_cls(beta=0.1)(POLICY_CHOSEN, POLICY_REJECTED, torch.zeros(3), torch.zeros(3))
    for a, b in zip(free, zero):
        torch.testing.assert_close(a, b)
