"""PPOModule options: the LoRA policy as its own reference (adapter disabled, or the EMA adapter; one base model),
the ``target_kl`` early stop counted in optimizer steps and in updates (typed `PPOStats`), and ``normalize_values``
against a hand computation."""

import statistics

import pytest
import torch

from recipes.callbacks.ema_reference import EMAReference
from recipes.datamodules.prompts import PromptDataModule
from recipes.modules.models import LoRASpec, ModelSpec, build_causal_lm, is_peft
from recipes.modules.policy import position_ids_from_mask
from recipes.modules.ppo import PPOModule
from recipes.modules.reward_functions import CharacterFractionReward
from recipes.modules.types import Generation, PPOStats, Trajectory
from tests.conftest import TINY_LLAMA, quiet_trainer
from tests.modules.test_ppo import FixedReward, make_module, prompt_batch

LORA = LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
# hidden 32, 4 heads of 8, 2 KV heads: q_proj 32 -> 32, v_proj 32 -> 16. Per layer q: A 4x32 + B 32x4 = 256,
# v: A 4x32 + B 16x4 = 192; two layers: 2 x 448 = 896 adapter weights.
ADAPTER_NUMEL = 896


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def lora_module(tokenizer, **kwargs):
    module = PPOModule(model=ModelSpec(config=dict(TINY_LLAMA), lora=LORA), critic=ModelSpec(config=dict(TINY_LLAMA)),
                       reward=CharacterFractionReward(), tokenizer=tokenizer, max_new_tokens=6, **kwargs)
    module.configure_model()
    return module


def randomize(policy, adapter="default", seed=0):
    """Non-zero LoRA B factors (peft starts them at 0, where the adapter changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if f".lora_B.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=g))


def plain_model(policy, tokenizer, adapter=None):
    """A peft-free copy: the policy's base weights, plus ``(alpha / r) B A`` of ``adapter`` merged by hand."""
    params = dict(policy.named_parameters())
    state = {name.replace("base_model.model.", "", 1).replace(".base_layer", ""): p.detach().clone()
             for name, p in params.items() if ".lora_" not in name}
    if adapter is not None:
        for name, a in params.items():
            if f".lora_A.{adapter}." in name:
                b = params[name.replace(".lora_A.", ".lora_B.")]
                key = name.replace("base_model.model.", "", 1).replace(f".lora_A.{adapter}.weight", ".weight")
                state[key] += LORA.alpha / LORA.r * b.detach() @ a.detach()
    model = build_causal_lm(ModelSpec(config=dict(TINY_LLAMA)), tokenizer)
    model.load_state_dict(state)  # strict: every base weight, nothing else
    return model.eval()


def response_logprobs_by_hand(model, traj):
    """log_softmax of the full logits at the positions that predict each response token."""
    P = traj.input_ids.shape[1] - traj.response_mask.shape[1]
    with torch.no_grad():
        logits = model(input_ids=traj.input_ids, attention_mask=traj.attention_mask,
                       position_ids=position_ids_from_mask(traj.attention_mask)).logits
    return logits[:, P - 1:-1].log_softmax(-1).gather(-1, traj.input_ids[:, P:, None]).squeeze(-1)


def assert_masked_close(actual, expected, mask):
    torch.testing.assert_close(actual * mask, expected * mask, rtol=1e-4, atol=1e-5)


def test_lora_policy_is_its_own_reference_with_one_base_model(byte_tokenizer):
    module = lora_module(byte_tokenizer)
    assert is_peft(module.policy) and not isinstance(module.reference, torch.nn.Module)
    base = build_causal_lm(ModelSpec(config=dict(TINY_LLAMA)), byte_tokenizer)
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert numel(module) == numel(base) + ADAPTER_NUMEL + numel(module.critic)  # no second base model
    randomize(module.policy)
    traj = module.rollout(prompt_batch(byte_tokenizer, ["first prompt", "b", "third one here"]))
    mask = traj.response_mask
    assert_masked_close(traj.ref_logprobs, response_logprobs_by_hand(plain_model(module.policy, byte_tokenizer),
                                                                     traj), mask)
    assert_masked_close(traj.old_logprobs, response_logprobs_by_hand(
        plain_model(module.policy, byte_tokenizer, "default"), traj), mask)
    assert ((traj.old_logprobs - traj.ref_logprobs).abs() * mask).max() > 1e-2  # the adapter matters


