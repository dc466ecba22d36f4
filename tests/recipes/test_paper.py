"""The paper's small experiments (recipes/paper): Theorem 4.1 toy and the Sec. 4.2 synthetic, against derived values."""

import dataclasses
import math
import os
import re
import shutil

import pytest
import torch

from recipes.paper import synthetic, synthetic_report, theorem41
from tests.conftest import REPO

DOC = REPO / "docs" / "paper_small_experiments.md"


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


def test_normalize_reward_by_hand():
    """r = [[1, 3], [2, 2]], pi_ref = [[0.5, 0.5], [1, 0]], x uniform: mean = (0.5 * 2 + 0.5 * 2) = 2;
    variance = 0.5 * (0.5 * 1 + 0.5 * 1) + 0.5 * (1 * 0) = 0.5, std = 0.7071068;
    (r - 2) / std = [[-1.4142136, 1.4142136], [0, 0]]."""
    normalized, std = synthetic.normalize_reward(torch.tensor([[1.0, 3.0], [2.0, 2.0]]),
                                                 torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    assert std == pytest.approx(0.7071068)
    assert normalized.flatten().tolist() == pytest.approx([-1.4142136, 1.4142136, 0.0, 0.0])


def test_reward_model_starts_at_zero_on_the_reference_network():
    """With no training steps the RM is pi_ref's network with the output layer zeroed: r = 0 for every (x, y)."""
    config = dataclasses.replace(synthetic.SyntheticConfig(), ref_steps=5, reward_steps=0)
    reference = synthetic._train_reference(config)
    reward_model = synthetic.train_reward_model(reference, config)
    assert reward_model(torch.eye(8)).abs().max().item() == 0.0
    for (name, weight), ref_weight in zip(reward_model[:-1].state_dict().items(), reference[:-1].state_dict().values(),
                                          strict=True):
        assert torch.equal(weight, ref_weight), name


def test_paired_difference_and_verdict_by_hand():
    """a - b = (0.2, 0.2, 0.3): mean 0.2333333; sample std sqrt((2 * (1/30)^2 + (2/30)^2) / 2) = sqrt(3) / 30
    = 0.0577350, SE = 0.0577350 / sqrt(3) = 0.0333333; mean ± 2 SE = [0.1667, 0.3]."""
    mean, se = synthetic_report.paired_difference([0.3, 0.4, 0.6], [0.1, 0.2, 0.3])
    assert (mean, se) == pytest.approx((0.2333333, 0.0333333), abs=1e-7)
    assert synthetic_report.verdict(mean, se, ">", 0.0) == "reproduced"  # 0.1667 > 0
    assert synthetic_report.verdict(mean, se, ">", 0.2) == "inconclusive"  # 0.2 inside [0.1667, 0.3]
    assert synthetic_report.verdict(mean, se, ">", 0.35) == "not reproduced"  # 0.3 < 0.35
    assert synthetic_report.verdict(mean, se, "<", 0.35) == "reproduced"
    assert synthetic_report.verdict(mean, se, "<", 0.1) == "not reproduced"


def test_write_doc_block_replaces_only_between_the_markers(tmp_path):
    doc = tmp_path / "doc.md"
    begin, end = synthetic_report.BEGIN, synthetic_report.END
    doc.write_text(f"intro\n{begin}\nold table\n{end}\noutro\n")
    synthetic_report.write_doc_block(doc, f"{begin}\nnew table\n{end}")
    assert doc.read_text() == f"intro\n{begin}\nnew table\n{end}\noutro\n"
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="doc.md: needs exactly one"):
        synthetic_report.write_doc_block(doc, f"{begin}\n{end}")


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory):
    """Run the command the doc's synthetic block names, in a scratch folder holding a copy of the doc, as the doc says
    (about 15 s on one thread); returns the results and the folder."""
    command = re.search(r"`python -m recipes\.paper\.synthetic ([^`]*)`", synthetic_report.read_doc_block(DOC))
    argv = command.group(1).split()
    assert argv == ["--seeds", "5", "--out", "docs/img", "--doc", "docs/paper_small_experiments.md"]
    root = tmp_path_factory.mktemp("synthetic")
    (root / "docs").mkdir()
    shutil.copy(DOC, root / "docs" / DOC.name)
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(root)
    try:
        return synthetic.main(argv), root
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


def test_synthetic_doc_block_equals_a_fresh_run(doc_run):
    """The doc's tables are what the command it names writes now (rerun the command if this fails)."""
    root = doc_run[1]
    assert (root / "docs" / DOC.name).read_text() == DOC.read_text()
    assert (root / "docs" / "img" / "synthetic_dpo_vs_ppo.png").stat().st_size > 10_000


def test_synthetic_reference_matches_its_sft_target(doc_run):
    """pi_ref is fit to a target with out-of-data mass 0.1 (0.02 on each of 5 responses) and 0.3 on each in-data one."""
    for result in doc_run[0]:
        assert result.reference.out_of_data_mass == pytest.approx(0.1, abs=0.01)
        assert result.reference.diagonal_prob == pytest.approx(0.3, abs=0.01)


def test_synthetic_dpo_moves_mass_out_of_data(doc_run):
    results = doc_run[0]
    assert all(r.dpo_final_loss < 0.01 for r in results)  # DPO did minimize its objective
    assert sum(r.dpo.out_of_data_mass for r in results) / len(results) > 0.1 + 0.1


def test_synthetic_reward_model_fits_the_pairs_and_overrates_some_out_of_data_response(doc_run):
    """The premise of Fig. 1: in every seed the RM ranks all 16 pairs right, yet rates some out-of-data response above
    the optimal one for at least one prompt."""
    for r in doc_run[0]:
        assert r.reward_pair_accuracy == 1.0
        assert r.reward_overrated >= 1 / 8


def test_synthetic_kl_is_what_keeps_ppo_off_out_of_data_responses(doc_run):
    """The control: same reward, seed and sampler, kl_coef 0 instead of beta. In every seed it puts more mass out of
    data than PPO with the KL, which ends within 0.04 of its closed-form optimum pi_ref exp(r / beta) / Z."""
    for r in doc_run[0]:
        assert r.ppo_kl0.out_of_data_mass > r.ppo.out_of_data_mass
        assert r.ppo.out_of_data_mass == pytest.approx(r.kl_optimum.out_of_data_mass, abs=0.04)
