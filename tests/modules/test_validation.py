"""recipes.modules.validation: hyperparameters outside their domain are refused at construction (losses, PPO, the
learning rate and schedule), the PPO minibatch against the rollout size before the models are built, and a model
whose vocabulary is smaller than the tokenizer's when it is built; each error names the argument and the value."""

import json

import pytest
import torch

from recipes.datamodules.prompts import PromptDataModule
from recipes.modules.dpo import DPOModule
from recipes.modules.losses import DPOLoss, HingeLoss, IPOLoss, PairwiseRewardLoss, PPOPolicyLoss, PPOValueLoss
from recipes.modules.models import ModelSpec, build_causal_lm
from recipes.modules.optim import WarmupCosineLR
from recipes.modules.ppo import PPOModule
from recipes.modules.ranking_losses import PROLoss, RRHFLoss
from recipes.modules.reward import RewardModule
from recipes.modules.reward_functions import CharacterFractionReward
from recipes.modules.sft import SFTModule
from recipes.modules.validation import at_least, check_minibatches, positive, within
from tests.conftest import TINY_LLAMA, quiet_trainer


def ppo(**kwargs):
    return PPOModule(model=ModelSpec(config=dict(TINY_LLAMA)), critic=ModelSpec(config=dict(TINY_LLAMA)),
                     reward=CharacterFractionReward(), **kwargs)


def test_the_helpers_name_owner_argument_value_and_fix():
    with pytest.raises(ValueError, match=r"^M: x=0 must be a finite number > 0\. Do this\.$"):
        positive("M", "x", 0, "Do this")
    with pytest.raises(ValueError, match=r"M: x=nan must be >= 1"):
        at_least("M", "x", float("nan"), 1)
    with pytest.raises(ValueError, match=r"M: x=1\.0 must be in \[0\.0, 1\.0\)"):
        within("M", "x", 1.0, 0.0, 1.0, high_open=True)
    positive("M", "x", None), at_least("M", "x", 1, 1), within("M", "x", 0.0, 0.0, 1.0)  # in range or unset: pass


@pytest.mark.parametrize("loss", [DPOLoss, IPOLoss, HingeLoss], ids=lambda c: c.__name__)
@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_a_preference_loss_beta_must_be_positive(loss, beta):
    with pytest.raises(ValueError, match=rf"{loss.__name__}: beta={beta} must be a finite number > 0\. beta 0 trains "
                                         r"nothing and a negative beta learns the rejected responses"):
        loss(beta=beta)


@pytest.mark.parametrize("build, message", [
    (lambda: PairwiseRewardLoss(center_coef=-0.01), r"PairwiseRewardLoss: center_coef=-0.01 must be >= 0"),
    (lambda: PPOPolicyLoss(clip_eps=0.0), r"PPOPolicyLoss: clip_eps=0.0 must be a finite number > 0"),
    (lambda: PPOValueLoss(clip_eps=-0.2), r"PPOValueLoss: clip_eps=-0.2 must be .*or null to turn value clipping off"),
    (lambda: RRHFLoss(sft_weight=-1.0), r"RRHFLoss: sft_weight=-1.0 must be >= 0"),
    (lambda: PROLoss(beta=-0.05), r"PROLoss: beta=-0.05 must be >= 0"),
    (lambda: WarmupCosineLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), min_lr_ratio=1.5),
     r"WarmupCosineLR: min_lr_ratio=1.5 must be in \[0.0, 1.0\]"),
], ids=["center_coef", "policy_clip", "value_clip", "rrhf_weight", "pro_beta", "min_lr_ratio"])
def test_loss_and_schedule_settings_outside_their_domain(build, message):
    with pytest.raises(ValueError, match=message):
        build()
    PPOValueLoss(clip_eps=None)  # no clipping: allowed


