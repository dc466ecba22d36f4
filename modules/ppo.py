"""PPOModule: RLHF with PPO (clipped policy and value losses, GAE, per-token KL penalty to a reference) under manual
optimization; one training step is one PPO iteration: a rollout, then ``ppo_epochs`` passes of minibatch updates."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from recipes.modules.adapters import add_planned_adapters
from recipes.modules.base import ReadsOldCheckpoints
from recipes.modules.distributed import all_reduce_sum, global_masked_whiten, own_state, per_rank_state, world_size
from recipes.modules.export import model_card, save_pretrained
from recipes.modules.generation import response_logprobs, response_values, sample
from recipes.modules.guards import check_advantages, check_gradients, check_loss, check_weights
from recipes.modules.losses import PPOPolicyLoss, PPOValueLoss
from recipes.modules.models import ModelSpec, build_causal_lm, is_peft
from recipes.modules.optim import actor_critic_optimization, adamw
from recipes.modules.ppo_rollout import in_reward_units, rollout_metrics, score_responses, standardize_values
from recipes.modules.reference import AdapterReference, FrozenCopy, Reference
from recipes.modules.reward_functions import RewardFunction
from recipes.modules.rl_utils import KLEstimator, RunningMoments, gae_advantages, kl_penalized_rewards
from recipes.modules.rollout import rollout_forwards, sample_in_chunks
from recipes.modules.scalar_models import build_scalar_model, check_critic_tokenizer
from recipes.modules.sharding import fsdp2_param_dtype, fsdp2_shard, fsdp2_shard_scalar
from recipes.modules.types import Generation, PPOStats, PromptBatch, Sample, Trajectory
from recipes.modules.validation import check_minibatches, check_ppo_settings, check_vocabulary


class PPOModule(ReadsOldCheckpoints, L.LightningModule):
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
        reward_clip: clip scores to ``[-reward_clip, reward_clip]`` (paper: 20); None: no clip.
        missing_eos_penalty: the terminal score of a response truncated before EOS; None keeps its own score.
        normalize_rewards: standardize scores with running mean and std over every score seen, before clipping.
        kl_coef, kl_estimator: the per-token KL penalty ``-kl_coef * KL_t`` (``k1`` or ``k3``).
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
        reward_clip: float | None = 20.0,
        missing_eos_penalty: float | None = None,
        normalize_rewards: bool = False,
        kl_coef: float = 0.1,
        kl_estimator: KLEstimator = "k1",
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
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer", "reward", "optimizer", "critic_optimizer", "scheduler",
                                          "critic_scheduler", "policy_loss", "value_loss"])
        check_ppo_settings(self.hparams)
        self.automatic_optimization = False
        if not isinstance(reward, RewardFunction):  # typed as a callable so YAML's class_path instantiates it
            raise TypeError("reward must follow recipes.modules.reward_functions.RewardFunction, got "
                            f"{type(reward).__name__}.")
        self.spec, self.critic_spec, self.tokenizer, self.reward_fn = model, critic, tokenizer, reward
        self.factories = (optimizer, critic_optimizer, scheduler, critic_scheduler)
        self.policy_loss = policy_loss if policy_loss is not None else PPOPolicyLoss(0.2)
        self.value_loss = value_loss if value_loss is not None else PPOValueLoss(0.2)
        self.policy: nn.Module | None = None
        self.critic: nn.Module | None = None
        self.reference: Reference | None = None  # built in configure_model
        self.reward_moments, self.value_moments = RunningMoments(), RunningMoments()
        self.generator: torch.Generator | None = None
        self._rng_state: Tensor | None = None
        self.last_samples: list[Sample] = []  # the latest rollout's rows, read by SampleLogger; set by rollout

    def forward(self, batch: PromptBatch) -> Generation:
        """Sample responses to a prompt batch with the configured sampling settings."""
        hp, tok = self.hparams, self.tokenizer
        return sample(self.policy, batch["input_ids"], batch["attention_mask"], hp.max_new_tokens, tok.eos_token_id,
                      tok.pad_token_id, hp.temperature, hp.top_k, hp.top_p, generator=self.rng())

    # --- training -----------------------------------------------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """One PPO iteration: rollout (steps 2-6), then the minibatch updates (step 7)."""
        start, hp = time.perf_counter(), self.hparams
        check_minibatches(hp.mini_batch_size, hp.micro_batch_size, batch["input_ids"].shape[0], "this rollout batch")
        traj = self.rollout(batch)
        self.log("time/rollout_s", time.perf_counter() - start, batch_size=1)
        start, n = time.perf_counter(), traj.input_ids.shape[0]
        opts, schedulers = self.optimizers(), self.lr_schedulers()
        opts = opts if isinstance(opts, list) else [opts]  # DeepSpeed: one optimizer (two parameter groups)
        updates, stop = [], False  # updates: the PPOStats of each minibatch update
        for epoch in range(hp.ppo_epochs):
            for minibatch in traj.minibatches(hp.mini_batch_size or n, self.rng()):  # this epoch's shuffle, drawn now
                stats = self._update(minibatch, opts)
                updates.append(stats)
                stop = hp.target_kl is not None and stats.approx_kl > hp.target_kl
                if stop:
                    break  # target_kl: no further minibatch of this epoch ...
            if stop:
                break  # ... and no further epoch
        for scheduler in [s for s in (schedulers if isinstance(schedulers, list) else [schedulers]) if s]:
            scheduler.step()  # once per iteration
        self._count_iteration()
        self.log_dict({f"ppo/{name}": value for name, value in PPOStats.mean(updates)._asdict().items()}, batch_size=n)
        self.log("ppo/updates", float(len(updates)), batch_size=n)
        self.log("time/train_s", time.perf_counter() - start, batch_size=1)

    @torch.no_grad()
    def rollout(self, batch: PromptBatch) -> Trajectory:
        """Turn a prompt batch into a `Trajectory`, in the numbered steps of an iteration (step 1 is the batch):

        2. generate with a KV cache (`generation.sample`, dropout off), ``generation_batch_size`` at a time;
        3. score the decoded texts with ``reward``; optionally standardize by running moments; clip; responses that
           did not end with EOS get ``missing_eos_penalty`` (`recipes.modules.ppo_rollout.score_responses`);
        4. old log-probs, reference log-probs and critic values of the response tokens; per-token rewards
           ``-kl_coef * KL_t`` plus the terminal score on the last response token (`kl_penalized_rewards`);
        5. GAE advantages and returns (`gae_advantages`, ``gamma``, ``lam``);
        6. ``normalize_advantages``: whiten over every response token of the whole rollout batch; with
           ``normalize_values`` values and returns are expressed in running-standardized units (`standardize_values`).
        """
        hp, tok = self.hparams, self.tokenizer
        prompt_ids, prompt_mask, n = batch["input_ids"], batch["attention_mask"], batch["input_ids"].shape[0]
        # 2. generate (under FSDP2 on weights gathered once, so ranks may stop at different lengths)
        start = time.perf_counter()
        response_ids, mask, ended = sample_in_chunks(
            self.policy, lambda ids, att: self({"input_ids": ids, "attention_mask": att}), prompt_ids, prompt_mask,
            hp.generation_batch_size or n, tok.pad_token_id)
        gen_s = time.perf_counter() - start
        # 3. score: decode, reward, running standardization (every rank's scores), clip, truncation penalty
        start = time.perf_counter()
        scored = score_responses(self.reward_fn, tok, batch, response_ids, mask, ended, hp.missing_eos_penalty,
                                 hp.reward_clip, self.reward_moments if hp.normalize_rewards else None, self.device,
                                 self.global_step)
        score_s = time.perf_counter() - start
        # 4. log-probs, reference log-probs, values, KL-penalized rewards
        input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P + R)
        attention_mask = torch.cat([prompt_mask, mask], dim=1)
        P = prompt_ids.shape[1]
        old_logprobs, entropy, ref_logprobs, values = rollout_forwards(  # log-probs of the filtered distribution
            self.policy, self.critic, self.reference, input_ids, attention_mask, P, hp.micro_batch_size or n,
            temperature=hp.temperature, top_k=hp.top_k, top_p=hp.top_p)
        rewards = kl_penalized_rewards(scored.scores, old_logprobs, ref_logprobs, mask, hp.kl_coef, hp.kl_estimator)
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
        self.log_dict(metrics, batch_size=n)
        self.log_dict({"time/generate_s": gen_s, "time/score_s": score_s,
                       "rollout/tokens_per_s": float(mask.sum()) / max(gen_s, 1e-9)}, batch_size=1)
        self.last_samples = [Sample(*row) for row in zip(batch["prompts"], scored.texts, scored.raw_scores.tolist())]
        return Trajectory(input_ids, attention_mask, mask, old_logprobs, ref_logprobs, values, rewards, advantages,
                          returns, scored.scores)

    def _update(self, mb: Trajectory, opts: list[LightningOptimizer]) -> PPOStats:
        """One optimizer step of actor and critic on a minibatch, accumulated over micro-batches. Losses are token
        means over the minibatch rows of every rank: data parallelism averages gradients over ``world_size`` ranks, so
        each micro-batch is weighted by ``world_size * its tokens / all ranks' tokens``; statistics are summed."""
        hp, P = self.hparams, mb.prompt_length
        tokens = all_reduce_sum(mb.response_mask.sum()).clamp(min=1)
        for opt in opts:
            opt.zero_grad()
        sums, rows = torch.zeros(5, device=self.device), mb.input_ids.shape[0]
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        for i in range(0, rows, size := hp.micro_batch_size or rows):
            if engine is not None:  # several backwards, one step: DeepSpeed accumulates only if told where it ends
                engine.set_gradient_accumulation_boundary(i + size >= rows)
            micro = mb.select(slice(i, i + size))
            mask = micro.response_mask
            weight = mask.sum() / tokens  # token-weighted: micro-batches add up to the minibatch's token mean
            logprobs, _ = response_logprobs(self.policy, micro.input_ids, micro.attention_mask, P,
                                            temperature=hp.temperature, top_k=hp.top_k, top_p=hp.top_p)
            values = response_values(self.critic, micro.input_ids, micro.attention_mask, P)
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

    def _count_iteration(self) -> None:
        """One trainer step per PPO iteration: advance ``global_step`` by one. `_update` steps through the strategy as
        ``LightningOptimizer.step()`` does, but not through that method, which would count every inner step; Lightning
        2.6 has no public way to count a step without taking one, so this increments the counter that method would."""
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready(), progress.increment_completed()

    def rng(self) -> torch.Generator:
        """The sampling and shuffling generator on this module's device (checkpointed for exact resume)."""
        if self.generator is None or self.generator.device != self.device:
            seed = self.hparams.sampling_seed if self.hparams.sampling_seed is not None else torch.initial_seed()
            rank = self.global_rank if self._trainer is not None else 0
            self.generator = torch.Generator(device=self.device).manual_seed(seed + rank)
            if self._rng_state is not None:  # a checkpoint's state replaces the seed
                self.generator.set_state(self._rng_state)
        return self.generator

    # --- checkpointing: generator, running moments (the rest is model, optimizer and loop state) -----------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.hparams.guard_non_finite:
            check_weights(self)  # a checkpoint callback then never replaces a good file with a bad one
        moments = {"reward_moments": self.reward_moments.state_dict(), "value_moments": self.value_moments.state_dict()}
        checkpoint["ppo"] = {"rng": per_rank_state(self.rng().get_state()), **moments}  # rng: each rank's own

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("ppo", {})
        self._rng_state, self.generator = own_state(state.get("rng"), self.global_rank, "PPO sampling generator"), None
        self.reward_moments.load_state_dict(state.get("reward_moments", RunningMoments().state_dict()))
        self.value_moments.load_state_dict(state.get("value_moments", RunningMoments().state_dict()))

    def setup(self, stage: str) -> None:
        """Check the minibatch sizes against the data module's rollout size before any model is built."""
        rollout = getattr(getattr(self._trainer, "datamodule", None), "hparams", {}).get("rollout_batch_size")
        if stage == "fit" and rollout is not None:
            check_minibatches(self.hparams.mini_batch_size, self.hparams.micro_batch_size, rollout,
                              f"data.rollout_batch_size={rollout}")

    def on_fit_start(self) -> None:
        getattr(self.reward_fn, "to", lambda device: None)(self.device)  # a reward model's device

    # --- setup --------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp, mesh, dtype = self.hparams, self.device_mesh, fsdp2_param_dtype(self)
        policy = build_causal_lm(self.spec, self.tokenizer, hp.max_length)
        check_vocabulary("PPOModule", policy, self.spec, self.tokenizer)
        add_planned_adapters(self, policy)  # e.g. EMAReference's adapter, before sharding
        if not is_peft(policy):  # copied before sharding; then sharded alike, so EMA lerps matching local shards
            self.reference = fsdp2_shard(FrozenCopy.freeze(copy.deepcopy(policy)), mesh, dtype)
        else:  # LoRA: the policy with adapters disabled (EMAReference switches it to its adapter): one base model
            self.reference = AdapterReference(policy)
        critic = build_scalar_model(self.critic_spec, self.tokenizer, hp.max_length)
        check_critic_tokenizer(self.critic_spec, critic, self.tokenizer)
        # FSDP2 under ModelParallelStrategy (each decoder layer one unit; the frozen reward model too), else unchanged
        self.policy, self.critic = fsdp2_shard(policy, mesh, dtype), fsdp2_shard_scalar(critic, mesh, dtype)
        getattr(self.reward_fn, "shard", lambda mesh: None)(mesh)  # no-op without a mesh
        for dropout in (m for m in self.modules() if hp.disable_dropout and isinstance(m, nn.Dropout)):
            dropout.p = 0.0

    def configure_optimizers(self) -> list[dict[str, Any]] | dict[str, Any]:
        return actor_critic_optimization(self, self.policy, self.critic, self.factories, self.hparams.max_grad_norm)

    def export_pretrained(self, path: str, merge_lora: bool = True, is_writer: bool = True) -> str:
        """Write the policy as a Hugging Face folder (weights, config, tokenizer); under sharding call on every
        rank, ``is_writer`` marks the rank that writes."""
        return save_pretrained(self.policy, self.tokenizer, path, merge_lora=merge_lora, is_writer=is_writer,
                               card=model_card(self))
