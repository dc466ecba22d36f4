"""Combined rewards by hand (weighted sum, length penalty, Safe RLHF's Lagrangian) and inside PPO through YAML: each
part logged as reward/<name>, the multiplier checkpointed."""

import json

import pytest
import torch

from recipes.__main__ import cli_main
from recipes.modules.combined_rewards import LagrangianReward, LengthPenalty, WeightedSumReward
from recipes.modules.reward_functions import CharacterFractionReward
from tests.modules.test_ppo import FixedReward


def test_length_penalty_is_linear_past_the_free_length():
    """coef 0.5, 2 free characters: lengths 1, 2, 5 -> 0, 0, -0.5 * 3 = -1.5."""
    assert LengthPenalty(coef=0.5, free_chars=2)(["q"] * 3, ["a", "ab", "abcde"]).tolist() == [0.0, 0.0, -1.5]


def test_weighted_sum_adds_the_weighted_parts_and_records_their_means():
    """chars "ab" (scale 1) on "aab", "xy": 1, 0; length (coef 0.1): -0.3, -0.2; weights 2 and 1:
    2 * [1, 0] + [-0.3, -0.2] = [1.7, -0.2]; means 0.5 and -0.25."""
    reward = WeightedSumReward({"chars": CharacterFractionReward("ab"), "length": LengthPenalty(coef=0.1)},
                               weights={"chars": 2.0})
    torch.testing.assert_close(reward(["q", "q"], ["aab", "xy"]), torch.tensor([1.7, -0.2]))
    assert reward.last_metrics == pytest.approx({"chars": 0.5, "length": -0.25})
    with pytest.raises(ValueError, match=r"weights name \['lenght'\], which are not parts"):
        WeightedSumReward({"length": LengthPenalty()}, weights={"lenght": 1.0})
    with pytest.raises(ValueError, match="part 'short' returned shape \\(1,\\) for 2 responses"):
        WeightedSumReward({"short": FixedReward([1.0])})(["q", "q"], ["a", "b"])


def test_lagrangian_penalizes_the_cost_and_ascends_the_violation():
    """lambda 1, lr 0.1, threshold 0.5; rewards [2, 4], costs [1, 3] (mean 2): combined [2 - 1, 4 - 3] = [1, 1],
    then lambda = 1 + 0.1 * (2 - 0.5) = 1.15; next batch costs [0, 0]: combined = rewards, lambda = 1.15 - 0.05 = 1.1;
    normalized: divided by 1 + lambda; a multiplier never goes below 0."""
    reward = LagrangianReward(FixedReward([2.0, 4.0]), FixedReward([1.0, 3.0]), threshold=0.5, lambda_lr=0.1)
    assert reward(["q", "q"], ["a", "b"]).tolist() == [1.0, 1.0] and reward.lam == pytest.approx(1.15)
    assert reward.last_metrics == pytest.approx({"reward": 3.0, "cost": 2.0, "lambda": 1.0})
    reward.parts["cost"] = FixedReward([0.0, 0.0])
    assert reward(["q", "q"], ["a", "b"]).tolist() == [2.0, 4.0] and reward.lam == pytest.approx(1.1)
    normalized = LagrangianReward(FixedReward([2.0]), FixedReward([1.0]), lambda_init=1.0, normalize=True,
                                  threshold=10.0, lambda_lr=1.0)
    assert normalized(["q"], ["a"]).tolist() == [0.5] and normalized.lam == 0.0
    fresh = LagrangianReward(FixedReward([0.0]), FixedReward([0.0]))
    fresh.load_checkpoint_state(reward.checkpoint_state())
    assert fresh.lam == pytest.approx(1.1)


def test_ppo_logs_each_part_and_checkpoints_the_multiplier(tmp_path):
    """The tiny PPO config with a Lagrangian of two programmatic rewards chosen in YAML: reward/reward, reward/cost
    and reward/lambda are logged, and the checkpoint holds the multiplier after the last rollout."""
    torch.set_num_threads(1)
    chars = {"class_path": "recipes.modules.reward_functions.CharacterFractionReward", "init_args": {"chars": "ab"}}
    length = {"class_path": "recipes.modules.combined_rewards.LengthPenalty", "init_args": {"coef": 0.1}}
    reward = {"class_path": "recipes.modules.combined_rewards.LagrangianReward",
              "init_args": {"reward": chars, "cost": {**length, "init_args": {"coef": 0.1}}, "threshold": -0.5}}
    cli = cli_main(["fit", "--config", "yaml/tiny/ppo.yaml", "--trainer.max_steps", "2", "--trainer.logger", "false",
                    "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
                    "--trainer.default_root_dir", str(tmp_path), "--model.init_args.reward", json.dumps(reward)])
    metrics = cli.trainer.callback_metrics
    assert {"reward/reward", "reward/cost", "reward/lambda"} <= set(metrics)
    assert isinstance(cli.model.reward_fn, LagrangianReward) and cli.model.reward_fn.lam != 1.0
    state = {}
    cli.model.on_save_checkpoint(state)
    assert state["ppo"]["reward_state"] == {"lambda": cli.model.reward_fn.lam}
