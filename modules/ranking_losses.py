"""Ranking losses over k >= 2 scored responses per prompt: RRHF's pairwise hinge and PRO's listwise Plackett-Luce
objective, each with its SFT term on the best response, plus the pairwise ranking accuracy they are judged by.

Inputs are shaped ``(b, k)``: summed completion log-probs, completion token counts, scores and a mask of real
(non-padding) response slots. Responses need not be sorted: both losses read the order from the scores.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from recipes.modules.validation import at_least

SFTReduction = Literal["sum", "mean"]


def _valid(scores: Tensor, valid: Tensor | None) -> Tensor:
    return torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()


def better_pairs(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """``[b, i, j]`` is True where response ``i`` strictly outscores response ``j`` (both real). Shape: (b, k, k)."""
    valid = _valid(scores, valid)
    return (scores[:, :, None] > scores[:, None, :]) & valid[:, :, None] & valid[:, None, :]


def best_response_sft(logps: Tensor, lengths: Tensor, scores: Tensor, valid: Tensor | None,
                      reduction: SFTReduction) -> Tensor:
    """Negative log-likelihood of each row's highest-scored response (the first one on a tie). Shape: (b,)."""
    masked = scores.masked_fill(~_valid(scores, valid), float("-inf"))
    best = masked.argmax(-1, keepdim=True)  # torch.argmax returns the first maximal index
    nll = -logps.gather(-1, best).squeeze(-1)
    return nll / lengths.gather(-1, best).squeeze(-1).clamp(min=1) if reduction == "mean" else nll


