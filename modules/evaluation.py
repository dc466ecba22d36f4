"""Evaluation arithmetic shared by the evaluation command and the study: pairwise win/tie/loss by score, and the KL
of a policy to a reference measured on the policy's own sampled responses. Pure functions; no I/O."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from modules.generation import response_logprobs


class WinTieLoss(NamedTuple):
    """Counts of a pairwise comparison over ``n`` prompts (``win + tie + loss == n``) and the derived rates.

    ``win_rate`` counts a tie as half a win, the convention of the paper's Table 4 and of AlpacaEval.
    """

    win: int
    tie: int
    loss: int

    @property
    def n(self) -> int:
        return self.win + self.tie + self.loss

    @property
    def win_rate(self) -> float:
        return (self.win + 0.5 * self.tie) / self.n if self.n else float("nan")

    def mirrored(self) -> WinTieLoss:
        """The same comparison seen from the other side."""
        return WinTieLoss(self.loss, self.tie, self.win)


def win_tie_loss(scores: Tensor, baseline_scores: Tensor, tie_margin: float = 0.0) -> WinTieLoss:
    """Compare two responses per prompt by score: a win where ``scores - baseline_scores > tie_margin``, a loss
    where it is ``< -tie_margin``, a tie otherwise (so ``|difference| <= tie_margin`` is a tie).

    Args:
        scores, baseline_scores: one score per prompt for the policy and for the baseline. Shape: ``(n,)``.
        tie_margin: the largest absolute score difference still called a tie (``>= 0``).

    Returns:
        `WinTieLoss` with ``win + tie + loss == n``.
    """
    if scores.shape != baseline_scores.shape or scores.dim() != 1:
        raise ValueError(f"win_tie_loss: need two (n,) score vectors, got {tuple(scores.shape)} and "
                         f"{tuple(baseline_scores.shape)}.")
    if tie_margin < 0:
        raise ValueError(f"win_tie_loss: tie_margin must be >= 0, got {tie_margin}.")
    diff = scores.double() - baseline_scores.double()
    win, loss = int((diff > tie_margin).sum()), int((diff < -tie_margin).sum())
    return WinTieLoss(win, len(diff) - win - loss, loss)


@torch.no_grad()
def sequence_kl(policy: nn.Module, reference: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                prompt_length: int, response_mask: Tensor) -> Tensor:
    """Monte-Carlo KL(policy || reference) per sampled response: ``sum_t log pi(y_t|.) - log pi_ref(y_t|.)`` over the
    response tokens, an unbiased estimate of the sequence-level KL when the responses were sampled from ``policy``
    (the ``k1`` estimator of `modules.rl_utils.kl_estimate`, summed over tokens).

    Args:
        policy, reference: causal LMs reading the same token ids.
        input_ids, attention_mask: left-padded prompt followed by the right-padded response. Shape: ``(B, P + R)``.
        prompt_length: ``P``, the number of prompt columns.
        response_mask: 1 on response tokens (EOS included). Shape: ``(B, R)``.

    Returns:
        The per-response KL estimate. Shape: ``(B,)``.
    """
    logprobs, _ = response_logprobs(policy, input_ids, attention_mask, prompt_length)
    ref_logprobs, _ = response_logprobs(reference, input_ids, attention_mask, prompt_length)
    return ((logprobs.float() - ref_logprobs.float()) * response_mask).sum(-1)
