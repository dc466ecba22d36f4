"""GRPOModule: critic-free policy gradients (GRPO, RLOO, Dr. GRPO, DAPO's loss) on PPO's rollout; one training step
is one iteration: ``samples_per_prompt`` responses per prompt, group advantages, then ``ppo_epochs`` passes of
minibatch updates of the clipped surrogate. The advantage estimator and the loss are chosen by ``class_path``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, get_args

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.optimizer import LightningOptimizer
from transformers import PreTrainedTokenizerBase

from recipes.modules.advantages import AdvantageEstimator, GroupNormalizedAdvantage
from recipes.modules.distributed import all_reduce_sum, world_size
from recipes.modules.guards import check_advantages, check_gradients, check_loss
from recipes.modules.models import ModelSpec
from recipes.modules.on_policy import OnPolicyModule
from recipes.modules.optim import adamw, build_optimization
from recipes.modules.policy_losses import GRPOLoss
from recipes.modules.response_logprobs import response_logprobs
from recipes.modules.rl_utils import LossAggregation, aggregation_weights, kl_estimate, masked_mean
from recipes.modules.rollout import rollout_forwards
from recipes.modules.sharding import fsdp2_param_dtype, fsdp2_shard
from recipes.modules.types import GroupTrajectory, GRPOStats, PromptBatch
from recipes.modules.validation import at_least, check_rollout_settings


class GRPOModule(OnPolicyModule):
    """Group-relative policy optimization of a causal LM against a reward, without a critic.

    Shao et al., arXiv 2402.03300 (GRPO); with ``advantage: LeaveOneOutAdvantage``, ``policy_loss.kl_coef: 0`` and
    ``reward_kl_coef > 0`` it is RLOO (Ahmadian et al., arXiv 2402.14740); ``GroupNormalizedAdvantage(scale_by_std:
    false)`` with ``loss_aggregation: constant`` is Dr. GRPO (Liu et al., arXiv 2503.20783); ``token_mean`` and
    ``GRPOLoss(clip_eps_high)`` are DAPO's loss (Yu et al., arXiv 2503.14476). One training step is one iteration:

    1. the batch is ``rollout_batch_size`` left-padded prompts from `recipes.datamodules.prompts.PromptDataModule`;
    2.-3. each prompt ``samples_per_prompt`` times, sampled and scored as in PPO
       (`recipes.modules.on_policy.OnPolicyModule.sample_and_score`: standardize, clip, truncation penalty);
    4. the sampling policy's and the reference's log-probs of the response tokens (skipped when unused);
    5. sequence rewards ``score - reward_kl_coef * sum_t (log pi - log pi_ref)`` (the KL in the reward, RLOO);
    6. one advantage per response from its group (``advantage``);
    7. ``ppo_epochs`` shuffled passes in minibatches of ``mini_batch_size`` rows, one optimizer step each, of
       ``policy_loss`` (`recipes.modules.policy_losses.GRPOLoss`: clipped surrogate + ``kl_coef`` x KL to the
       reference) reduced by ``loss_aggregation`` (`recipes.modules.rl_utils.aggregation_weights`).

    A group's rows stay on one rank and its statistics are its own, and the reductions' denominators are summed over
    ranks, so DDP and FSDP2 compute what one process computes on the same global batch. The reference is built only
    when a KL is read (``policy_loss.kl_coef > 0`` or ``reward_kl_coef > 0``); `recipes.callbacks.ema_reference`
    updates it as for PPO.

    Args:
        model: the policy (`recipes.modules.models.ModelSpec`); built in ``configure_model``.
        reward: a `recipes.modules.reward_functions.RewardFunction` (``class_path``), e.g. unit tests or a reward
            model (`recipes.modules.reward_functions.SequenceClassifierReward`).
        tokenizer, max_length: linked from the data module by the CLI.
        optimizer, scheduler: the policy's (the scheduler steps once per iteration).
        max_new_tokens, temperature, top_k, top_p, generation_batch_size: sampling, as in PPO (log-probs are those of
            the filtered distribution, so the ratio starts at exactly 1).
        samples_per_prompt: the group size ``G`` (or ``k``): responses per prompt.
        reward_clip, missing_eos_penalty, normalize_rewards: scoring, as in PPO.
        advantage: an `recipes.modules.advantages.AdvantageEstimator`; default ``GroupNormalizedAdvantage()``.
        reward_kl_coef: the sequence KL penalty subtracted from each score before the advantage (RLOO: 0.05).
        policy_loss: default ``GRPOLoss()`` (clip 0.2, KL coefficient 0.04 in the loss).
        loss_aggregation: ``sequence_mean`` (GRPO), ``token_mean`` (DAPO) or ``constant`` (Dr. GRPO).
        ppo_epochs, mini_batch_size, micro_batch_size: passes over the rollout (GRPO's ``mu``), rows per optimizer
            step (None: the whole rollout), rows per forward/backward (None: the minibatch).
        max_grad_norm, target_kl, disable_dropout, sampling_seed, guard_non_finite: as in PPO.
    """

    state_key = metric_prefix = "grpo"

    def __init__(
        self,
        model: ModelSpec,
        reward: Callable[..., Any],
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_length: int | None = None,
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generation_batch_size: int | None = None,
        samples_per_prompt: int = 8,
        reward_clip: float | None = None,
        missing_eos_penalty: float | None = None,
        normalize_rewards: bool = False,
        advantage: AdvantageEstimator | None = None,
        reward_kl_coef: float = 0.0,
        policy_loss: GRPOLoss | None = None,
        loss_aggregation: LossAggregation = "sequence_mean",
        ppo_epochs: int = 1,
        mini_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        max_grad_norm: float | None = 1.0,
        target_kl: float | None = None,
        disable_dropout: bool = True,
        sampling_seed: int | None = None,
        guard_non_finite: bool = True,
    ) -> None:
        super().__init__(model, reward, tokenizer)
        self.save_hyperparameters(ignore=["tokenizer", "reward", "optimizer", "scheduler", "advantage", "policy_loss"])
        check_rollout_settings(self.hparams, "GRPOModule")
        at_least("GRPOModule", "reward_kl_coef", reward_kl_coef, 0.0, "0 keeps the KL out of the reward; RLOO uses 0.05")
        if loss_aggregation not in get_args(LossAggregation):
            raise ValueError(f"GRPOModule: loss_aggregation={loss_aggregation!r} must be one of "
                             f"{', '.join(get_args(LossAggregation))} (GRPO, DAPO, Dr. GRPO).")
        self.advantage = advantage if advantage is not None else GroupNormalizedAdvantage()
        self.advantage.check_group_size(samples_per_prompt)  # before any model or data loads
        self.policy_loss = policy_loss if policy_loss is not None else GRPOLoss()
        self.factories = (optimizer, scheduler)

    @property
    def reads_reference(self) -> bool:
        """Whether any KL to the reference is read (in the loss or in the reward)."""
        return self.policy_loss.kl_coef > 0 or self.hparams.reward_kl_coef > 0

    # --- training: OnPolicyModule.training_step runs rollout, then the epochs of minibatch _updates -------------
    @torch.no_grad()
    def rollout(self, batch: PromptBatch) -> GroupTrajectory:
        """Turn a prompt batch into a `GroupTrajectory`, in the numbered steps of the class docstring (2-6)."""
        hp, k = self.hparams, self.hparams.samples_per_prompt
        # 2.-3. each prompt k times (a group's rows adjacent), sampled and scored
        batch, (response_ids, mask, ended), scored = self.sample_and_score(batch)
        prompt_ids, n, P = batch["input_ids"], batch["input_ids"].shape[0], batch["input_ids"].shape[1]
        input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P + R)
        attention_mask = torch.cat([batch["attention_mask"], mask], dim=1)
        # 4. log-probs of the sampling policy (if a row can see a changed policy, or a KL is read) and the reference
        one_step = hp.ppo_epochs == 1 and (hp.mini_batch_size or n) == n
        old_logprobs = entropy = ref_logprobs = None
        if self.reference is not None or not one_step:
            old_logprobs, entropy, ref_logprobs, _ = rollout_forwards(
                self.policy, None, self.reference, input_ids, attention_mask, P, hp.micro_batch_size or n,
                temperature=hp.temperature, top_k=hp.top_k, top_p=hp.top_p)
        # 5. sequence rewards: the KL penalty in the reward (RLOO), summed over the response
        kl = None if ref_logprobs is None else (kl_estimate(old_logprobs, ref_logprobs, "k1") * mask).sum(1)  # (B,)
        rewards = scored.scores if not hp.reward_kl_coef else scored.scores - hp.reward_kl_coef * kl
        # 6. one advantage per response from its group
        advantages = self.advantage(rewards, k).to(rewards.dtype)
        if hp.guard_non_finite:
            parts = {"the sequence rewards": rewards} | ({} if old_logprobs is None else
                                                         {"the policy's log-probs": old_logprobs})
            check_advantages(self, advantages, parts)
        groups = scored.raw_scores.view(-1, k)
        metrics = {"score": scored.scores.mean(),
                   "response_length": mask.sum(1).float().mean(), "eos_rate": ended.float().mean(),
                   "advantage_std": advantages.std() if n > 1 else torch.zeros(()),
                   "flat_groups": (groups.max(1).values == groups.min(1).values).float().mean()}
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy, mask)
        self.log_dict({f"grpo/{name}": value for name, value in metrics.items()}, batch_size=n)
        shown = {"grpo/reward": scored.raw_scores.mean()} | ({} if kl is None else {"grpo/rollout_kl": kl.mean()})
        self.log_dict(shown, prog_bar=True, batch_size=n)
        return GroupTrajectory(input_ids, attention_mask, mask, old_logprobs, ref_logprobs, advantages, rewards)

    def _update(self, mb: GroupTrajectory, opts: list[LightningOptimizer]) -> GRPOStats:
        """One optimizer step on a minibatch, accumulated over micro-batches: each adds ``sum(w * loss_t)`` over
        the ``units`` of the whole minibatch on every rank (`aggregation_weights`), times ``world_size`` because data
        parallelism averages gradients; the metrics are token means over every rank's tokens."""
        hp, (opt,) = self.hparams, opts
        units = all_reduce_sum(aggregation_weights(mb.response_mask, hp.loss_aggregation, hp.max_new_tokens)[1])
        tokens = all_reduce_sum(mb.response_mask.sum()).clamp(min=1)
        opt.zero_grad()
        sums, rows = torch.zeros(4, device=self.device), mb.input_ids.shape[0]
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        for i in range(0, rows, size := hp.micro_batch_size or rows):
            if engine is not None:  # several backwards, one step: DeepSpeed accumulates only if told where it ends
                engine.set_gradient_accumulation_boundary(i + size >= rows)
            micro = mb.select(slice(i, i + size)).trimmed()  # no all-padding column reaches the forwards
            mask = micro.response_mask
            logprobs, _ = response_logprobs(self.policy, micro.input_ids, micro.attention_mask, micro.prompt_length,
                                            temperature=hp.temperature, top_k=hp.top_k, top_p=hp.top_p)
            old = micro.old_logprobs if micro.old_logprobs is not None else logprobs.detach()  # the one update
            out = self.policy_loss(logprobs, old, micro.advantages, mask, micro.ref_logprobs)
            weights, _ = aggregation_weights(mask, hp.loss_aggregation, hp.max_new_tokens)
            loss = (out.loss * weights).sum() / units
            self.manual_backward(loss * world_size())
            sums += torch.stack([loss.detach(), *(x.sum() / tokens for x in (out.approx_kl, out.clipped, out.kl))])
        totals = all_reduce_sum(sums)  # before the step: every rank then sees the same loss and stops alike
        if hp.guard_non_finite:
            check_loss(self, totals[:1], "policy loss")
            if engine is None:  # DeepSpeed holds the gradients itself
                check_gradients(self, self.named_parameters())
        if hp.max_grad_norm is not None:
            self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
        self.trainer.strategy.optimizer_step(opt.optimizer, closure=lambda: None)  # uncounted: end_iteration counts
        return GRPOStats(*totals.tolist())  # every rank sees the same approx_kl, so target_kl stops all

    # --- setup --------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        policy = self.build_policy(with_reference=self.reads_reference)
        self.policy = fsdp2_shard(policy, self.device_mesh, fsdp2_param_dtype(self))
        self.finish_models()  # the reward's shards; dropout off

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer, scheduler = self.factories
        return build_optimization(self, self.policy.parameters(), optimizer, scheduler)
