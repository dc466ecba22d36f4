"""The adaptive KL controller (Ziegler et al., arXiv 1909.08593, Sec. 2.2) by hand, and inside PPO: the penalty uses
its coefficient, it adapts to the measured KL after each rollout, and the checkpoint carries it."""

import pytest
import torch

from recipes.datamodules.prompts import PromptDataModule
from recipes.modules.kl_control import AdaptiveKLController
from tests.conftest import quiet_trainer
from tests.modules.test_ppo import make_module


def test_proportional_update_is_clipped_at_twenty_percent():
    """init 0.1, target 6, horizon 100, 10 responses per rollout:
    KL 9 -> e = clip(9/6 - 1 = 0.5) = 0.2 -> 0.1 * (1 + 0.2 * 10/100) = 0.102;
    KL 5.4 -> e = -0.1 -> 0.102 * (1 - 0.1 * 0.1) = 0.10098; KL 6 -> e = 0, unchanged."""
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=100)
    assert controller.update(9.0, 10) == pytest.approx(0.102)
    assert controller.update(5.4, 10) == pytest.approx(0.10098)
    assert controller.update(6.0, 10) == pytest.approx(0.10098)
    fresh = AdaptiveKLController()
    fresh.load_state_dict(controller.state_dict())
    assert fresh.value == controller.value
    with pytest.raises(ValueError, match="target=0"):
        AdaptiveKLController(target=0)


def test_ppo_penalizes_with_the_controllers_coefficient_and_adapts_it(byte_tokenizer):
    """A target far below the KL: the coefficient rises after each rollout by the factor of its formula, the
    per-token rewards of a rollout use the value before that rollout's update, and the log shows it."""
    torch.set_num_threads(1)
    controller = AdaptiveKLController(init_kl_coef=0.5, target=1e-6, horizon=8)
    module = make_module(byte_tokenizer, kl_controller=controller, kl_coef=0.0, max_new_tokens=4)
    with torch.no_grad():
        for p in module.reference.parameters():
            p.add_(0.05 * torch.randn_like(p))  # KL > 0
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(module, PromptDataModule(rollout_batch_size=4, max_length=64))
    # two rollouts of 4 responses, error clipped at +0.2 each time: 0.5 * (1 + 0.2 * 4/8)^2
    assert controller.value == pytest.approx(0.5 * 1.1 ** 2)
    assert trainer.callback_metrics["ppo/kl_coef"] == pytest.approx(0.55)  # the second rollout's coefficient
    state = {}
    module.on_save_checkpoint(state)
    assert state["ppo"]["kl_controller"] == {"value": pytest.approx(0.605)}
    other = make_module(byte_tokenizer, kl_controller=AdaptiveKLController(), max_new_tokens=4)
    other.on_load_checkpoint(state)
    assert other.kl_controller.value == pytest.approx(0.605)


def test_the_controller_is_chosen_in_yaml(tmp_path):
    """``--model.init_args.kl_controller`` as a class path on the tiny PPO config, one iteration."""
    import json

    from recipes.__main__ import cli_main

    controller = {"class_path": "recipes.modules.kl_control.AdaptiveKLController",
                  "init_args": {"init_kl_coef": 0.2, "target": 3.0, "horizon": 1000}}
    cli = cli_main(["fit", "--config", "yaml/tiny/ppo.yaml", "--trainer.max_steps", "1", "--trainer.logger", "false",
                    "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
                    "--trainer.default_root_dir", str(tmp_path), "--model.init_args.kl_controller",
                    json.dumps(controller)])
    assert isinstance(cli.model.kl_controller, AdaptiveKLController) and cli.model.kl_controller.value != 0.2