def ranking_accuracy(logps: Tensor, lengths: Tensor, scores: Tensor,
                     valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Pairs whose length-normalized log-probs agree with the score order.

    Args:
        logps: summed completion log-probs. Shape: (b, k)
        lengths: completion token counts. Shape: (b, k)
        scores: the responses' scores. Shape: (b, k)
        valid: 1 on real responses, 0 on padding slots; None means all real. Shape: (b, k)

    Returns:
        correct: detached count of pairs with ``s_i > s_j`` and ``p_i > p_j`` (strictly). Shape: (b,)
        pairs: count of pairs with ``s_i > s_j``; ``correct.sum() / pairs.sum()`` is the accuracy. Shape: (b,)
    """
    p = (logps / lengths.clamp(min=1)).detach()
    better = better_pairs(scores, valid)
    agree = p[:, :, None] > p[:, None, :]
    return (better & agree).sum((1, 2)).float(), better.sum((1, 2)).float()


class RRHFLoss(nn.Module):
    """RRHF: Rank Responses to align language models with Human Feedback.

    Yuan et al., arXiv 2304.05302, Eq. 1-4: ``p_i = log pi(y_i | x) / |y_i|`` (Eq. 1),
    ``L_rank = sum_{r_i < r_j} max(0, p_i - p_j)`` (Eq. 2), ``L_ft = -sum_t log pi(y_{i'},t | x, y_{i',<t})`` with
    ``i' = argmax_i r_i`` (Eq. 3), ``L = rank_weight * L_rank + sft_weight * L_ft`` (Eq. 4 has both weights 1; the
    authors' code scales ``L_rank`` by ``rrhf_weight``, 1 in their HH script).

    The SFT term is Eq. 3's token sum by default; ``sft_reduction: mean`` divides it by the response length (the
    authors' code takes a mean over the padded sequence, closer to this). Pairs with equal scores contribute nothing.

    Args:
        rank_weight: weight of the ranking hinge.
        sft_weight: weight of the cross-entropy on the best response; 0 gives the ranking loss alone.
        sft_reduction: ``sum`` (Eq. 3) or ``mean`` over the best response's tokens.
    """

    def __init__(self, rank_weight: float = 1.0, sft_weight: float = 1.0, sft_reduction: SFTReduction = "sum") -> None:
        super().__init__()
        for name, weight in (("rank_weight", rank_weight), ("sft_weight", sft_weight)):
            at_least("RRHFLoss", name, weight, 0.0, "A negative weight ascends its term; 0 turns the term off")
        self.rank_weight, self.sft_weight, self.sft_reduction = rank_weight, sft_weight, sft_reduction

    def forward(self, logps: Tensor, lengths: Tensor, scores: Tensor,
                valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Compute the per-prompt RRHF loss.

        Args:
            logps: summed completion log-probs ``log pi(y_i | x)`` under the policy. Shape: (b, k)
            lengths: completion token counts ``|y_i|``. Shape: (b, k)
            scores: rewards ``r_i`` (higher is better). Shape: (b, k)
            valid: 1 on real responses, 0 on padding slots; None means all real. Shape: (b, k)

        Returns:
            losses: ``rank_weight * L_rank + sft_weight * L_ft`` per prompt. Shape: (b,)
            rank_losses: detached ``L_rank``. Shape: (b,)
            sft_losses: detached ``L_ft``. Shape: (b,)
        """
        p = logps / lengths.clamp(min=1)  # (B, K)  Eq. 1
        better = better_pairs(scores, valid)  # [b, j, i]: r_j > r_i
        worse_minus_better = p[:, None, :] - p[:, :, None]  # [b, j, i] = p_i - p_j
        rank = (torch.relu(worse_minus_better) * better).sum((1, 2))  # (B,)  Eq. 2
        sft = best_response_sft(logps, lengths, scores, valid, self.sft_reduction)  # (B,)  Eq. 3
        losses = self.rank_weight * rank + self.sft_weight * sft
        return losses, rank.detach(), sft.detach()


class PROLoss(nn.Module):
    """PRO: Preference Ranking Optimization, the listwise Plackett-Luce objective on length-normalized log-probs.

    Song et al., arXiv 2306.17492 (AAAI 2024), Sec. "From RLHF to PRO" and "Grafting RLHF onto PRO":
    ``L_PRO = -sum_{k=1}^{n-1} log( exp(p_k / T^k_k) / sum_{i=k}^{n} exp(p_i / T^k_i) )`` over responses sorted
    by score, ``p_i = log pi(y_i | x) / |y_i|``; without ``reward_temperature`` every ``T = 1``; with it
    ``T^k_i = 1 / (r_k - r_i)`` and ``T^k_k = min_{i > k} T^k_i``; total ``L = L_PRO + beta * L_SFT``.

    Ties: the candidates beneath ``y^k`` are those scored strictly lower, so tied responses are never contrasted
    with each other and a position with nothing strictly below it adds no term (without ties this is exactly the
    sum over ``k = 1..n-1``). At ``k = 2`` the loss is ``-log sigmoid(p_1 - p_2)``: reference-free Bradley-Terry
    on normalized log-probs. ``L_SFT`` is the summed NLL of the best response, as in the authors' code, which
    scales ``beta`` by ``(n - 1)^2`` (0.05 on HH-RLHF); here ``beta`` is used as given.

    Args:
        beta: weight of the SFT term on the best response.
        reward_temperature: scale each contrast by the score differences (the paper's temperatures); scores must
            then be on a meaningful scale (reward-model outputs).
        sft_reduction: ``sum`` or ``mean`` over the best response's tokens.
    """

    def __init__(self, beta: float = 0.05, reward_temperature: bool = False,
                 sft_reduction: SFTReduction = "sum") -> None:
        super().__init__()
        at_least("PROLoss", "beta", beta, 0.0, "beta weighs the SFT term: 0 turns it off, a negative one unlearns the "
                 "best response")
        self.beta, self.reward_temperature, self.sft_reduction = beta, reward_temperature, sft_reduction

    def forward(self, logps: Tensor, lengths: Tensor, scores: Tensor,
                valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Compute the per-prompt PRO loss.

        Args:
            logps: summed completion log-probs under the policy. Shape: (b, k)
            lengths: completion token counts. Shape: (b, k)
            scores: rewards (higher is better); any order. Shape: (b, k)
            valid: 1 on real responses, 0 on padding slots; None means all real. Shape: (b, k)

        Returns:
            losses: ``L_PRO + beta * L_SFT`` per prompt. Shape: (b,)
            rank_losses: detached ``L_PRO``. Shape: (b,)
            sft_losses: detached ``L_SFT``. Shape: (b,)
        """
        p = logps / lengths.clamp(min=1)  # (B, K)
        below = better_pairs(scores, valid)  # [b, k, i]: y_i is scored strictly below y_k
        if self.reward_temperature:
            neg_scale = (scores[:, :, None] - scores[:, None, :]) * below  # 1 / T^k_i
            pos_scale = neg_scale.amax(-1)  # 1 / T^k_k = max_i 1 / T^k_i
        else:
            neg_scale, pos_scale = below.to(p.dtype), torch.ones_like(p)
        pos = p * pos_scale  # (B, K)
        neg = (p[:, None, :] * neg_scale).masked_fill(~below, float("-inf"))  # (B, K, K)
        log_denominator = torch.logsumexp(torch.cat([pos[..., None], neg], dim=-1), dim=-1)  # (B, K)
        terms = torch.where(below.any(-1), log_denominator - pos, torch.zeros_like(pos))
        rank = terms.sum(-1)  # (B,)
        sft = best_response_sft(logps, lengths, scores, valid, self.sft_reduction)
        return rank + self.beta * sft, rank.detach(), sft.detach()
