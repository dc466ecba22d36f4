"""Typed containers passed between the PPO rollout, the reward and the update: shapes documented per field."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple, TypedDict

import torch
from torch import Tensor


class PromptBatch(TypedDict):
    """A left-padded batch of prompts from `recipes.datamodules.prompts.PromptDataModule`.

    ``input_ids`` and ``attention_mask`` are ``(B, P)``; ``prompts`` holds the rendered prompt texts and
    ``metadata`` one record per row (the source row's other fields, handed to the reward).
    """

    input_ids: Tensor
    attention_mask: Tensor
    prompts: list[str]
    metadata: list[dict[str, Any]]


class Generation(NamedTuple):
    """Sampled responses to a left-padded prompt batch.

    Fields:
        response_ids: ``(B, R)`` sampled tokens, right-padded with the pad id after EOS.
        response_mask: ``(B, R)`` 1 on generated tokens up to and including EOS, 0 after.
        ended_with_eos: ``(B,)`` bool, True where the response stopped with EOS (not truncated).
    """

    response_ids: Tensor
    response_mask: Tensor
    ended_with_eos: Tensor


class Trajectory(NamedTuple):
    """One PPO rollout: everything the update epochs need, detached. ``P`` prompt columns, ``R`` response columns.

    Fields:
        input_ids: ``(B, P + R)`` left-padded prompt followed by the right-padded response.
        attention_mask: ``(B, P + R)``.
        response_mask: ``(B, R)`` 1 on response tokens (EOS included), 0 on padding.
        old_logprobs: ``(B, R)`` log-probs of the sampled tokens under the sampling policy.
        ref_logprobs: ``(B, R)`` the same under the reference.
        values: ``(B, R)`` critic values before each response token (in the critic's units, see
            ``normalize_values``).
        rewards: ``(B, R)`` per-token rewards: KL penalty plus the terminal score on the last token.
        advantages: ``(B, R)`` GAE advantages (whitened over the whole rollout when ``normalize_advantages``).
        returns: ``(B, R)`` value targets in the critic's units.
        scores: ``(B,)`` terminal scores as placed on the last token (clipped, penalized, normalized).
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    old_logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor
    scores: Tensor

    @property
    def prompt_length(self) -> int:
        """``P``: the number of prompt columns (every response starts at this column)."""
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def select(self, index: Tensor) -> Trajectory:
        """The rows ``index`` of every field (a minibatch)."""
        return Trajectory(*(field[index] for field in self))

    def trimmed(self) -> Trajectory:
        """Without the response columns that are padding in every row (`trim_padding`)."""
        return trim_padding(self)

    def minibatches(self, size: int, generator: torch.Generator | None = None) -> Iterator[Trajectory]:
        """Shuffled minibatches of ``size`` rows (the last one smaller if ``size`` does not divide the batch)."""
        return shuffled_minibatches(self, size, generator)


def shuffled_minibatches(rollout: Any, size: int, generator: torch.Generator | None = None) -> Iterator[Any]:
    """``rollout.select(rows)`` for one random order of its rows, ``size`` rows at a time (the last smaller if
    ``size`` does not divide them); the order is drawn from ``generator`` when the first minibatch is asked for."""
    n = rollout.input_ids.shape[0]
    device = generator.device if generator is not None else rollout.input_ids.device
    order = torch.randperm(n, generator=generator, device=device).to(rollout.input_ids.device)
    for start in range(0, n, size):
        yield rollout.select(order[start:start + size])


def longest_response(attention_mask: Tensor, prompt_length: int) -> int:
    """The number of response columns that any row still attends to (at least 1), for a left-padded prompt of
    ``prompt_length`` columns followed by right-padded responses. One host sync."""
    return max(int(attention_mask[:, prompt_length:].sum(1).max()), 1)


def trim_padding(rollout: Any) -> Any:
    """``rollout`` (a `Trajectory` or `GroupTrajectory`) without the response columns past its longest response:
    the pad tail of finished responses never reaches a forward. Exact to the bit: no kept position attends to a cut
    one, and the kept columns keep their place from the left (so attention kernels sum in the same blocks; cutting
    left padding instead shifts them and moves results by rounding, which would break PPO's ratio of exactly 1).
    ``(B, P + R)`` and ``(B, R)`` fields lose the same tail."""
    P, R = rollout.prompt_length, rollout.response_mask.shape[1]
    keep = longest_response(rollout.attention_mask, P)
    if keep == R:
        return rollout
    return type(rollout)(*(f if f is None or f.dim() != 2 else f[:, :P + keep] if f.shape[1] == P + R
                           else f[:, :keep] for f in rollout))


class GroupTrajectory(NamedTuple):
    """One critic-free rollout (`recipes.modules.grpo.GRPOModule`): groups of ``samples_per_prompt`` adjacent rows
    answer one prompt. ``P`` prompt columns, ``R`` response columns; detached.

    Fields:
        input_ids: ``(B, P + R)`` left-padded prompt followed by the right-padded response.
        attention_mask: ``(B, P + R)``.
        response_mask: ``(B, R)`` 1 on response tokens (EOS included), 0 on padding.
        old_logprobs: ``(B, R)`` log-probs under the sampling policy; None when the policy cannot change before
            the row's one update (one epoch, one minibatch, no reference): the update then uses its own, detached.
        ref_logprobs: ``(B, R)`` the same under the reference; None without one.
        advantages: ``(B,)`` one advantage per response.
        rewards: ``(B,)`` the sequence rewards the advantages were computed from.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    old_logprobs: Tensor | None
    ref_logprobs: Tensor | None
    advantages: Tensor
    rewards: Tensor

    @property
    def prompt_length(self) -> int:
        """``P``: the number of prompt columns (every response starts at this column)."""
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def select(self, index: Tensor | slice) -> GroupTrajectory:
        """The rows ``index`` of every field (a minibatch)."""
        return GroupTrajectory(*(None if field is None else field[index] for field in self))

    def trimmed(self) -> GroupTrajectory:
        """Without the response columns that are padding in every row (`trim_padding`)."""
        return trim_padding(self)

    def minibatches(self, size: int, generator: torch.Generator | None = None) -> Iterator[GroupTrajectory]:
        """Shuffled minibatches of ``size`` rows (groups are split: each row's advantage is already fixed)."""
        return shuffled_minibatches(self, size, generator)


class ScoredResponses(NamedTuple):
    """The sampled responses of a rollout, decoded and scored (step 3 of `recipes.modules.ppo.PPOModule.rollout`).

    Fields:
        texts: the decoded responses (special tokens skipped, so without the EOS), one per row.
        raw_scores: ``(B,)`` float, the reward's scores as it returned them.
        scores: ``(B,)`` the terminal scores placed on the last token (normalized, clipped, penalized).
    """

    texts: list[str]
    raw_scores: Tensor
    scores: Tensor


class Sample(NamedTuple):
    """One row of the latest rollout, as `recipes.callbacks.sample_logger.SampleLogger` logs it."""

    prompt: str
    response: str
    reward: float  # the raw score (before normalization, clip and penalty)


class PPOStats(NamedTuple):
    """Statistics of one PPO update (one minibatch): token means over the minibatch rows of every rank.

    Fields:
        policy_loss: the clipped surrogate loss (`recipes.modules.losses.PPOPolicyLoss`).
        value_loss: the clipped value loss (`recipes.modules.losses.PPOValueLoss`).
        approx_kl: the approximate KL from the rollout's policy to the current one, what ``target_kl`` compares.
        clipfrac: the fraction of tokens whose ratio was clipped.
        value_clipfrac: the fraction of tokens whose value was clipped.
    """

    policy_loss: float
    value_loss: float
    approx_kl: float
    clipfrac: float
    value_clipfrac: float

    @staticmethod
    def mean(updates: list[PPOStats]) -> PPOStats:
        """The field-wise mean over an iteration's updates (in float32, as the logged metrics are)."""
        return PPOStats(*torch.tensor(updates).mean(0).tolist())


class GRPOStats(NamedTuple):
    """Statistics of one critic-free update (one minibatch), over the minibatch rows of every rank.

    Fields:
        policy_loss: the reduced `recipes.modules.policy_losses.GRPOLoss` (the KL term included).
        approx_kl: token mean of the approximate KL from the rollout's policy to the current one (``target_kl``).
        clipfrac: the fraction of tokens whose ratio was clipped.
        kl: token mean of the k3 KL to the reference (0 without one).
    """

    policy_loss: float
    approx_kl: float
    clipfrac: float
    kl: float

    @staticmethod
    def mean(updates: list[GRPOStats]) -> GRPOStats:
        """The field-wise mean over an iteration's updates (in float32, as the logged metrics are)."""
        return GRPOStats(*torch.tensor(updates).mean(0).tolist())
