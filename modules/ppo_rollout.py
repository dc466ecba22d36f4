"""PPO's own steps of a rollout, around the algorithm-agnostic ones of `recipes.modules.rollout`: scoring the sampled
responses (step 3 of `recipes.modules.ppo.PPOModule.rollout`), the critic's running-moment units (steps 5 and 6) and
the rollout's metrics. Near-pure functions: the only state they change is the `RunningMoments` handed to them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from recipes.modules.distributed import update_global_moments
from recipes.modules.guards import check_scores
from recipes.modules.rl_utils import KLEstimator, RunningMoments, kl_estimate, masked_mean, terminal_scores
from recipes.modules.types import PromptBatch, ScoredResponses


def score_responses(
    reward_fn: Callable[..., Tensor],
    tokenizer: PreTrainedTokenizerBase,
    batch: PromptBatch,
    response_ids: Tensor,
    response_mask: Tensor,
    ended_with_eos: Tensor,
    missing_eos_penalty: float | None,
    reward_clip: float | None,
    reward_moments: RunningMoments | None,
    device: torch.device,
    step: int | None = None,
) -> ScoredResponses:
    """Step 3: decode the responses, score them with ``reward_fn``, refuse non-finite scores (naming the rows), then
    standardize, clip and penalize them.

    Args:
        reward_fn: a `recipes.modules.reward_functions.RewardFunction`, ``(prompts, responses, metadata) -> (B,)``.
        tokenizer: decodes each response up to its mask's length, special tokens skipped.
        batch: the prompt batch; its ``prompts`` and ``metadata`` go to the reward.
        response_ids: the sampled tokens, right-padded. Shape: (b, r)
        response_mask: 1 on the response tokens. Shape: (b, r)
        ended_with_eos: True where the response stopped with EOS. Shape: (b,)
        missing_eos_penalty, reward_clip: the truncation penalty and the clip of
            `recipes.modules.rl_utils.terminal_scores`, applied after the standardization.
        reward_moments: merge the raw scores of every rank into these running moments, then standardize by them
            (every rank sees the same moments); None: no standardization. Until two scores have been seen their
            std is undefined: the scores are then only centered.
        device: where the scores go (the reward returns them on the CPU).
        step: the global step, named in the error about non-finite scores.

    Returns:
        The texts, the raw float scores and the terminal scores. Shape of each score: (b,)
    """
    rows = zip(response_ids, response_mask)
    texts = tokenizer.batch_decode([ids[:int(mask.sum())] for ids, mask in rows], skip_special_tokens=True)
    raw_scores = reward_fn(batch["prompts"], texts, batch.get("metadata")).to(device).float()
    check_scores(raw_scores, texts, reward_fn, f"global step {step}: " if step is not None else "")
    scores = raw_scores
    if reward_moments is not None:
        update_global_moments(reward_moments, raw_scores)
        std = reward_moments.std if reward_moments.count > 1 else 1.0  # one score has no spread: center only
        scores = (raw_scores - reward_moments.mean) / max(std, 1e-8)
    return ScoredResponses(texts, raw_scores, terminal_scores(scores, ended_with_eos, missing_eos_penalty, reward_clip))


def value_scale(value_moments: RunningMoments | None) -> tuple[float, float]:
    """``(mean, std)`` that map the critic's output to reward units: the running moments of every return seen, or
    ``(0, 1)`` without them (None, or fewer than two returns so far)."""
    if value_moments is None or value_moments.count < 2:
        return 0.0, 1.0
    return value_moments.mean, max(value_moments.std, 1e-8)


def in_reward_units(values: Tensor, value_moments: RunningMoments | None) -> Tensor:
    """Step 5: the critic's values in reward units, ``values * std + mean`` under `value_scale` (the moments before
    this rollout's returns are merged), for GAE. Shape: (b, r)"""
    mean, std = value_scale(value_moments)
    return values * std + mean


def standardize_values(
    raw_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    value_moments: RunningMoments,
) -> tuple[Tensor, Tensor]:
    """Step 6 with ``normalize_values``: merge the returns of every rank into ``value_moments``, then express values
    and returns in the units of the updated moments, ``(x - mean) / std``, 0 on padding.

    Args:
        raw_values: the critic's values in reward units. Shape: (b, r)
        returns: the GAE returns in reward units. Shape: (b, r)
        mask: 1 on response tokens. Shape: (b, r)
        value_moments: the running moments of the returns; updated in place.

    Returns:
        The standardized values and returns. Shape: (b, r)
    """
    update_global_moments(value_moments, returns[mask.bool()])
    mean, std = value_scale(value_moments)
    return (raw_values - mean) / std * mask, (returns - mean) / std * mask


def rollout_metrics(
    scored: ScoredResponses,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    entropy: Tensor,
    ended: Tensor,
    advantages: Tensor,
    mask: Tensor,
    kl_estimator: KLEstimator,
) -> dict[str, Tensor]:
    """The rollout's ``ppo/*`` metrics: the raw reward and terminal score means, the per-response KL sum (mean over
    rows), the sampling policy's token entropy, the response length, the EOS rate and the mean of ``advantages``
    (pass them before whitening). Shapes: per-token inputs (b, r); ``ended`` (b,)."""
    kl = kl_estimate(old_logprobs, ref_logprobs, kl_estimator)
    metrics = {"reward": scored.raw_scores.mean(), "score": scored.scores.mean(), "kl": (kl * mask).sum(1).mean(),
               "entropy": masked_mean(entropy, mask), "response_length": mask.sum(1).float().mean(),
               "eos_rate": ended.float().mean(), "advantage_mean": masked_mean(advantages, mask)}
    return {f"ppo/{name}": value for name, value in metrics.items()}