@pytest.mark.parametrize("kwargs, message", [
    ({"ppo_epochs": 0}, r"PPOModule: ppo_epochs=0 must be >= 1"),
    ({"kl_coef": -0.1}, r"PPOModule: kl_coef=-0.1 must be >= 0.0\. 0 turns the KL penalty off"),
    ({"mini_batch_size": 0}, r"PPOModule: mini_batch_size=0 must be >= 1"),
    ({"mini_batch_size": 4, "micro_batch_size": 8}, r"micro_batch_size=8 is larger than mini_batch_size=4"),
    ({"reward_clip": 0.0}, r"PPOModule: reward_clip=0.0 must be a finite number > 0\. Use null to turn it off"),
    ({"top_p": 0.0}, r"PPOModule: top_p=0.0 must be in \(0.0, 1.0\]"),
    ({"gamma": 1.5}, r"PPOModule: gamma=1.5 must be in \[0.0, 1.0\]"),
    ({"target_kl": -1.0}, r"PPOModule: target_kl=-1.0 must be a finite number > 0"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_ppo_settings_outside_their_domain(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ppo(**kwargs)


@pytest.mark.parametrize("mini, message", [
    (8, r"mini_batch_size=8 is larger than the rollout of 4 rows \(data.rollout_batch_size=4\); the minibatches "
        r"would silently be smaller\. Use a divisor of 4, or null"),
    (3, r"mini_batch_size=3 does not divide the rollout of 4 rows"),
])
def test_the_ppo_minibatch_is_checked_against_the_rollout_before_the_models_load(byte_tokenizer, mini, message):
    module = ppo(tokenizer=byte_tokenizer, mini_batch_size=mini)
    with pytest.raises(ValueError, match=message):
        quiet_trainer(max_steps=1).fit(module, PromptDataModule(rollout_batch_size=4, max_length=64))
    assert module.policy is None  # refused at setup, before configure_model


def test_check_minibatches_on_a_rollout_without_a_data_module():
    check_minibatches(4, 2, 8, "x"), check_minibatches(None, None, 3, "x")  # divisor, or the whole rollout: pass
    with pytest.raises(ValueError, match=r"micro_batch_size=4 is larger than the minibatch of 3 rows \(this batch\)"):
        check_minibatches(None, 4, 3, "this batch")


@pytest.mark.parametrize("lr", [0.0, float("inf")])  # torch itself refuses negative and nan rates
def test_a_learning_rate_that_is_not_positive_and_finite_is_refused(byte_tokenizer, lr):
    module = SFTModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=byte_tokenizer,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=lr))
    module.configure_model()
    with pytest.raises(ValueError, match=rf"SFTModule: optimizer lr={lr} must be a finite number > 0\. Set "
                                         r"optimizer.init_args.lr"):
        module.configure_optimizers()


def test_module_arguments_outside_their_domain():
    spec = ModelSpec(config=dict(TINY_LLAMA))
    with pytest.raises(ValueError, match=r"SFTModule: max_new_tokens=0 must be >= 1"):
        SFTModule(model=spec, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"DPOModule: reference_batch_size=0 must be >= 1"):
        DPOModule(model=spec, reference_batch_size=0)


@pytest.mark.parametrize("cls", [SFTModule, DPOModule, RewardModule], ids=lambda c: c.__name__)
def test_a_model_vocabulary_smaller_than_the_tokenizer_is_refused_when_built(cls, byte_tokenizer):
    """A 100-token config against the 260-token byte tokenizer: ids 100..259 would have no row of their own."""
    module = cls(model=ModelSpec(config=dict(TINY_LLAMA, vocab_size=100)), tokenizer=byte_tokenizer)
    with pytest.raises(ValueError, match=rf"{cls.__name__}: the model's vocabulary \(100 tokens\) is smaller than the "
                                         r"tokenizer's \(260 tokens\): token ids 100..259"):
        module.configure_model()


def test_a_saved_model_with_a_smaller_vocabulary_is_refused_and_a_larger_one_accepted(byte_tokenizer, tmp_path):
    build_causal_lm(ModelSpec(config=dict(TINY_LLAMA, vocab_size=64))).save_pretrained(tmp_path / "small")
    assert json.loads((tmp_path / "small" / "config.json").read_text())["vocab_size"] == 64
    module = ppo(tokenizer=byte_tokenizer)
    module.spec = ModelSpec(name_or_path=str(tmp_path / "small"))
    with pytest.raises(ValueError, match=r"PPOModule: the model's vocabulary \(64 tokens\) is smaller than the "
                                         r"tokenizer's \(260 tokens\)"):
        module.configure_model()
    larger = SFTModule(model=ModelSpec(config=dict(TINY_LLAMA, vocab_size=1000)), tokenizer=byte_tokenizer)
    larger.configure_model()  # more rows than ids: every id has one
    assert larger.policy.get_input_embeddings().num_embeddings == 1000
