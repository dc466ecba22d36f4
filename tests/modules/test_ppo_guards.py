"""PPO's guards (recipes.modules.guards inside its manual optimization): a reward returning nan/inf is refused at
scoring time naming the rows; non-finite advantages, losses and gradients stop the iteration before any optimizer step;
``normalize_rewards`` with a one-row rollout gives finite scores."""

import math

import pytest
import torch

from recipes.datamodules.prompts import PromptDataModule
from recipes.modules.guards import NonFiniteError
from recipes.modules.models import ModelSpec
from recipes.modules.ppo import PPOModule
from recipes.modules.ppo_rollout import score_responses
from recipes.modules.reward_functions import CharacterFractionReward
from recipes.modules.rl_utils import RunningMoments
from tests.conftest import TINY_LLAMA, quiet_trainer

NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class ScoresOnCall:
    """A reward returning CharacterFractionReward's scores, with ``bad`` written over them on call ``on_call``."""

    def __init__(self, bad: dict[int, float], on_call: int = 0) -> None:
        self.bad, self.on_call, self.calls, self.inner = bad, on_call, 0, CharacterFractionReward()

    def __call__(self, prompts, responses, metadata=None):
        scores = self.inner(prompts, responses, metadata)
        if self.calls == self.on_call:
            for row, value in self.bad.items():
                scores[row] = value
        self.calls += 1
        return scores


class Chars:
    """Ids are characters (no special tokens)."""

    def batch_decode(self, rows, skip_special_tokens):
        return ["".join(chr(int(i)) for i in row) for row in rows]


def make_module(tokenizer, reward=None, **kwargs):
    return PPOModule(model=ModelSpec(config=dict(TINY_LLAMA)), critic=ModelSpec(config=dict(TINY_LLAMA)),
                     reward=reward or CharacterFractionReward(), tokenizer=tokenizer, max_new_tokens=4, **kwargs)


def score(reward_fn, n, moments=None, step=None):
    ids = torch.full((n, 2), ord("a"))
    return score_responses(reward_fn, Chars(), {"prompts": ["p"] * n}, ids, torch.ones(n, 2), torch.ones(n).bool(),
                           None, None, moments, torch.device("cpu"), step)


def test_a_reward_returning_nan_or_inf_is_refused_naming_the_rows():
    """Rows 1 (nan) and 3 (inf) of 4 are named with their scores and responses, before anything uses them."""
    reward = ScoresOnCall({1: NAN, 3: INF})
    with pytest.raises(NonFiniteError, match=r"global step 7: reward function ScoresOnCall returned non-finite scores "
                                             r"for rows \[1, 3\] of 4 \(row 1: nan for 'aa'; row 3: inf for 'aa'\)"):
        score(reward, 4, step=7)


def test_normalize_rewards_with_one_row_rollouts_is_finite():
    """One score has no spread: the first one-row rollout is only centered, 3 - 3 = 0 (it was nan). The second,
    5, joins moments of (3, 5): mean 4, unbiased std sqrt(2), so (5 - 4) / sqrt(2) = 0.7071."""
    moments = RunningMoments()
    first = score(lambda p, r, m=None: torch.tensor([3.0]), 1, moments)
    second = score(lambda p, r, m=None: torch.tensor([5.0]), 1, moments)
    assert first.scores.tolist() == [0.0]
    assert second.scores.tolist() == pytest.approx([1 / math.sqrt(2)])


def test_ppo_fit_with_normalize_rewards_and_one_prompt_per_rollout(byte_tokenizer):
    module = make_module(byte_tokenizer, normalize_rewards=True, ppo_epochs=1)
    quiet_trainer(max_steps=2).fit(module, PromptDataModule(rollout_batch_size=1, max_length=64))
    assert module.reward_moments.count == 2
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


def test_a_nan_reward_in_a_fit_stops_before_training_on_it(byte_tokenizer):
    """The reward's second call (global step 1) returns nan for row 2: the run stops there, and the weights are
    those after the first iteration."""
    module = make_module(byte_tokenizer, reward=ScoresOnCall({2: NAN}, on_call=1), ppo_epochs=1)
    trainer = quiet_trainer(max_steps=3)
    with pytest.raises(NonFiniteError, match=r"global step 1: reward function ScoresOnCall returned non-finite scores "
                                             r"for rows \[2\] of 4"):
        trainer.fit(module, PromptDataModule(rollout_batch_size=4, max_length=64))
    assert trainer.global_step == 1


def test_a_non_finite_gradient_stops_the_update_before_its_step(byte_tokenizer):
    """An inf gradient on the critic's head: no optimizer step is taken, so every weight is as it was built."""
    module = make_module(byte_tokenizer, ppo_epochs=1)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    module.critic.score.weight.register_hook(lambda g: g * INF)
    with pytest.raises(NonFiniteError, match=r"PPOModule, global step 0: the gradient norm is (inf|nan) \(1 of \d+ "
                                             r"parameters have non-finite gradients here: critic.score.weight\)"):
        quiet_trainer(max_steps=2).fit(module, PromptDataModule(rollout_batch_size=4, max_length=64))
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())


def test_a_non_finite_loss_stops_the_update(byte_tokenizer, monkeypatch):
    module = make_module(byte_tokenizer, ppo_epochs=1)
    loss = module.value_loss.forward
    monkeypatch.setattr(module.value_loss, "forward", lambda *args: (loss(*args)[0] * NAN, loss(*args)[1]))
    with pytest.raises(NonFiniteError, match=r"global step 0: the policy and value loss is non-finite"):
        quiet_trainer(max_steps=2).fit(module, PromptDataModule(rollout_batch_size=4, max_length=64))


def test_non_finite_critic_values_stop_the_rollout_naming_them(byte_tokenizer):
    """A nan in the critic's head makes every value, hence every advantage, nan; the error says where it came from."""
    module = make_module(byte_tokenizer)
    module.configure_model()
    with torch.no_grad():
        module.critic.score.weight[0, 0] = NAN
    enc = byte_tokenizer(["hi", "there"], return_tensors="pt", padding=True, padding_side="left")
    batch = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "prompts": ["hi", "there"],
             "metadata": [{}, {}]}
    with pytest.raises(NonFiniteError, match=r"the advantages are non-finite for rows \[0, 1\] of 2; non-finite: "
                                             r"the critic's values\. .*weights are already non-finite \(critic.score"):
        module.rollout(batch)


def test_a_checkpoint_of_non_finite_weights_is_refused(byte_tokenizer):
    module = make_module(byte_tokenizer)
    module.configure_model()
    module.on_save_checkpoint({})  # finite: written
    with torch.no_grad():
        module.policy.lm_head.weight[0, 0] = INF
    with pytest.raises(NonFiniteError, match=r"refusing to write a checkpoint from non-finite weights "
                                             r"\(policy.lm_head.weight\)"):
        module.on_save_checkpoint({})
