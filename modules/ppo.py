"""PPOModule: RLHF with PPO (clipped policy and value losses, GAE, per-token KL penalty to a reference) under manual
optimization; one training step is one PPO iteration: a rollout, then ``ppo_epochs`` passes of minibatch updates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import nn
from transformers import PreTrainedTokenizerBase

from recipes.modules.distributed import all_reduce_sum, global_masked_whiten, world_size
from recipes.modules.guards import check_advantages, check_gradients, check_loss
from recipes.modules.kl_control import AdaptiveKLController
from recipes.modules.models import ModelSpec
from recipes.modules.on_policy import OnPolicyModule
from recipes.modules.optim import actor_critic_optimization, adamw
from recipes.modules.policy_losses import PPOPolicyLoss, PPOValueLoss
from recipes.modules.ppo_rollout import in_reward_units, rollout_metrics, standardize_values
from recipes.modules.response_logprobs import response_logprobs, response_values
from recipes.modules.rl_utils import KLEstimator, RunningMoments, gae_advantages, kl_penalized_rewards
from recipes.modules.rollout import rollout_forwards
from recipes.modules.scalar_models import build_scalar_model, check_critic_tokenizer
from recipes.modules.sharding import fsdp2_param_dtype, fsdp2_shard, fsdp2_shard_scalar
from recipes.modules.types import PPOStats, PromptBatch, Trajectory
from recipes.modules.validation import check_ppo_settings


class PPOModule(OnPolicyModule):
    """Proximal Policy Optimization of a causal LM against a reward (Schulman et al., arXiv 1707.06347, in the RLHF
    form of Ziegler et al., arXiv 1909.08593, with the three tricks of Xu et al., arXiv 2404.10719, Table 3).

    One training step is one PPO iteration, so ``trainer.max_steps``, checkpoint intervals, the schedulers and
    `recipes.callbacks.ema_reference.EMAReference` all count iterations (the inner optimizer steps are not counted):

    1. the batch is ``rollout_batch_size`` left-padded prompts from `recipes.datamodules.prompts.PromptDataModule`;
    2.-6. `rollout` samples, scores and evaluates them into a `recipes.modules.types.Trajectory`;
    7. ``ppo_epochs`` shuffled passes in minibatches of ``mini_batch_size`` rows, one actor and critic step each
       (`_update`: clipped policy and value losses), stopped once a minibatch's ``approx_kl`` exceeds ``target_kl``.

    Strategies: DDP, FSDP2 (``ModelParallelStrategy``: all four models sharded) and DeepSpeed ZeRO-2 (actor and
    critic as two parameter groups of its one optimizer: `recipes.modules.optim.actor_critic_optimization`).

    Sampling, scoring, the reference, checkpointing and the export are `recipes.modules.on_policy.OnPolicyModule`'s.
    The reference is one object, ``self.reference`` (`recipes.modules.reference`): a `FrozenCopy` for full
    fine-tuning; with LoRA an `AdapterReference`, the policy with adapters disabled, or with the adapter that
    ``EMAReference`` switches it to (``use_adapter``) and averages (``lerp_``). The critic is a
    one-label sequence-classification model, normally initialized from the reward model's folder.

    Args:
        model: the policy (see `recipes.modules.models.ModelSpec`); built in ``configure_model``.
        critic: the value model; must read the policy's token ids (same tokenizer).
        reward: a `recipes.modules.reward_functions.RewardFunction` (``class_path``): a programmatic reward, or
            `recipes.modules.reward_functions.SequenceClassifierReward` around a reward-model folder (re-tokenizes).
        tokenizer, max_length: linked from the data module by the CLI.
        optimizer, critic_optimizer, scheduler, critic_scheduler: actor and critic (schedulers step per iteration).
        max_new_tokens, temperature, top_k, top_p: sampling (``top_k=0`` and ``top_p=1`` disable those filters).
        generation_batch_size: prompts generated at a time (None: the whole rollout).
        samples_per_prompt: responses sampled per prompt (each prompt repeated, its copies adjacent); the rollout
            holds ``rollout_batch_size * samples_per_prompt`` rows.
        reward_clip: clip scores to ``[-reward_clip, reward_clip]`` (paper: 20); None: no clip.
        missing_eos_penalty: the terminal score of a response truncated before EOS; None keeps its own score.
        normalize_rewards: standardize scores with running mean and std over every score seen, before clipping.
        kl_coef, kl_estimator: the per-token KL penalty ``-kl_coef * KL_t`` (``k1`` or ``k3``).
        kl_controller: e.g. `recipes.modules.kl_control.AdaptiveKLController`: replaces ``kl_coef`` by a coefficient
            it adapts after every rollout to the measured KL (checkpointed); None: ``kl_coef`` stays fixed.
        gamma, lam: GAE discount and lambda (arXiv 1506.02438, Eq. 16; paper: both 1).
        normalize_advantages: whiten advantages over the response tokens of the whole rollout batch (not per minibatch).
        normalize_values: the critic predicts returns standardized by running mean and std of all returns seen.
        ppo_epochs, mini_batch_size, micro_batch_size: passes, rows per optimizer step (None: the whole rollout),
            rows per forward/backward (None: the minibatch); ``micro_batch_size`` also chunks the rollout forwards.
        policy_loss, value_loss: default ``PPOPolicyLoss(0.2)`` and ``PPOValueLoss(0.2)``.
        max_grad_norm: clip each model's gradient norm (None: no clipping).
        target_kl: end the iteration after the first minibatch whose approx KL exceeds it (None: never).
        disable_dropout: set every dropout to 0, so rollout and update see the same policy.
        sampling_seed: sampling/shuffling generator seed (None: ``torch.initial_seed()``, set by ``seed_everything``).
        guard_non_finite: stop at non-finite advantages, losses or gradients (before the step applies them) and refuse
            to checkpoint non-finite weights (`recipes.modules.guards`); non-finite rewards are always refused.
    """

    def __init__(
        self,
        model: ModelSpec,
        critic: ModelSpec,
        reward: Callable[..., Any],
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_length: int | None = None,
        optimizer: OptimizerCallable = adamw,
        critic_optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
        critic_scheduler: LRSchedulerCallable | None = None,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generation_batch_size: int | None = None,
        samples_per_prompt: int = 1,
        reward_clip: float | None = 20.0,
        missing_eos_penalty: float | None = None,
        normalize_rewards: bool = False,
        kl_coef: float = 0.1,
        kl_estimator: KLEstimator = "k1",
        kl_controller: AdaptiveKLController | None = None,
        gamma: float = 1.0,
        lam: float = 1.0,
        normalize_advantages: bool = True,
        normalize_values: bool = False,
        ppo_epochs: int = 4,
        mini_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        policy_loss: PPOPolicyLoss | None = None,
        value_loss: PPOValueLoss | None = None,
        max_grad_norm: float | None = 1.0,
        target_kl: float | None = None,
        disable_dropout: bool = True,
        sampling_seed: int | None = None,
        guard_non_finite: bool = True,
    ) -> None:
        super().__init__(model, reward, tokenizer)
        self.save_hyperparameters(ignore=["tokenizer", "reward", "optimizer", "critic_optimizer", "scheduler",
                                          "critic_scheduler", "policy_loss", "value_loss", "kl_controller"])
        check_ppo_settings(self.hparams)
        self.critic_spec = critic
        self.factories = (optimizer, critic_optimizer, scheduler, critic_scheduler)
        self.policy_loss = policy_loss if policy_loss is not None else PPOPolicyLoss(0.2)
        self.value_loss = value_loss if value_loss is not None else PPOValueLoss(0.2)
        self.critic: nn.Module | None = None
        self.value_moments = RunningMoments()
        self.kl_controller = kl_controller

    # --- training: OnPolicyModule.training_step runs rollout, then the epochs of minibatch _updates -------------
    @torch.no_grad()
    def rollout(self, batch: PromptBatch) -> Trajectory:
        """Turn a prompt batch into a `Trajectory`, in the numbered steps of an iteration (step 1 is the batch):

        2. repeat each prompt ``samples_per_prompt`` times and generate with a KV cache (`generation.sample`, dropout
           off), ``generation_batch_size`` at a time;
        3. score the decoded texts with ``reward``; optionally standardize by running moments; clip; responses that
           did not end with EOS get ``missing_eos_penalty`` (`recipes.modules.ppo_rollout.score_responses`);
        4. old log-probs, reference log-probs and critic values of the response tokens; per-token rewards
           ``-kl_coef * KL_t`` plus the terminal score on the last response token (`kl_penalized_rewards`);
        5. GAE advantages and returns (`gae_advantages`, ``gamma``, ``lam``);
        6. ``normalize_advantages``: whiten over every response token of the whole rollout batch; with
           ``normalize_values`` values and returns are expressed in running-standardized units (`standardize_values`).
        """
        hp = self.hparams
        # 2.-3. sample (under FSDP2 on weights gathered once, so ranks may stop at different lengths), then score:
        # decode, reward, running standardization (every rank's scores), clip, truncation penalty
        batch, (response_ids, mask, ended), scored = self.sample_and_score(batch)
        prompt_ids, prompt_mask, n = batch["input_ids"], batch["attention_mask"], batch["input_ids"].shape[0]
        # 4. log-probs, reference log-probs, values, KL-penalized rewards
        input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P + R)
        attention_mask = torch.cat([prompt_mask, mask], dim=1)
        P = prompt_ids.shape[1]
        old_logprobs, entropy, ref_logprobs, values = rollout_forwards(  # log-probs of the filtered distribution
            self.policy, self.critic, self.reference, input_ids, attention_mask, P, hp.micro_batch_size or n,
            temperature=hp.temperature, top_k=hp.top_k, top_p=hp.top_p)
        kl_coef = hp.kl_coef if self.kl_controller is None else self.kl_controller.value
        rewards = kl_penalized_rewards(scored.scores, old_logprobs, ref_logprobs, mask, kl_coef, hp.kl_estimator)
        # 5. GAE, on the critic's values in reward units (the moments before this rollout); metrics before whitening
        raw_values = in_reward_units(values, self.value_moments if hp.normalize_values else None)
        advantages, returns = gae_advantages(rewards, raw_values, mask, hp.gamma, hp.lam)
        metrics = rollout_metrics(scored, old_logprobs, ref_logprobs, entropy, ended, advantages, mask, hp.kl_estimator)
        # 6. normalization over the whole rollout batch
        if hp.normalize_advantages:
            advantages = global_masked_whiten(advantages, mask)  # over the rollout of every rank
        if hp.normalize_values:  # the moments now include this rollout's returns
            values, returns = standardize_values(raw_values, returns, mask, self.value_moments)
        if hp.guard_non_finite:
            check_advantages(self, advantages, {"the per-token rewards (KL penalty)": rewards, "the critic's values":
                                                raw_values, "the policy's log-probs": old_logprobs})
        if self.kl_controller is not None:  # adapt to this rollout's KL over every rank (each rank agrees)
            kl_sum, rows = all_reduce_sum(torch.stack([metrics["ppo/kl"] * n, torch.tensor(float(n))]))
            metrics["ppo/kl_coef"] = torch.tensor(kl_coef)
            self.kl_controller.update((kl_sum / rows).item(), int(rows.item()))
        shown = ("ppo/reward", "ppo/kl")  # also on the progress bar
        self.log_dict({k: v for k, v in metrics.items() if k not in shown}, batch_size=n)
        self.log_dict({k: metrics[k] for k in shown}, prog_bar=True, batch_size=n)
        return Trajectory(input_ids, attention_mask, mask, old_logprobs, ref_logprobs, values, rewards, advantages,
                          returns, scored.scores)

    def _update(self, mb: Trajectory, opts: list[LightningOptimizer]) -> PPOStats:
        """One optimizer step of actor and critic on a minibatch, accumulated over micro-batches. Losses are token
        means over the minibatch rows of every rank: data parallelism averages gradients over ``world_size`` ranks, so
        each micro-batch is weighted by ``world_size * its tokens / all ranks' tokens``; statistics are summed."""
        hp = self.hparams
        tokens = all_reduce_sum(mb.response_mask.sum()).clamp(min=1)
        for opt in opts:
            opt.zero_grad()
        sums, rows = torch.zeros(5, device=self.device), mb.input_ids.shape[0]
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        for i in range(0, rows, size := hp.micro_batch_size or rows):
            if engine is not None:  # several backwards, one step: DeepSpeed accumulates only if told where it ends
                engine.set_gradient_accumulation_boundary(i + size >= rows)
            micro = mb.select(slice(i, i + size)).trimmed()  # no all-padding column reaches the forwards
            mask = micro.response_mask
            weight = mask.sum() / tokens  # token-weighted: micro-batches add up to the minibatch's token mean
            logprobs, _ = response_logprobs(self.policy, micro.input_ids, micro.attention_mask, micro.prompt_length,
                                            temperature=hp.temperature, top_k=hp.top_k, top_p=hp.top_p)
            values = response_values(self.critic, micro.input_ids, micro.attention_mask, micro.prompt_length)
            policy_loss, approx_kl, clipfrac = self.policy_loss(logprobs, micro.old_logprobs, micro.advantages, mask)
            value_loss, value_clipfrac = self.value_loss(values, micro.values, micro.returns, mask)
            self.manual_backward((policy_loss + value_loss) * weight * world_size())  # disjoint: one backward
            sums += torch.stack([policy_loss, value_loss, approx_kl, clipfrac, value_clipfrac]).detach() * weight
        totals = all_reduce_sum(sums)  # before the step: every rank then sees the same losses and stops alike
        if hp.guard_non_finite:
            check_loss(self, totals[:2], "policy and value loss")
            if engine is None:  # DeepSpeed holds the gradients itself
                check_gradients(self, self.named_parameters())
        for opt in opts:
            if hp.max_grad_norm is not None:
                self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
            self.trainer.strategy.optimizer_step(opt.optimizer, closure=lambda: None)  # uncounted: _count_iteration
        return PPOStats(*totals.tolist())  # every rank sees the same approx_kl, so target_kl stops all

    # --- checkpointing: the critic's value moments beside OnPolicyModule's generator and reward moments ---------
    def extra_state(self) -> dict[str, Any]:
        controller = {} if self.kl_controller is None else {"kl_controller": self.kl_controller.state_dict()}
        return {"value_moments": self.value_moments.state_dict(), **controller}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.value_moments.load_state_dict(state.get("value_moments", RunningMoments().state_dict()))
        if self.kl_controller is not None and "kl_controller" in state:
            self.kl_controller.load_state_dict(state["kl_controller"])

    # --- setup --------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp, mesh, dtype = self.hparams, self.device_mesh, fsdp2_param_dtype(self)
        policy = self.build_policy()  # and self.reference: a frozen copy, or with LoRA the adapter-disabled policy
        critic = build_scalar_model(self.critic_spec, self.tokenizer, hp.max_length)
        check_critic_tokenizer(self.critic_spec, critic, self.tokenizer)
        # FSDP2 under ModelParallelStrategy (each decoder layer one unit; the frozen reward model too), else unchanged
        self.policy, self.critic = fsdp2_shard(policy, mesh, dtype), fsdp2_shard_scalar(critic, mesh, dtype)
        self.finish_models()  # the reward's shards; dropout off

    def configure_optimizers(self) -> list[dict[str, Any]] | dict[str, Any]:
        return actor_critic_optimization(self, self.policy, self.critic, self.factories, self.hparams.max_grad_norm)
