"""Hand-derived values for modules/rl_utils.py: masked stats, whitening, GAE, KL estimators, rewards, moments."""

import pytest
import torch

from recipes.modules.rl_utils import (
    RunningMoments,
    gae_advantages,
    kl_estimate,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    terminal_scores,
)

# Real entries 1..6 (mean 3.5, unbiased variance 17.5 / 5 = 3.5); the padded column holds junk.
X = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, -50.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])


def test_masked_mean_and_var():
    """mean(1..6) = 3.5; per row: 2 and 5; sum of squared deviations 17.5 -> unbiased 3.5, biased 17.5 / 6."""
    torch.testing.assert_close(masked_mean(X, MASK), torch.tensor(3.5))
    torch.testing.assert_close(masked_mean(X, MASK, dim=1), torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(masked_var(X, MASK), torch.tensor(3.5))
    torch.testing.assert_close(masked_var(X, MASK, unbiased=False), torch.tensor(17.5 / 6))


def test_masked_whiten_zero_mean_unit_variance():
    """(1 - 3.5) / sqrt(3.5) = -1.3363062; over the masked entries the result has mean 0 and unbiased variance 1,
    and the padding is 0 whatever it held."""
    whitened = masked_whiten(X, MASK)
    torch.testing.assert_close(whitened[0, 0], torch.tensor(-1.3363062))
    torch.testing.assert_close(masked_mean(whitened, MASK), torch.tensor(0.0), atol=1e-6, rtol=0)
    real = whitened[MASK.bool()]
    torch.testing.assert_close(real.var(unbiased=True), torch.tensor(1.0), atol=1e-6, rtol=0)
    assert whitened[:, 3].abs().sum().item() == 0.0


def test_masked_whiten_keep_mean():
    """shift_mean=False: (1 - 3.5) / sqrt(3.5) + 3.5 = 2.1636938."""
    torch.testing.assert_close(masked_whiten(X, MASK, shift_mean=False)[0, 0], torch.tensor(2.1636938))


def test_gae_four_steps_by_hand():
    """gamma = 0.9, lam = 0.8 (gamma * lam = 0.72). Row 0: r = (1, 0, 0, 2), V = (0.5, 1.0, -0.5, 1.0), all real:
        delta_3 = 2 + 0.9 * 0    - 1.0    =  1.0        A_3 = 1.0
        delta_2 = 0 + 0.9 * 1.0  - (-0.5) =  1.4        A_2 = 1.4 + 0.72 * 1.0    = 2.12
        delta_1 = 0 + 0.9 * -0.5 - 1.0    = -1.45       A_1 = -1.45 + 0.72 * 2.12 = 0.0764
        delta_0 = 1 + 0.9 * 1.0  - 0.5    =  1.4        A_0 = 1.4 + 0.72 * 0.0764 = 1.455008
    returns = A + V = (1.955008, 1.0764, 1.62, 2.0).
    Row 1: same first two steps, then padding holding junk (r = 5, V = 7) which must not leak:
        delta_1 = 0 + 0.9 * 0 - 1.0 = -1.0 (episode ends)  A_1 = -1.0
        delta_0 = 1.4                                     A_0 = 1.4 + 0.72 * -1.0 = 0.68
    returns = (1.18, 0.0, 0, 0).
    """
    rewards = torch.tensor([[1.0, 0.0, 0.0, 2.0], [1.0, 0.0, 5.0, 5.0]])
    values = torch.tensor([[0.5, 1.0, -0.5, 1.0], [0.5, 1.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, torch.tensor([[1.455008, 0.0764, 2.12, 1.0], [0.68, -1.0, 0.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.955008, 1.0764, 1.62, 2.0], [1.18, 0.0, 0.0, 0.0]]))


def test_gae_rejects_left_padding():
    with pytest.raises(ValueError, match="right-padded"):
        gae_advantages(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[0, 1, 1]]), gamma=1.0, lam=1.0)


def test_kl_estimators_closed_forms():
    """Token 0: pi = 0.5, pi_ref = 0.25: k1 = log 2 = 0.6931472; r = 0.5, k3 = -0.5 + log 2 = 0.1931472.
    Token 1: pi = 0.25, pi_ref = 0.5: k1 = -log 2; r = 2, k3 = 1 - log 2 = 0.3068528.
    Token 2: pi = pi_ref: both 0."""
    logprobs = torch.log(torch.tensor([[0.5, 0.25, 0.3]]))
    ref_logprobs = torch.log(torch.tensor([[0.25, 0.5, 0.3]]))
    torch.testing.assert_close(kl_estimate(logprobs, ref_logprobs, "k1"), torch.tensor([[0.6931472, -0.6931472, 0.0]]))
    torch.testing.assert_close(kl_estimate(logprobs, ref_logprobs, "k3"), torch.tensor([[0.1931472, 0.3068528, 0.0]]))
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logprobs, ref_logprobs, "k2")


