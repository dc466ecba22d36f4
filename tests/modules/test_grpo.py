"""GRPOModule: groups of adjacent samples per prompt, group advantages from the reward, the reference built only when
a KL is read, the KL in the reward (RLOO), micro-batches that add up for every loss reduction, exact resume, the
tiny configs, and PPO's rollout with several samples per prompt."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from recipes.__main__ import cli_main
from recipes.datamodules.prompts import PromptDataModule
from recipes.modules.advantages import GroupNormalizedAdvantage, LeaveOneOutAdvantage
from recipes.modules.grpo import GRPOModule
from recipes.modules.models import ModelSpec
from recipes.modules.policy_losses import GRPOLoss
from recipes.modules.reference import FrozenCopy
from recipes.modules.reward_functions import CharacterFractionReward
from recipes.modules.types import Generation
from tests.conftest import REPO, TINY_LLAMA, quiet_trainer
from tests.modules.test_ppo import FixedReward, prompt_batch
from tests.modules.test_ppo import make_module as make_ppo


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make_module(tokenizer, reward=None, **kwargs):
    kwargs.setdefault("samples_per_prompt", 2)
    module = GRPOModule(model=ModelSpec(config=dict(TINY_LLAMA)), reward=reward or CharacterFractionReward(),
                        tokenizer=tokenizer, **kwargs)
    module.configure_model()
    return module


def fixed_generation(tok, rows):
    """A Generation of the given token rows (each ended by EOS, then padded)."""
    width = max(len(r) for r in rows) + 1
    ids = [r + [tok.eos_token_id] + [tok.pad_token_id] * (width - len(r) - 1) for r in rows]
    mask = [[1] * (len(r) + 1) + [0] * (width - len(r) - 1) for r in rows]
    return Generation(torch.tensor(ids), torch.tensor(mask), torch.ones(len(rows), dtype=torch.bool))


def test_each_prompt_is_sampled_k_times_in_adjacent_rows_and_advantages_are_per_group(byte_tokenizer):
    """Prompts q1, q2 with k = 3: the reward sees q1 q1 q1 q2 q2 q2 and their metadata; scores [1, 2, 3, 5, 5, 5] give
    GRPO advantages [-1, 0, 1] / (1 + 1e-4) and 0 for the flat group (its share logged as flat_groups 0.5)."""
    tok = byte_tokenizer
    reward = FixedReward([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    module = make_module(tok, reward, samples_per_prompt=3, policy_loss=GRPOLoss(kl_coef=0.0), max_new_tokens=4)
    a = tok.convert_tokens_to_ids("a")
    module.forward = lambda batch: fixed_generation(tok, [[a]] * batch["input_ids"].shape[0])
    batch = prompt_batch(tok, ["q1", "q2"])
    batch["metadata"] = [{"id": 1}, {"id": 2}]
    traj = module.rollout(batch)
    prompts, _, metadata = reward.calls[0]
    assert prompts == ["q1"] * 3 + ["q2"] * 3 and metadata == [{"id": 1}] * 3 + [{"id": 2}] * 3
    torch.testing.assert_close(traj.advantages, torch.tensor([-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0]))
    assert traj.input_ids.shape[0] == 6 and torch.equal(traj.input_ids[0], traj.input_ids[2])
    assert traj.old_logprobs is None and traj.ref_logprobs is None  # one update, no KL: nothing to read


def test_the_reference_is_built_only_when_a_kl_is_read(byte_tokenizer):
    assert make_module(byte_tokenizer, policy_loss=GRPOLoss(kl_coef=0.0)).reference is None
    assert isinstance(make_module(byte_tokenizer).reference, FrozenCopy)  # GRPOLoss's default kl_coef 0.04
    assert isinstance(make_module(byte_tokenizer, policy_loss=GRPOLoss(kl_coef=0.0), reward_kl_coef=0.05).reference,
                      FrozenCopy)


def test_rloo_puts_the_summed_kl_into_the_reward(byte_tokenizer):
    """reward_kl_coef 0.5: each sequence reward is its score minus 0.5 * sum_t (old - ref) over its tokens, and the
    leave-one-out advantages are computed from those rewards: A_0 = R_0 - R_1, A_1 = R_1 - R_0 for k = 2."""
    tok = byte_tokenizer
    module = make_module(tok, FixedReward([4.0, 1.0]), advantage=LeaveOneOutAdvantage(), reward_kl_coef=0.5,
                         policy_loss=GRPOLoss(kl_coef=0.0), max_new_tokens=4)
    with torch.no_grad():
        for p in module.reference.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a reference that differs from the policy: KL != 0
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    module.forward = lambda batch: fixed_generation(tok, [[a, b], [b]])
    traj = module.rollout(prompt_batch(tok, ["q"]))
    kl = ((traj.old_logprobs - traj.ref_logprobs) * traj.response_mask).sum(1)
    assert kl.abs().min() > 1e-4
    torch.testing.assert_close(traj.rewards, torch.tensor([4.0, 1.0]) - 0.5 * kl)
    torch.testing.assert_close(traj.advantages, torch.stack([traj.rewards[0] - traj.rewards[1],
                                                             traj.rewards[1] - traj.rewards[0]]))


def test_settings_are_refused_before_any_model_loads():
    spec, reward = ModelSpec(config=dict(TINY_LLAMA)), CharacterFractionReward()
    with pytest.raises(ValueError, match="GroupNormalizedAdvantage needs samples_per_prompt >= 2"):
        GRPOModule(model=spec, reward=reward, samples_per_prompt=1)
    with pytest.raises(ValueError, match="LeaveOneOutAdvantage needs samples_per_prompt >= 2"):
        GRPOModule(model=spec, reward=reward, samples_per_prompt=1, advantage=LeaveOneOutAdvantage())
    with pytest.raises(ValueError, match="loss_aggregation='mean' must be one of"):
        GRPOModule(model=spec, reward=reward, loss_aggregation="mean")
    with pytest.raises(ValueError, match="reward_kl_coef=-0.1"):
        GRPOModule(model=spec, reward=reward, reward_kl_coef=-0.1)
    with pytest.raises(ValueError, match="micro_batch_size=8 is larger than mini_batch_size=4"):
        GRPOModule(model=spec, reward=reward, mini_batch_size=4, micro_batch_size=8)
    with pytest.raises(ValueError, match="mini_batch_size=12 does not divide the rollout of 16 rows"):
        quiet_trainer(max_steps=1).fit(GRPOModule(model=spec, reward=reward, samples_per_prompt=4,
                                                  mini_batch_size=12),
                                       PromptDataModule(rollout_batch_size=4, max_length=64))


def _one_iteration(tokenizer, **kwargs):
    torch.manual_seed(0)
    module = make_module(tokenizer, max_new_tokens=5, sampling_seed=3, temperature=1.0, top_k=20, top_p=0.9,
                         optimizer=lambda p: torch.optim.SGD(p, lr=0.5), **kwargs)
    before = torch.cat([p.detach().flatten() for p in module.policy.parameters()])
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, PromptDataModule(rollout_batch_size=4, max_length=64))
    return before, torch.cat([p.detach().flatten() for p in module.policy.parameters()]), trainer


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "constant"])
def test_micro_batches_add_up_to_the_minibatch_for_every_reduction(byte_tokenizer, aggregation):
    """micro_batch_size 3 (uneven: 3 + 3 + 2 rows) after one iteration equals one micro-batch of 8, while another
    reduction ends elsewhere; with top-k/top-p sampling the first update's ratio is exactly 1 (approx_kl 0)."""
    before, whole, trainer = _one_iteration(byte_tokenizer, loss_aggregation=aggregation)
    _, micro, _ = _one_iteration(byte_tokenizer, loss_aggregation=aggregation, micro_batch_size=3)
    other = "token_mean" if aggregation != "token_mean" else "sequence_mean"
    _, elsewhere, _ = _one_iteration(byte_tokenizer, loss_aggregation=other)
    assert (whole - before).abs().max() > 1e-4
    torch.testing.assert_close(micro, whole, rtol=1e-4, atol=1e-6)
    assert (elsewhere - whole).abs().max() > 1e-5
    assert trainer.callback_metrics["grpo/approx_kl"] == 0 and trainer.callback_metrics["grpo/clipfrac"] == 0