def test_lora_ema_reference_is_the_ema_adapter(byte_tokenizer):
    """With EMAReference(0.5) the reference is base + the EMA adapter (merged by hand here): neither the
    adapter-disabled model nor the current policy; the only added parameters are that adapter's."""
    module = lora_module(byte_tokenizer, ppo_epochs=2, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    randomize(module.policy)
    before = sum(p.numel() for p in module.parameters())
    quiet_trainer(max_steps=2, callbacks=[EMAReference(eta=0.5)]).fit(module, PromptDataModule(rollout_batch_size=4,
                                                                                              max_length=64))
    assert module.reference.adapter == "ema_reference"
    assert sum(p.numel() for p in module.parameters()) == before + ADAPTER_NUMEL
    module.trainer = None  # a rollout outside the fit loop: self.log becomes a no-op
    traj = module.rollout(prompt_batch(byte_tokenizer, ["first prompt", "b", "third one here"]))
    mask = traj.response_mask
    expected = response_logprobs_by_hand(plain_model(module.policy, byte_tokenizer, "ema_reference"), traj)
    assert_masked_close(traj.ref_logprobs, expected, mask)
    disabled = response_logprobs_by_hand(plain_model(module.policy, byte_tokenizer), traj)
    assert ((expected - disabled).abs() * mask).max() > 1e-2
    assert ((expected - traj.old_logprobs).abs() * mask).max() > 1e-4
    assert module.policy.active_adapter == "default"


def optimizer_steps(opt) -> int:
    """Steps an AdamW has taken, from its own per-parameter step counter."""
    return int(next(iter(opt.state.values()))["step"])


@pytest.mark.parametrize("target_kl, expected_steps", [(None, 6), (1e-6, 2)])
def test_target_kl_stops_the_iteration(byte_tokenizer, target_kl, expected_steps):
    """8 prompts in minibatches of 4 for 3 epochs: 3 x 2 = 6 actor and critic steps in the iteration. With a target
    of 1e-6 the first minibatch cannot stop it: it is measured against the rollout's own policy (approx_kl 0 up to
    rounding, about 1e-14). The second is measured after one AdamW step at lr 1e-2 (approx_kl far above 1e-6); it
    takes its step and the iteration stops there: 2 steps."""
    module = make_module(byte_tokenizer, max_new_tokens=5, ppo_epochs=3, mini_batch_size=4, target_kl=target_kl,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                         critic_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, PromptDataModule(rollout_batch_size=8, max_length=64))
    assert [optimizer_steps(opt) for opt in trainer.optimizers] == [expected_steps, expected_steps]
    assert trainer.callback_metrics["ppo/updates"] == expected_steps and trainer.global_step == 1
    if target_kl is not None:
        assert trainer.callback_metrics["ppo/approx_kl"] * expected_steps > target_kl  # the mean over the 2 steps


@pytest.mark.parametrize("exceed_at, expected_updates, expected_epochs", [(None, 12, 3), (6, 6, 2), (4, 4, 1)])
def test_target_kl_stops_after_the_first_update_above_it(byte_tokenizer, monkeypatch, exceed_at, expected_updates,
                                                         expected_epochs):
    """8 prompts in minibatches of 2 for 3 epochs: 4 updates per epoch, 12 in all. Each `_update` returns a
    `PPOStats`; its ``approx_kl`` is then scripted to 0, except 1.0 at update ``exceed_at``, against a target of 0.5.
    Update 6 is the second of epoch 2: nothing after it runs, and epoch 3 never draws its shuffle. Update 4 ends
    epoch 1: no second epoch starts. ``ppo/updates`` is the count, ``ppo/approx_kl`` the mean, 1 / count."""
    module = make_module(byte_tokenizer, max_new_tokens=4, ppo_epochs=3, mini_batch_size=2, target_kl=0.5)
    update, returned = module._update, []

    def scripted_update(minibatch, opts):
        returned.append(update(minibatch, opts))
        return returned[-1]._replace(approx_kl=1.0 if len(returned) == exceed_at else 0.0)

    shuffles, minibatches = [], Trajectory.minibatches

    def counted_minibatches(traj, size, generator=None):
        shuffles.append(size)  # called when an epoch starts; its permutation is drawn at the first minibatch
        return minibatches(traj, size, generator)

    module._update = scripted_update
    monkeypatch.setattr(Trajectory, "minibatches", counted_minibatches)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, PromptDataModule(rollout_batch_size=8, max_length=64))
    assert len(returned) == expected_updates and all(type(stats) is PPOStats for stats in returned)
    assert shuffles == [2] * expected_epochs
    assert [optimizer_steps(opt) for opt in trainer.optimizers] == [expected_updates, expected_updates]
    assert trainer.callback_metrics["ppo/updates"] == expected_updates and trainer.global_step == 1
    expected_kl = (0.0 if exceed_at is None else 1.0) / expected_updates
    assert float(trainer.callback_metrics["ppo/approx_kl"]) == pytest.approx(expected_kl)


