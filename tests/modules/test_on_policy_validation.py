"""Validation during PPO and GRPO: held-out prompts (PromptDataModule.val_data) are sampled, scored and compared with
the reference every val_check_interval iterations, and validating never changes what training computes."""

import pytest
import torch

from recipes.datamodules.prompts import PromptDataModule
from tests.conftest import quiet_trainer
from tests.modules.test_grpo import make_module as make_grpo
from tests.modules.test_ppo import make_module as make_ppo


@pytest.mark.parametrize("make", [make_ppo, make_grpo], ids=["ppo", "grpo"])
def test_validation_logs_reward_and_kl_and_leaves_training_unchanged(byte_tokenizer, make):
    torch.set_num_threads(1)
    weights, metrics = [], []
    for val_data in (None, "builtin:prompts"):
        torch.manual_seed(0)
        module = make(byte_tokenizer, max_new_tokens=5, sampling_seed=3)
        data = PromptDataModule(rollout_batch_size=4, max_length=64, val_data=val_data, val_rows=8)
        trainer = quiet_trainer(max_steps=4, val_check_interval=2, num_sanity_val_steps=1)
        trainer.fit(module, data)
        weights.append(torch.cat([p.detach().flatten() for p in module.policy.parameters()]))
        metrics.append(dict(trainer.callback_metrics))
    assert torch.equal(weights[0], weights[1])  # the validation generator is its own
    assert "val/reward" not in metrics[0]
    for key in ("val/reward", "val/kl", "val/response_length", "val/eos_rate"):
        assert key in metrics[1] and torch.isfinite(metrics[1][key]), key
    assert metrics[1]["val/kl"] != 0  # after 4 iterations the policy has left the reference


def test_held_out_prompts_are_read_and_counted(byte_tokenizer):
    data = PromptDataModule(rollout_batch_size=4, max_length=64, val_data="builtin:prompts", val_rows=6)
    data.setup("fit")
    assert len(data.val_set) == 6 and data.val_counts["rows"] == 6
    assert [b["input_ids"].shape[0] for b in data.val_dataloader()] == [4, 2]
    from lightning.pytorch.utilities.model_helpers import is_overridden

    assert not is_overridden("val_dataloader", PromptDataModule(rollout_batch_size=4, max_length=64))
    assert is_overridden("val_dataloader", data)