def test_two_epochs_read_old_logprobs_whose_first_ratio_is_one(byte_tokenizer):
    """ppo_epochs 2 and a reference: the rollout reads the sampling policy's filtered log-probs, and the first of
    the 4 updates (2 epochs x 2 minibatches) starts from ratio 1, so the approx KL of the mean is below later ones."""
    _, _, trainer = _one_iteration(byte_tokenizer, ppo_epochs=2, mini_batch_size=4)
    metrics = trainer.callback_metrics
    assert metrics["grpo/updates"] == 4 and metrics["grpo/approx_kl"] > 0 and metrics["grpo/kl"] >= 0
    for key in ("grpo/reward", "grpo/rollout_kl", "grpo/score", "grpo/entropy", "grpo/flat_groups",
                "grpo/advantage_std", "grpo/policy_loss", "grpo/clipfrac", "time/generate_s", "time/train_s"):
        assert key in metrics, key


def test_resume_from_a_checkpoint_is_exact(byte_tokenizer, tmp_path):
    """3 iterations straight equal 2 iterations, a checkpoint, and the third from it (generator and reward moments
    under checkpoint["grpo"])."""
    def fit(steps, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        module = make_module(byte_tokenizer, max_new_tokens=5, sampling_seed=3, normalize_rewards=True,
                             optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
        trainer = quiet_trainer(max_steps=steps, callbacks=list(callbacks), enable_checkpointing=bool(callbacks),
                                default_root_dir=tmp_path)
        trainer.fit(module, PromptDataModule(rollout_batch_size=2, max_length=64), ckpt_path=ckpt_path)
        return torch.cat([p.detach().flatten() for p in module.policy.parameters()]), module

    straight, _ = fit(3)
    fit(2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)])
    path = next((tmp_path / "ckpt").glob("*step=2*.ckpt"))
    saved = torch.load(path, weights_only=False)
    assert {"rng", "reward_moments"} <= set(saved["grpo"]) and saved["grpo"]["reward_moments"]["count"] == 8
    resumed, module = fit(3, ckpt_path=str(path))
    assert torch.equal(straight, resumed) and module.reward_moments.count == 12


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_tiny_configs_run_through_the_cli(name, tmp_path):
    """yaml/tiny/grpo.yaml and rloo.yaml as shipped (random policy), 2 iterations through `python -m recipes fit`."""
    cli = cli_main(["fit", "--config", str(REPO / "yaml" / "tiny" / f"{name}.yaml"), "--trainer.max_steps", "2",
                    "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks.init_args.dirpath",
                    str(tmp_path / "hf")])
    assert cli.trainer.global_step == 2 and (tmp_path / "hf" / "model.safetensors").exists()
    advantage = {"grpo": GroupNormalizedAdvantage, "rloo": LeaveOneOutAdvantage}[name]
    assert isinstance(cli.model.advantage, advantage)
    assert "# grpo trained with rlhf-recipes" in (tmp_path / "hf" / "README.md").read_text()


def test_ppo_samples_several_responses_per_prompt(byte_tokenizer):
    """PPO's rollout option: samples_per_prompt 2 doubles the rows, each prompt's copies adjacent."""
    reward = FixedReward([1.0, 2.0, 3.0, 4.0])
    module = make_ppo(byte_tokenizer, reward, samples_per_prompt=2, max_new_tokens=4)
    traj = module.rollout(prompt_batch(byte_tokenizer, ["q1", "question 2"]))
    assert reward.calls[0][0] == ["q1", "q1", "question 2", "question 2"] and traj.input_ids.shape[0] == 4