def critic_outputs(module, traj):
    """The critic's raw head output at the positions before each response token (no normalization)."""
    P = traj.input_ids.shape[1] - traj.response_mask.shape[1]
    with torch.no_grad():
        hidden = module.critic.model(input_ids=traj.input_ids, attention_mask=traj.attention_mask,
                                     position_ids=position_ids_from_mask(traj.attention_mask)).last_hidden_state
        return module.critic.score(hidden).squeeze(-1)[:, P - 1:-1]


def test_normalize_values_standardizes_returns_by_running_moments(byte_tokenizer):
    """kl_coef 0 and gamma = lam = 1, so every response token's return is its row's score (rows of 3 and 4 tokens).

    Rollout 1, scores (2, 9): returns 2,2,2,9,9,9,9; mean 6, unbiased std sqrt(84 / 6) = sqrt(14). The critic's
    target is (return - 6) / sqrt(14); its stored values are (raw - 6) / sqrt(14), raw read in reward units since no
    moments existed before. Rollout 2, scores (4, 1): GAE uses the critic in reward units, raw * sqrt(14) + 6, so the
    advantage is score - (raw * sqrt(14) + 6); then the moments of all 14 returns (mean 58 / 14) standardize
    returns and values."""
    tok = byte_tokenizer
    reward = FixedReward([2.0, 9.0])
    module = make_module(tok, reward, kl_coef=0.0, gamma=1.0, lam=1.0, normalize_advantages=False,
                         normalize_values=True, reward_clip=None, max_new_tokens=4)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    module.forward = lambda batch: Generation(torch.tensor([[a, b, eos, pad], [b, b, b, b]]),
                                              torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), torch.tensor([True, False]))
    batch = prompt_batch(tok, ["q1", "question 2"])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])
    seen, mean, std = [], 0.0, 1.0  # moments before the rollout: none yet, so the identity
    for scores in ([2.0, 9.0], [4.0, 1.0]):
        reward.scores = torch.tensor(scores)
        traj = module.rollout(batch)
        raw = critic_outputs(module, traj) * std + mean  # the critic in reward units under the old moments
        returns = torch.tensor([[scores[0]] * 4, [scores[1]] * 4])
        assert_masked_close(traj.advantages, returns - raw, mask)
        seen += [scores[0]] * 3 + [scores[1]] * 4
        mean, std = statistics.mean(seen), statistics.stdev(seen)
        if len(seen) == 7:
            assert (mean, std) == pytest.approx((6.0, 14**0.5))
        assert_masked_close(traj.returns, (returns - mean) / std, mask)
        assert_masked_close(traj.values, (raw - mean) / std, mask)
        assert (traj.returns * (1 - mask)).abs().sum() == 0 and (traj.values * (1 - mask)).abs().sum() == 0
    assert (mean, std) == pytest.approx((58 / 14, module.value_moments.std)) and module.value_moments.count == 14
    assert std == pytest.approx((sum((x - 58 / 14) ** 2 for x in seen) / 13) ** 0.5)


def test_normalize_rewards_standardizes_scores_before_the_clip(byte_tokenizer):
    """Scores (2, 9) then (4, 1), both responses ending with EOS, reward_clip 0.5. Rollout 1: mean 5.5, unbiased
    std sqrt(2 x 3.5^2) = 4.95, standardized -0.707 and 0.707, clipped to -0.5 and 0.5. Rollout 2: all four scores,
    mean 4, std sqrt(38 / 3) = 3.559; 0 and -0.843, clipped to 0 and -0.5. The logged raw reward is unchanged."""
    tok = byte_tokenizer
    reward = FixedReward([2.0, 9.0])
    module = make_module(tok, reward, normalize_rewards=True, reward_clip=0.5, max_new_tokens=3)
    eos, (a, b) = tok.eos_token_id, tok.convert_tokens_to_ids(["a", "b"])
    module.forward = lambda batch: Generation(torch.tensor([[a, b, eos], [b, eos, tok.pad_token_id]]),
                                              torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.tensor([True, True]))
    batch = prompt_batch(tok, ["q1", "question 2"])
    traj = module.rollout(batch)
    torch.testing.assert_close(traj.scores, torch.tensor([-0.5, 0.5]))
    reward.scores = torch.tensor([4.0, 1.0])
    traj = module.rollout(batch)
    torch.testing.assert_close(traj.scores, torch.tensor([0.0, -0.5]))
    assert module.reward_moments.count == 4 and module.reward_moments.mean == pytest.approx(4.0)
    assert module.reward_moments.std == pytest.approx((38 / 3) ** 0.5)
    module.hparams.reward_clip = None  # unclipped, the standardized values themselves
    reward.scores = torch.tensor([4.0, 4.0])  # the six scores 2, 9, 4, 1, 4, 4: mean 4, std sqrt(38 / 5)
    torch.testing.assert_close(module.rollout(batch).scores, torch.tensor([0.0, 0.0]))
    assert module.reward_moments.std == pytest.approx((38 / 5) ** 0.5)
