"""OnPolicyModule: what PPO (`recipes.modules.ppo.PPOModule`) and the critic-free policy gradients
(`recipes.modules.grpo.GRPOModule`: GRPO, RLOO) share: sampling ``samples_per_prompt`` responses per prompt and
scoring them, the reference, the checkpointed sampling generator and reward moments, one trainer step per iteration,
and the export. Each subclass writes its own ``rollout`` and update; nothing here knows which algorithm runs."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from recipes.modules.adapters import add_planned_adapters
from recipes.modules.base import ReadsOldCheckpoints
from recipes.modules.distributed import own_state, per_rank_state
from recipes.modules.export import model_card, save_pretrained
from recipes.modules.generation import sample
from recipes.modules.guards import check_weights
from recipes.modules.models import ModelSpec, build_causal_lm, is_peft
from recipes.modules.ppo_rollout import score_responses
from recipes.modules.reference import AdapterReference, FrozenCopy, Reference
from recipes.modules.reward_functions import RewardFunction
from recipes.modules.rl_utils import RunningMoments
from recipes.modules.rollout import repeat_prompts, rollout_forwards, sample_in_chunks
from recipes.modules.sharding import fsdp2_param_dtype, fsdp2_shard
from recipes.modules.types import Generation, PromptBatch, Sample, ScoredResponses
from recipes.modules.validation import check_minibatches, check_vocabulary


class OnPolicyModule(ReadsOldCheckpoints, L.LightningModule):
    """The shared half of an on-policy RLHF module under manual optimization: one training step is one iteration.

    A subclass saves its hyperparameters (they must include the sampling settings ``max_new_tokens``,
    ``temperature``, ``top_k``, ``top_p``, ``generation_batch_size``, ``samples_per_prompt``, the scoring settings
    ``missing_eos_penalty``, ``reward_clip``, ``normalize_rewards``, and ``mini_batch_size``, ``micro_batch_size``,
    ``sampling_seed``, ``guard_non_finite``, ``disable_dropout``), then builds its models in ``configure_model`` with
    `build_policy`. The reference is one object, ``self.reference`` (`recipes.modules.reference`), or None when the
    algorithm reads no KL; `recipes.callbacks.ema_reference.EMAReference` updates it.

    Args:
        model: the policy (`recipes.modules.models.ModelSpec`).
        reward: a `recipes.modules.reward_functions.RewardFunction`.
        tokenizer: the data module's tokenizer (linked by the CLI).
    """

    state_key = "ppo"  # the checkpoint entry of the generator and moments (PPO's name, kept for its checkpoints)

    def __init__(self, model: ModelSpec, reward: Callable[..., Any], tokenizer: PreTrainedTokenizerBase | None) -> None:
        super().__init__()
        self.automatic_optimization = False
        if not isinstance(reward, RewardFunction):  # typed as a callable so YAML's class_path instantiates it
            raise TypeError("reward must follow recipes.modules.reward_functions.RewardFunction, got "
                            f"{type(reward).__name__}.")
        self.spec, self.tokenizer, self.reward_fn = model, tokenizer, reward
        self.policy: nn.Module | None = None
        self.reference: Reference | None = None  # built in configure_model
        self.reward_moments = RunningMoments()
        self.generator: torch.Generator | None = None
        self._rng_state: Tensor | None = None
        self.last_samples: list[Sample] = []  # the latest rollout's rows, read by SampleLogger; set by sample_and_score

    def forward(self, batch: PromptBatch) -> Generation:
        """Sample responses to a prompt batch with the configured sampling settings."""
        hp, tok = self.hparams, self.tokenizer
        return sample(self.policy, batch["input_ids"], batch["attention_mask"], hp.max_new_tokens, tok.eos_token_id,
                      tok.pad_token_id, hp.temperature, hp.top_k, hp.top_p, generator=self.rng())

    # --- one iteration: rollout, then the minibatch updates -----------------------------------------------------
    metric_prefix = "ppo"  # the logged names of the update statistics, "<prefix>/<field>"

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """One iteration: ``rollout(batch)`` (the subclass's trajectory), then ``ppo_epochs`` shuffled passes in
        minibatches of ``mini_batch_size`` rows, one ``_update(minibatch, optimizers)`` each (it returns a stats
        NamedTuple with ``approx_kl`` and a ``mean``), stopped once a minibatch's ``approx_kl`` exceeds ``target_kl``."""
        start, hp = time.perf_counter(), self.hparams
        rows = batch["input_ids"].shape[0] * hp.samples_per_prompt
        check_minibatches(hp.mini_batch_size, hp.micro_batch_size, rows, "this rollout batch", type(self).__name__)
        traj = self.rollout(batch)
        self.log("time/rollout_s", time.perf_counter() - start, batch_size=1)
        start, n = time.perf_counter(), traj.input_ids.shape[0]
        opts, schedulers = self.optimizers_and_schedulers()  # DeepSpeed: one optimizer (parameter groups)
        updates, stop = [], False  # the stats of each minibatch update
        for epoch in range(hp.ppo_epochs):
            for minibatch in traj.minibatches(hp.mini_batch_size or n, self.rng()):  # this epoch's shuffle, drawn now
                stats = self._update(minibatch, opts)
                updates.append(stats)
                stop = hp.target_kl is not None and stats.approx_kl > hp.target_kl
                if stop:
                    break  # target_kl: no further minibatch of this epoch ...
            if stop:
                break  # ... and no further epoch
        self.end_iteration(schedulers)  # schedulers step once per iteration; global_step + 1
        prefix = self.metric_prefix
        self.log_dict({f"{prefix}/{k}": v for k, v in type(updates[0]).mean(updates)._asdict().items()}, batch_size=n)
        self.log(f"{prefix}/updates", float(len(updates)), batch_size=n)
        self.log("time/train_s", time.perf_counter() - start, batch_size=1)

    # --- the rollout's first steps ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_and_score(self, batch: PromptBatch) -> tuple[PromptBatch, Generation, ScoredResponses]:
        """Repeat each prompt ``samples_per_prompt`` times (a group's rows adjacent), sample with a KV cache
        ``generation_batch_size`` rows at a time (under FSDP2 on weights gathered once), then decode and score
        (`recipes.modules.ppo_rollout.score_responses`: running standardization, clip, truncation penalty).
        Logs the generation and scoring times; keeps the rows for SampleLogger."""
        hp, tok = self.hparams, self.tokenizer
        batch = repeat_prompts(batch, hp.samples_per_prompt)
        n, start = batch["input_ids"].shape[0], time.perf_counter()
        generation = sample_in_chunks(
            self.policy, lambda ids, att: self({"input_ids": ids, "attention_mask": att}), batch["input_ids"],
            batch["attention_mask"], hp.generation_batch_size or n, tok.pad_token_id)
        gen_s, start = time.perf_counter() - start, time.perf_counter()
        response_ids, mask, ended = generation
        scored = score_responses(self.reward_fn, tok, batch, response_ids, mask, ended, hp.missing_eos_penalty,
                                 hp.reward_clip, self.reward_moments if hp.normalize_rewards else None, self.device,
                                 self.global_step)
        self.log_dict({"time/generate_s": gen_s, "time/score_s": time.perf_counter() - start,
                       "rollout/tokens_per_s": float(mask.sum()) / max(gen_s, 1e-9)}, batch_size=1)
        parts = getattr(self.reward_fn, "last_metrics", {})  # a combined reward's parts (and multiplier)
        if parts:
            self.log_dict({f"reward/{name}": float(value) for name, value in parts.items()}, batch_size=n)
        self.last_samples = [Sample(*row) for row in zip(batch["prompts"], scored.texts, scored.raw_scores.tolist())]
        return batch, generation, scored

    # --- validation: held-out prompts (PromptDataModule.val_data) ---------------------------------------------------
    @torch.no_grad()
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """One response per held-out prompt, sampled with the training settings from a generator of its own (seeded
        by the sampling seed, the batch and the rank: the same draws at every validation, and the training generator
        untouched), scored by the reward as it returns scores (no standardization; a combined reward's multiplier
        held still), and its KL to the reference. Logs ``val/reward``, ``val/kl`` (summed per response),
        ``val/response_length`` and ``val/eos_rate``, averaged over every rank's prompts: a reward that rises in
        training but not here is being overfit."""
        hp, tok, n = self.hparams, self.tokenizer, batch["input_ids"].shape[0]
        seed = hp.sampling_seed if hp.sampling_seed is not None else torch.initial_seed()
        generator = torch.Generator(device=self.device).manual_seed(seed + 7919 * (batch_idx + 1) + self.global_rank)
        response_ids, mask, ended = sample_in_chunks(
            self.policy, lambda ids, att: sample(self.policy, ids, att, hp.max_new_tokens, tok.eos_token_id,
                                                 tok.pad_token_id, hp.temperature, hp.top_k, hp.top_p,
                                                 generator=generator),
            batch["input_ids"], batch["attention_mask"], hp.generation_batch_size or n, tok.pad_token_id)
        texts = tok.batch_decode([ids[:int(m.sum())] for ids, m in zip(response_ids, mask)], skip_special_tokens=True)
        with getattr(self.reward_fn, "frozen", contextlib.nullcontext)():
            scores = self.reward_fn(batch["prompts"], texts, batch.get("metadata")).float()
        metrics = {"val/reward": scores.mean(), "val/response_length": mask.sum(1).float().mean(),
                   "val/eos_rate": ended.float().mean()}
        if self.reference is not None:
            input_ids = torch.cat([batch["input_ids"], response_ids], 1)
            attention_mask = torch.cat([batch["attention_mask"], mask], 1)
            logprobs, _, ref_logprobs, _ = rollout_forwards(
                self.policy, None, self.reference, input_ids, attention_mask, batch["input_ids"].shape[1],
                hp.micro_batch_size or n, temperature=hp.temperature, top_k=hp.top_k, top_p=hp.top_p)
            metrics["val/kl"] = ((logprobs - ref_logprobs) * mask).sum(1).mean()
        self.log_dict({k: v.to(self.device) for k, v in metrics.items()}, batch_size=n, sync_dist=True,
                      prog_bar=False)

    # --- one iteration, one trainer step ------------------------------------------------------------------------
    def optimizers_and_schedulers(self) -> tuple[list[LightningOptimizer], list[Any]]:
        """The optimizers (DeepSpeed: one, with parameter groups) and the schedulers that are set, as lists."""
        opts, schedulers = self.optimizers(), self.lr_schedulers()
        opts = opts if isinstance(opts, list) else [opts]
        return opts, [s for s in (schedulers if isinstance(schedulers, list) else [schedulers]) if s]

    def end_iteration(self, schedulers: list[Any]) -> None:
        """Step each scheduler once (they count iterations) and advance ``global_step`` by one."""
        for scheduler in schedulers:
            scheduler.step()
        self._count_iteration()

    def _count_iteration(self) -> None:
        """One trainer step per iteration: advance ``global_step`` by one. The updates step through the strategy as
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
    def extra_state(self) -> dict[str, Any]:
        """A subclass's own checkpointed state (PPO: the critic's value moments); restored by `load_extra_state`."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` wrote (``state`` is the whole entry; absent keys mean an older checkpoint)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.hparams.guard_non_finite:
            check_weights(self)  # a checkpoint callback then never replaces a good file with a bad one
        reward = getattr(self.reward_fn, "checkpoint_state", None)  # e.g. a Lagrange multiplier
        checkpoint[self.state_key] = {"rng": per_rank_state(self.rng().get_state()),  # rng: each rank's own
                                      "reward_moments": self.reward_moments.state_dict(), **self.extra_state(),
                                      **({"reward_state": reward()} if reward is not None else {})}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(self.state_key, {})
        self._rng_state, self.generator = own_state(state.get("rng"), self.global_rank, "sampling generator"), None
        self.reward_moments.load_state_dict(state.get("reward_moments", RunningMoments().state_dict()))
        self.load_extra_state(state)
        if "reward_state" in state and hasattr(self.reward_fn, "load_checkpoint_state"):
            self.reward_fn.load_checkpoint_state(state["reward_state"])

    def setup(self, stage: str) -> None:
        """Check the minibatch sizes against the data module's rollout size before any model is built."""
        rollout = getattr(getattr(self._trainer, "datamodule", None), "hparams", {}).get("rollout_batch_size")
        if stage == "fit" and rollout is not None:
            rows, k = rollout * self.hparams.samples_per_prompt, self.hparams.samples_per_prompt
            source = f"data.rollout_batch_size={rollout}" + (f" x samples_per_prompt={k}" if k > 1 else "")
            check_minibatches(self.hparams.mini_batch_size, self.hparams.micro_batch_size, rows, source,
                              type(self).__name__)

    def on_fit_start(self) -> None:
        getattr(self.reward_fn, "to", lambda device: None)(self.device)  # a reward model's device

    # --- setup --------------------------------------------------------------------------------------------------
    def build_policy(self, with_reference: bool = True) -> nn.Module:
        """The policy, unsharded (the caller shards it with `recipes.modules.sharding.fsdp2_shard` once its other
        models are built), with the adapters callbacks planned; sets ``self.reference``: a `FrozenCopy` taken before
        sharding and sharded alike (so EMA lerps matching local shards), or with LoRA the `AdapterReference` (the
        policy with adapters disabled, one base model); None without ``with_reference``."""
        hp, mesh, dtype = self.hparams, self.device_mesh, fsdp2_param_dtype(self)
        policy = build_causal_lm(self.spec, self.tokenizer, hp.max_length)
        check_vocabulary(type(self).__name__, policy, self.spec, self.tokenizer)
        add_planned_adapters(self, policy)  # e.g. EMAReference's adapter, before sharding
        if not with_reference:
            self.reference = None
        elif not is_peft(policy):
            self.reference = fsdp2_shard(FrozenCopy.freeze(copy.deepcopy(policy)), mesh, dtype)
        else:
            self.reference = AdapterReference(policy)
        return policy

    def finish_models(self) -> None:
        """After the models are built and sharded: shard the reward (a no-op without a mesh) and, with
        ``disable_dropout``, set every dropout to 0 so rollout and update see the same policy."""
        getattr(self.reward_fn, "shard", lambda mesh: None)(self.device_mesh)
        for dropout in (m for m in self.modules() if self.hparams.disable_dropout and isinstance(m, nn.Dropout)):
            dropout.p = 0.0

    def export_pretrained(self, path: str, merge_lora: bool = True, is_writer: bool = True) -> str:
        """Write the policy as a Hugging Face folder (weights, config, tokenizer); under sharding call on every
        rank, ``is_writer`` marks the rank that writes."""
        return save_pretrained(self.policy, self.tokenizer, path, merge_lora=merge_lora, is_writer=is_writer,
                               card=model_card(self))
