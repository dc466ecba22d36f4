"""OnlinePreferenceDataModule: preference pairs generated from the current policy, one round per epoch (DPO-Iter,
Xu et al. 2024, arXiv 2404.10719 Sec. 6), plus `form_pairs`, the rule that turns k scored responses into pairs.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from recipes.datamodules.collate import PreferenceExample, collate_preference, pad_prompts
from recipes.datamodules.formats import PromptFormat
from recipes.datamodules.prompts import BUILTIN_PROMPTS, PromptDataModule, PromptSource
from recipes.datamodules.resumable import ResumableLoaderMixin
from recipes.modules.distributed import own_state, per_rank_state
from recipes.modules.generation import sample
from recipes.modules.guards import check_scores
from recipes.modules.sharding import unsharded
from recipes.modules.tokenizer import load_tokenizer
from recipes.modules.validation import at_least, check_loader_args

log = logging.getLogger(__name__)

PairMode = Literal["best_vs_worst", "all_pairs_above_margin"]


def form_pairs(rewards: Sequence[float], mode: PairMode = "best_vs_worst",
               margin: float = 0.0) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """(chosen, rejected) index pairs among the k responses to one prompt, and the counts of what was dropped.

    - ``best_vs_worst``: one pair, the first highest-scored response against the first lowest-scored one; dropped
      (``ties``) when every response has the same reward.
    - ``all_pairs_above_margin``: every ``i < j`` whose rewards differ by more than ``margin``, the higher one
      chosen, in ``(i, j)`` order; equal rewards count as ``ties``, other differences ``<= margin`` as
      ``below_margin``.

    Example::

        form_pairs([1.0, 3.0, 1.0, 2.0])  # ([(1, 0)], {'ties': 0, 'below_margin': 0})
        form_pairs([1.0, 3.0, 1.0, 2.0], "all_pairs_above_margin", 1.0)  # ([(1, 0), (1, 2)], {'ties': 1, ...})
    """
    counts = {"ties": 0, "below_margin": 0}
    r = [float(x) for x in rewards]
    if mode == "best_vs_worst":
        best, worst = max(range(len(r)), key=lambda i: r[i]), min(range(len(r)), key=lambda i: r[i])
        if r[best] == r[worst]:
            counts["ties"] += 1
            return [], counts
        return [(best, worst)], counts
    if mode != "all_pairs_above_margin":
        raise ValueError(f"Unknown pairing {mode!r}; choose best_vs_worst or all_pairs_above_margin.")
    pairs = []
    for i in range(len(r)):
        for j in range(i + 1, len(r)):
            if r[i] == r[j]:
                counts["ties"] += 1
            elif abs(r[i] - r[j]) <= margin:
                counts["below_margin"] += 1
            else:
                pairs.append((i, j) if r[i] > r[j] else (j, i))
    return pairs, counts


class OnlinePreferenceDataModule(ResumableLoaderMixin, L.LightningDataModule):
    """Pairs for one DPO-Iter round, generated from the policy that starts the round; one epoch is one round.

    With ``trainer.reload_dataloaders_every_n_epochs: 1`` Lightning calls ``train_dataloader`` at the start of every
    epoch, and each call builds round ``trainer.current_epoch``:

    1. pick ``prompts_per_round`` prompts (a seeded shuffle of round ``r``: ``random.Random(seed + r)``);
    2. sample ``k`` responses to each with the module's policy (eval mode, KV cache,
       `recipes.modules.generation.sample`) from a generator whose state is checkpointed;
    3. score them with ``reward`` (any `recipes.modules.reward_functions.RewardFunction`: a reward-model folder, a
       programmatic reward, unit tests), and log the mean (``history[-1]["reward_mean"]``, the learning curve);
    4. form pairs (`form_pairs`); equal rewards carry no preference and are dropped and counted.

    Resume: the round's pairs, its statistics and the generator state are in this module's ``state_dict`` (so in every
    checkpoint); a run killed inside a round trains on the same pairs from the next unseen batch, and a run killed
    between rounds generates the next round exactly as an uninterrupted run does. The reference reset belongs to
    `recipes.callbacks.dpo_iter.DPOIterRound`. With several processes each rank generates a strided share of the round's
    prompts and the pairs are all-gathered in prompt order, so every rank holds the list one process would build
    (then sharded by the sampler); under FSDP2 the policy samples on weights gathered once (`unsharded`).

    Args:
        reward: a `recipes.modules.reward_functions.RewardFunction` (``class_path``).
        tokenizer, data, source_format, prompt_format, split, max_rows, long_prompts: the prompts, read as
            `recipes.datamodules.prompts.PromptDataModule` reads them (their metadata goes to the reward).
        max_length: prompt + response token budget; ``max_prompt_length`` (default half) for the prompt.
        prompts_per_round: prompts per round (all prompts when larger than the set).
        k: responses per prompt (paper: 5 on APPS).
        pairing, margin: see `form_pairs`.
        max_new_tokens: response budget (default ``max_length - max_prompt_length``).
        temperature, top_k, top_p: sampling settings.
        generation_batch_size: sequences per generation forward (default: all ``k`` of ``prompts_per_round``).
        batch_size: pairs per DPO micro-batch per process.
        policy_attr: the LightningModule attribute holding the policy.
        seed: prompt choice, sampling and batch order.
    """

    def __init__(
        self,
        reward: Callable[..., Any],
        tokenizer: str = "builtin:byte",
        data: str = BUILTIN_PROMPTS,
        source_format: PromptSource = "plain",
        prompt_format: PromptFormat = "plain",
        split: str = "train",
        max_rows: int | None = None,
        long_prompts: Literal["drop", "truncate"] = "drop",
        max_length: int = 512,
        max_prompt_length: int | None = None,
        prompts_per_round: int = 512,
        k: int = 2,
        pairing: PairMode = "best_vs_worst",
        margin: float = 0.0,
        max_new_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generation_batch_size: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        policy_attr: str = "policy",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["reward"])
        if k < 2:
            raise ValueError(f"OnlinePreferenceDataModule: k={k}; a pair needs at least 2 responses per prompt.")
        owner = "OnlinePreferenceDataModule"
        check_loader_args(owner, "batch_size", batch_size, num_workers, max_rows)
        for name, value in (("prompts_per_round", prompts_per_round), ("generation_batch_size", generation_batch_size)):
            at_least(owner, name, value, 1, "Use an integer >= 1")
        at_least(owner, "margin", margin, 0.0, "0 keeps every pair whose rewards differ")
        self.max_new_tokens = max_new_tokens or max_length - (max_prompt_length or max_length // 2)
        at_least(owner, "max_new_tokens", self.max_new_tokens, 1, "Set max_new_tokens, or leave room for it between "
                 "max_prompt_length and max_length")
        self.reward_fn = reward
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_length, self.batch_size, self.num_workers, self.seed = max_length, batch_size, num_workers, seed
        self.prompts: PromptDataModule | None = None  # built in setup: its save_hyperparameters must not see ours
        self.train_set: list[PreferenceExample] = []
        self.val_set: list[PreferenceExample] = []  # DPOModule's precomputed reference reads both splits
        self.round: int | None = None  # the round whose pairs train_set holds
        self.history: list[dict[str, float]] = []  # one entry per generated round
        self.generator: torch.Generator | None = None
        self._rng_state: torch.Tensor | None = None

    def setup(self, stage: str) -> None:
        if self.prompts is None:
            hp = self.hparams
            self.prompts = PromptDataModule(
                tokenizer=hp.tokenizer, data=hp.data, source_format=hp.source_format, prompt_format=hp.prompt_format,
                split=hp.split, max_length=hp.max_length, max_prompt_length=hp.max_prompt_length,
                long_prompts=hp.long_prompts, rollout_batch_size=1, max_rows=hp.max_rows, seed=hp.seed)
            self.prompts.setup(stage)

    # --- one round ----------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        round_ = self.trainer.current_epoch
        if self.round != round_:  # a restored checkpoint of this round already holds its pairs
            self.train_set = self.generate_round(getattr(self.trainer.lightning_module, self.hparams.policy_attr),
                                                 round_)
            self.round = round_
        return self.resumable_loader(self.train_set, self.collate)

    def collate(self, examples: Sequence[PreferenceExample]) -> dict[str, torch.Tensor]:
        return collate_preference(examples, self.tokenizer.pad_token_id)

    @torch.no_grad()
    def generate_round(self, policy: nn.Module, round_: int) -> list[PreferenceExample]:
        """Steps 1-4 of a round (see the class docstring): the round's pairs, indexed, with ``history`` appended."""
        hp, tok = self.hparams, self.tokenizer
        rows = list(self.prompts.train_set)
        random.Random(hp.seed + round_).shuffle(rows)
        rows = rows[:hp.prompts_per_round]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        local = rows[rank::world]
        device = next(policy.parameters()).device
        if hasattr(self.reward_fn, "to"):
            self.reward_fn.to(device)
        # 2. k samples per prompt, prompt-major: sequences i*k ... i*k + k - 1 answer prompt i
        seqs = [row for row in local for _ in range(hp.k)]
        with unsharded(policy):  # FSDP2: weights gathered once, so each rank may stop sampling on its own
            responses = self.sample_responses(policy, seqs, device)
        # 3. score the texts (stop token stripped)
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        rewards = self.reward_fn([r["prompt"] for r in seqs], texts, [r["metadata"] for r in seqs]).float().cpu()
        check_scores(rewards.to(device), texts, self.reward_fn, f"DPO-Iter round {round_}: ")
        # 4. pairs
        examples, counts = [], {"ties": 0, "below_margin": 0, "identical": 0}
        order = []  # each pair's prompt position in the round (rank r holds positions r, r + world, ...)
        for i, row in enumerate(local):
            pairs, dropped = form_pairs(rewards[i * hp.k:(i + 1) * hp.k].tolist(), hp.pairing, hp.margin)
            for key, n in dropped.items():
                counts[key] += n
            for c, r in pairs:
                chosen, rejected = responses[i * hp.k + c], responses[i * hp.k + r]
                if chosen == rejected:  # a stochastic reward scored one text twice differently
                    counts["identical"] += 1
                    continue
                examples.append(PreferenceExample(prompt_ids=list(row["input_ids"]), chosen_ids=chosen,
                                                  rejected_ids=rejected))
                order.append(i * world + rank)
        stats = torch.tensor([rewards.sum().item(), float(len(rewards)), float(len(examples)), counts["ties"],
                              counts["below_margin"], counts["identical"]], dtype=torch.float64)
        if world > 1:  # every rank trains on every pair, in prompt order as one process has them; the sampler
            gathered: list[Any] = [None] * world  # shards them again
            torch.distributed.all_gather_object(gathered, list(zip(order, examples)))
            examples = [e for _, e in sorted((p for part in gathered for p in part), key=lambda p: p[0])]
            stats = self.trainer.strategy.reduce(stats.to(device), reduce_op="sum").cpu()
        for i, example in enumerate(examples):
            example["index"] = i
        total, n, n_pairs, ties, below, identical = stats.tolist()
        entry = {"round": float(round_), "reward_mean": total / max(n, 1.0), "pairs": n_pairs, "ties": ties,
                 "below_margin": below, "identical": identical, "prompts": float(len(rows))}
        self.history.append(entry)
        log.info("DPO-Iter round %d: %d prompts x %d samples, mean reward %.4f, %d pairs (dropped: %d ties, %d within "
                 "margin %.3g, %d identical texts)", round_, len(rows), hp.k, entry["reward_mean"], n_pairs, ties,
                 below, hp.margin, identical)
        if not examples:
            raise RuntimeError(f"DPO-Iter round {round_}: no pairs (all {hp.k} responses scored alike on every prompt: "
                               f"{int(ties)} ties, {int(below)} within the margin). Raise data.k or data.temperature, "
                               "or lower data.margin.")
        return examples

    def sample_responses(self, policy: nn.Module, seqs: list[dict[str, Any]], device: torch.device) -> list[list[int]]:
        """Step 2's sampling: the response token ids (stop token included, padding cut) of each prompt row in
        ``seqs``, ``generation_batch_size`` rows at a time, from the checkpointed generator."""
        hp, tok = self.hparams, self.tokenizer
        chunk, responses = hp.generation_batch_size or max(1, len(seqs)), []
        for start in range(0, len(seqs), chunk):
            batch = pad_prompts(seqs[start:start + chunk], tok.pad_token_id)
            gen = sample(policy, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                         self.max_new_tokens, tok.eos_token_id, tok.pad_token_id, hp.temperature, hp.top_k, hp.top_p,
                         generator=self.rng(device))
            lengths = gen.response_mask.sum(1).tolist()
            responses += [ids[:n] for ids, n in zip(gen.response_ids.tolist(), lengths)]
        return responses

    def rng(self, device: torch.device) -> torch.Generator:
        """The sampling generator on ``device`` (seeded with ``seed + rank``; its state is checkpointed)."""
        if self.generator is None or self.generator.device != torch.device(device):
            self.generator = torch.Generator(device=device)
            if self._rng_state is not None:
                self.generator.set_state(self._rng_state)
            else:
                self.generator.manual_seed(self.seed + (self.trainer.global_rank if self.trainer is not None else 0))
        return self.generator

    # --- exact resume: the round's pairs, the generator, the consumed batches ---------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(round=self.round, pairs=self.train_set, history=self.history,
                     rng=per_rank_state(self.generator.get_state() if self.generator is not None else self._rng_state))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.round, self.train_set = state_dict.get("round"), list(state_dict.get("pairs", []))
        self.history = list(state_dict.get("history", []))
        rank = self.trainer.global_rank if self.trainer is not None else 0
        self._rng_state, self.generator = own_state(state_dict.get("rng"), rank, "DPO-Iter sampling generator"), None