def test_kl_estimators_unbiased_in_expectation():
    """pi = (0.5, 0.5), pi_ref = (0.25, 0.75):
    KL = 0.5 log 2 + 0.5 log(2/3) = 0.5 * (0.6931472 - 0.4054651) = 0.1438410.
    Weighting each action's estimate by pi gives the exact expectation of k1 and of k3: both equal KL."""
    logprobs = torch.log(torch.tensor([[0.5, 0.5]]))
    ref_logprobs = torch.log(torch.tensor([[0.25, 0.75]]))
    weights = torch.tensor([[0.5, 0.5]])
    for estimator in ("k1", "k3"):
        expectation = (kl_estimate(logprobs, ref_logprobs, estimator) * weights).sum()
        torch.testing.assert_close(expectation, torch.tensor(0.1438410))


def test_kl_penalized_rewards_score_on_last_real_token():
    """kl_coef 0.1, k1 = (0.1, 0.2, 0.3) and (0.5, -0.5, junk); scores (1, 2); row 1 has 2 real tokens:
    row 0: (-0.01, -0.02, -0.03 + 1) = (-0.01, -0.02, 0.97); row 1: (-0.05, 0.05 + 2, 0) = (-0.05, 2.05, 0)."""
    logprobs = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.5, 9.0]])
    rewards = kl_penalized_rewards(
        torch.tensor([1.0, 2.0]), logprobs, torch.zeros(2, 3), torch.tensor([[1, 1, 1], [1, 1, 0]]), kl_coef=0.1
    )
    torch.testing.assert_close(rewards, torch.tensor([[-0.01, -0.02, 0.97], [-0.05, 2.05, 0.0]]))


def test_terminal_scores_clip_and_missing_eos_penalty():
    """clip 20: 25 -> 20, -3 stays; the third response was truncated: its 4 becomes the penalty -1 (or -30, used
    as given, not clipped). No penalty configured: the truncated response keeps its score."""
    scores, eos = torch.tensor([25.0, -3.0, 4.0]), torch.tensor([True, True, False])
    torch.testing.assert_close(terminal_scores(scores, eos, -1.0, clip=20.0), torch.tensor([20.0, -3.0, -1.0]))
    torch.testing.assert_close(terminal_scores(scores, eos, -30.0, clip=20.0), torch.tensor([20.0, -3.0, -30.0]))
    torch.testing.assert_close(terminal_scores(scores, eos, None, clip=None), scores)


def test_running_moments_matches_concatenation_and_round_trips():
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, generator=generator) * 3 + 1 for n in (5, 1, 17, 8)]
    moments = RunningMoments()
    for chunk in chunks:
        moments.update(chunk)
    data = torch.cat(chunks).double()
    assert moments.count == 31
    assert moments.mean == pytest.approx(data.mean().item(), abs=1e-12)
    assert moments.std == pytest.approx(data.std().item(), abs=1e-12)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.state_dict() == moments.state_dict()
    restored.update(torch.tensor([2.0]))
    moments.update(torch.tensor([2.0]))
    assert restored.std == moments.std
