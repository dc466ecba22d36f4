"""The paper's small experiments (recipes/paper): Theorem 4.1 toy and the Sec. 4.2 synthetic, against derived values."""

import dataclasses
import math

import pytest
import torch

from recipes.paper import synthetic, theorem41


def test_dpo_cannot_tell_the_candidates_apart():
    """pi_ref: h = 0, loss = log 2 = 0.6931472. (1, 0, 0) and (0.1, 0, 0.9): pi(y2) = 0 so h = +inf and the loss is
    exactly 0, its infimum: both are DPO minimizers, although the second puts 0.9 on y3, which no pair mentions."""
    assert theorem41.dpo_objective((0.5, 0.5, 0.0)) == pytest.approx(0.6931472, abs=1e-7)
    assert theorem41.dpo_objective((1.0, 0.0, 0.0)) == 0.0
    assert theorem41.dpo_objective((0.1, 0.0, 0.9)) == 0.0


def test_kl_regularized_objective_and_closed_form():
    """r = (1, 0, 5), beta = 1, pi_ref = (0.5, 0.5, 0).
    pi_ref: E[r] = 0.5, KL = 0 -> 0.5.      (1, 0, 0): 1 - log(1 / 0.5) = 1 - 0.6931472 = 0.3068528.
    (0.1, 0, 0.9): mass where pi_ref is 0 -> KL = inf -> -inf, whatever r(y3) = 5 promises.
    Optimum pi* ∝ pi_ref e^r = (0.5 e, 0.5, 0) -> (e / (e + 1), 1 / (e + 1), 0) = (0.7310586, 0.2689414, 0),
    with value beta log E_ref[e^(r / beta)] = log(0.5 e + 0.5) = log(1.8591409) = 0.6201145."""
    objective = lambda pi: theorem41.kl_regularized_objective(pi, beta=1.0)  # noqa: E731
    assert objective((0.5, 0.5, 0.0)) == pytest.approx(0.5)
    assert objective((1.0, 0.0, 0.0)) == pytest.approx(0.3068528, abs=1e-7)
    assert objective((0.1, 0.0, 0.9)) == -math.inf
    optimum = theorem41.kl_regularized_optimum(beta=1.0)
    assert optimum == pytest.approx((0.7310586, 0.2689414, 0.0), abs=1e-7)
    assert objective(optimum) == pytest.approx(0.6201145, abs=1e-6)


def test_ppo_on_tabular_policy_reaches_the_closed_form_and_never_touches_y3():
    """PPO from pi_ref with kl_coef 1 approaches (0.7310586, 0.2689414, 0); y3's probability stays exactly 0."""
    run = theorem41.train_ppo_tabular(kl_coef=1.0, iterations=100)
    assert run.pi[2] == 0.0
    assert run.pi == pytest.approx((0.7310586, 0.2689414, 0.0), abs=0.03)


def test_dpo_sgd_never_moves_y3_and_keeps_its_mass_at_large_beta():
    """Init (0.1, 0.1, 0.8); the DPO loss depends on theta1 - theta2 = 2d only: loss = log(1 + e^(-2 beta d)).
    SGD keeps theta3 and theta1 + theta2 = 2 log 0.1 fixed. beta = 1, stop at loss <= 0.05:
    e^(-2d) <= e^0.05 - 1 = 0.0512711 -> d >= 1.4853; one step adds lr * sigmoid(-2d) <= 0.06, so d < 1.55.
    pi3 = 0.8 / (0.1 e^d + 0.1 e^-d + 0.8): d = 1.4853 -> 0.8 / 1.2643 = 0.633; d = 1.55 -> 0.8 / 1.2923 = 0.619."""
    run = theorem41.train_dpo_tabular(beta=1.0, target_loss=0.05)
    assert run.logits[2] == run.init_logits[2]
    assert run.logits[0] + run.logits[1] == pytest.approx(2 * math.log(0.1), abs=1e-9)
    assert run.loss <= 0.05
    assert 0.61 < run.pi[2] < 0.64


def test_dpo_sgd_at_small_beta_drains_y3_only_through_theta1_growth():
    """beta = 0.1: the same stop needs d >= log(1 / 0.0512711) / 0.2 = 14.85, so pi3 <= 0.8 / (0.1 e^14.85) = 2.8e-6:
    tabular SGD happens to reach the (1, 0, 0) corner; the doc reports this honestly."""
    run = theorem41.train_dpo_tabular(beta=0.1, target_loss=0.05)
    assert run.logits[2] == run.init_logits[2]
    assert run.pi[2] < 1e-5


def test_synthetic_preference_data_coverage():
    """Prompt 0's pairs are (y0 > y1) and (y0 > y2): in data {0, 1, 2}; prompt 7's: (y7 > y0), (y7 > y1)."""
    mask = synthetic.in_data_mask(synthetic.SyntheticConfig())
    assert mask[0].tolist() == [True, True, True, False, False, False, False, False]
    assert mask[7].tolist() == [True, True, False, False, False, False, False, True]
    assert mask.sum().item() == 24


def test_policy_stats_by_hand():
    """Uniform pi over 8 responses: out-of-data mass 5/8 = 0.625, pi(optimal) = 1/8; identity pi: 0, 1, accuracy 1."""
    config = synthetic.SyntheticConfig()
    uniform = synthetic.policy_stats(torch.full((8, 8), 1 / 8), config)
    assert uniform.out_of_data_mass == pytest.approx(0.625)
    assert uniform.diagonal_prob == pytest.approx(0.125)
    identity = synthetic.policy_stats(torch.eye(8), config)
    assert (identity.out_of_data_mass, identity.diagonal_prob, identity.diagonal_accuracy) == (0.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def synthetic_results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny MLPs: threads only add overhead
    config = dataclasses.replace(synthetic.SyntheticConfig(), ppo_iterations=50)
    try:
        return [synthetic.run_seed(seed, config) for seed in (0, 1)]
    finally:
        torch.set_num_threads(threads)


def test_synthetic_reference_matches_its_sft_target(synthetic_results):
    """pi_ref is fit to a target with out-of-data mass 0.1 (0.02 on each of 5 responses) and 0.3 on each in-data one."""
    for result in synthetic_results:
        assert result.reference.out_of_data_mass == pytest.approx(0.1, abs=0.01)
        assert result.reference.diagonal_prob == pytest.approx(0.3, abs=0.01)


def test_synthetic_dpo_moves_mass_out_of_data_while_ppo_finds_the_diagonal(synthetic_results):
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert all(r.dpo_final_loss < 0.01 for r in synthetic_results)  # DPO did minimize its objective
    assert mean([r.dpo.out_of_data_mass for r in synthetic_results]) > 0.1 + 0.1
    assert all(r.reward_pair_accuracy == 1.0 for r in synthetic_results)
    for r in synthetic_results:
        assert r.ppo.out_of_data_mass < r.reference.out_of_data_mass
        assert r.ppo.diagonal_accuracy == 1.0
