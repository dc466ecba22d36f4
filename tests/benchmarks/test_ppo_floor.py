"""The bare PPO floor of `benchmarks/ppo_iteration.py` computes PPOModule's math: the gathered-head log-probs,
entropies and values, GAE returns, whitening and the clipped losses equal the module's functions on the same tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from benchmarks.common import gathered_logprobs, hidden_at
from benchmarks.ppo_floor import floor_losses, gae_returns, whiten
from recipes.modules.distributed import global_masked_whiten
from recipes.modules.policy_losses import PPOPolicyLoss, PPOValueLoss
from recipes.modules.response_logprobs import response_logprobs, response_values
from recipes.modules.rl_utils import gae_advantages
from tests.conftest import TINY_LLAMA


@pytest.fixture
def rollout():
    """Three left-padded prompts (5 columns) and right-padded responses (4 columns); vocabulary 64."""
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    ids = torch.randint(3, 64, (3, 9)) * torch.cat([prompt_mask, response_mask], 1)
    return ids, torch.cat([prompt_mask, response_mask], 1), response_mask


def test_gathered_head_equals_module_log_probs_entropy_and_values(rollout):
    ids, attention_mask, response_mask = rollout
    config = dict(TINY_LLAMA, vocab_size=64, pad_token_id=0)
    policy = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).eval()
    critic = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**config, num_labels=1)).eval()
    targets = torch.nn.functional.pad(response_mask.bool(), (5, 0))
    m = response_mask.bool()
    with torch.no_grad():
        logprobs, entropy = gathered_logprobs(policy, ids, attention_mask, targets, with_entropy=True)
        ours, ours_entropy = response_logprobs(policy, ids, attention_mask, 5, with_entropy=True)
        values = critic.score(hidden_at(critic, ids, attention_mask, targets)).squeeze(-1)
        ours_values = response_values(critic, ids, attention_mask, 5)
    torch.testing.assert_close(logprobs, ours[m])
    torch.testing.assert_close(entropy, ours_entropy[m])
    torch.testing.assert_close(values, ours_values[m])


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95)])
def test_gae_returns_equal_module_gae(gamma, lam):
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    rewards, values = torch.randn(2, 4) * mask, torch.randn(2, 4) * mask
    _, returns = gae_advantages(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(gae_returns(rewards, values, mask, gamma, lam), returns)


def test_whiten_equals_module_whitening():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    x = torch.randn(2, 4)
    torch.testing.assert_close(whiten(x[mask.bool()]), global_masked_whiten(x, mask)[mask.bool()])


def test_floor_losses_equal_module_losses():
    """One update's loss on the flat response tokens equals PPOPolicyLoss(0.2) + PPOValueLoss(0.2) on the padded
    grid; the ratios are spread so that both clips are active for some tokens."""
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    logprobs, old_logprobs = torch.randn(2, 4) * 0.5, torch.randn(2, 4) * 0.5
    advantages, values, old_values, returns = (torch.randn(2, 4) for _ in range(4))
    policy_loss, approx_kl, clipfrac = PPOPolicyLoss(0.2)(logprobs, old_logprobs, advantages, mask)
    value_loss, _ = PPOValueLoss(0.2)(values, old_values, returns, mask)
    m = mask.bool()
    loss, floor_kl, floor_clipfrac = floor_losses(logprobs[m], values[m], old_logprobs[m], advantages[m],
                                                  old_values[m], returns[m], 0.2, 0.2)
    torch.testing.assert_close(loss, policy_loss + value_loss)
    torch.testing.assert_close(floor_kl, approx_kl)
    torch.testing.assert_close(floor_clipfrac, clipfrac)
    assert 0 < float(clipfrac) < 1
