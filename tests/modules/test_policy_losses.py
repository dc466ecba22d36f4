"""GRPO's per-token loss and the loss reductions on literal tensors, the arithmetic written out."""

import math

import pytest
import torch

from recipes.modules import losses, policy_losses
from recipes.modules.policy_losses import GRPOLoss
from recipes.modules.rl_utils import aggregation_weights


def test_ppo_losses_keep_their_old_class_paths():
    """YAML files name ``recipes.modules.losses.PPOPolicyLoss``: the re-export is the same class."""
    assert losses.PPOPolicyLoss is policy_losses.PPOPolicyLoss and losses.PPOValueLoss is policy_losses.PPOValueLoss


def test_grpo_loss_at_ratio_one_is_minus_the_advantage():
    """logprobs == old: ratio 1, no clip, loss_t = -A on each real token, 0 on padding; kl_coef 0 reads no reference."""
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = GRPOLoss(kl_coef=0.0)(logprobs, logprobs.clone(), torch.tensor([2.0, -1.0]), mask)
    torch.testing.assert_close(out.loss, torch.tensor([[-2.0, -2.0, -2.0], [1.0, 1.0, 0.0]]))
    assert out.approx_kl.abs().max() == 0 and out.clipped.sum() == 0 and out.kl.sum() == 0


def test_grpo_loss_clips_and_adds_the_k3_kl():
    """One token, A = 1, ratio e^0.5 = 1.6487 > 1.2: clipped term -1.2 is the larger, loss -1.2 (clipped 1);
    with clip_eps_high 0.8 the bound is 1.8 so loss = -1.6487 (not clipped). KL: ref - logp = -0.3,
    k3 = e^-0.3 - 1 + 0.3 = 0.040818; loss + 0.1 * k3. approx_kl = (e^0.5 - 1) - 0.5 = 0.148721."""
    logprobs, old, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]]), torch.tensor([[-1.3]])
    mask, adv = torch.tensor([[1]]), torch.tensor([1.0])
    k3 = math.exp(-0.3) - 1 + 0.3
    out = GRPOLoss(clip_eps=0.2, kl_coef=0.1)(logprobs, old, adv, mask, ref)
    assert out.loss.item() == pytest.approx(-1.2 + 0.1 * k3, abs=1e-6) and out.clipped.item() == 1.0
    assert out.kl.item() == pytest.approx(k3, abs=1e-6)
    assert out.approx_kl.item() == pytest.approx(math.exp(0.5) - 1 - 0.5, abs=1e-6)
    high = GRPOLoss(clip_eps=0.2, clip_eps_high=0.8, kl_coef=0.0)(logprobs, old, adv, mask)
    assert high.loss.item() == pytest.approx(-math.exp(0.5), abs=1e-6) and high.clipped.item() == 0.0


def test_grpo_loss_gradient_is_reinforce_at_ratio_one():
    """d loss_t / d logp_t = -A * ratio = -A at ratio 1 (kl_coef 0): REINFORCE, what RLOO applies."""
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    out = GRPOLoss(kl_coef=0.0)(logprobs, logprobs.detach(), torch.tensor([3.0]), torch.tensor([[1, 1]]))
    out.loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-3.0, -3.0]]))


def test_grpo_loss_needs_a_reference_for_its_kl():
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        GRPOLoss(kl_coef=0.04)(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="clip_eps=0.0"):
        GRPOLoss(clip_eps=0.0)


def test_aggregations_on_two_responses_of_three_and_one_tokens():
    """Per-token losses [[1, 2, 3], [4, 0, 0]] (second row 1 token):
    sequence_mean = ((1+2+3)/3 + 4/1) / 2 = 3; token_mean = (1+2+3+4) / 4 = 2.5;
    constant (max 4 tokens) = ((1+2+3)/4 + 4/4) / 2 = 1.25."""
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    for aggregation, expected in (("sequence_mean", 3.0), ("token_mean", 2.5), ("constant", 1.25)):
        weights, units = aggregation_weights(mask, aggregation, 4)
        assert ((loss * weights).sum() / units).item() == pytest.approx(expected), aggregation


def test_aggregations_add_up_over_micro_batches():
    """Each row alone contributes sum(w * loss) over the units of both rows: the parts add up to the whole."""
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    for aggregation in ("sequence_mean", "token_mean", "constant"):
        weights, units = aggregation_weights(mask, aggregation, 4)
        parts = sum((loss[i:i + 1] * aggregation_weights(mask[i:i + 1], aggregation, 4)[0]).sum() for i in range(2))
        assert (parts / units).item() == pytest.approx(((loss * weights).sum() / units).item())
    with pytest.raises(ValueError, match="aggregation must be"):
        aggregation_weights(mask, "mean", 4)
