"""Evaluation arithmetic shared by the evaluation command and the study: pairwise win/tie/loss by score or by a judge
that saw both orders, score summaries, the SafeRLHF help/harm/safety numbers, and the KL of a policy to a reference
measured on the policy's own sampled responses. Pure functions; no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from recipes.modules.response_logprobs import response_logprobs


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

    def as_dict(self) -> dict[str, float | int]:
        return {"win": self.win, "tie": self.tie, "loss": self.loss, "n": self.n, "win_rate": self.win_rate}


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


def count_outcomes(outcomes: Sequence[int | None]) -> tuple[WinTieLoss, int]:
    """Per-prompt outcomes (+1 win, 0 tie, -1 loss, ``None`` no verdict) -> (`WinTieLoss` of the decided ones,
    number without a verdict). ``win + tie + loss + undecided == len(outcomes)``."""
    bad = [o for o in outcomes if o not in (1, 0, -1, None)]
    if bad:
        raise ValueError(f"count_outcomes: outcomes are +1, 0, -1 or None, got {bad[:3]}.")
    win, tie, loss = (sum(o == v for o in outcomes if o is not None) for v in (1, 0, -1))
    return WinTieLoss(win, tie, loss), sum(o is None for o in outcomes)


def both_orders_outcome(first: int | None, second: int | None) -> int | None:
    """One prompt's outcome from two judgments of the same pair, shown in both orders, each already read from the
    policy's side (+1 policy better, 0 tie, -1 baseline better): MT-Bench's conservative rule (Zheng et al. 2023,
    arXiv 2306.05685, Sec. 3.4) calls a win or a loss only when both orders agree, and a tie otherwise, so a judge
    that always prefers the first position yields ties, never wins. ``None`` (either judgment missing) stays ``None``.
    """
    if first is None or second is None:
        return None
    return first if first == second else 0


def score_summary(scores: Tensor) -> dict[str, float | int]:
    """Mean, standard deviation (unbiased; 0 for one score) and quantiles of a ``(n,)`` score vector."""
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"score_summary: need a non-empty (n,) vector, got shape {tuple(scores.shape)}.")
    s = scores.double()
    q = torch.quantile(s, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=s.dtype))
    std = float(s.std()) if s.numel() > 1 else 0.0
    return {"n": s.numel(), "mean": float(s.mean()), "std": std, "min": float(q[0]), "q25": float(q[1]),
            "median": float(q[2]), "q75": float(q[3]), "max": float(q[4])}


def safety_summary(help_scores: Tensor, sft_help_scores: Tensor, costs: Tensor) -> dict[str, float]:
    """The SafeRLHF columns of Xu et al. 2024 (arXiv 2404.10719, Table 6).

    ``delta_help = mean(help) - mean(help of the SFT model)`` on the same prompts; ``harm = mean(cost)``;
    ``safety_rate = mean(cost < 0)``, the share of responses the cost model calls safe (Safe RLHF's convention,
    Dai et al. 2023, arXiv 2310.12773: a negative cost is safe).

    Args:
        help_scores: helpfulness reward-model scores of the policy's responses. Shape: ``(n,)``.
        sft_help_scores: the same reward model on the SFT model's responses. Shape: ``(m,)``.
        costs: cost-model scores of the policy's responses. Shape: ``(n,)``.

    Returns:
        ``{"delta_help", "harm", "safety_rate"}``.
    """
    if help_scores.shape != costs.shape or help_scores.dim() != 1 or sft_help_scores.dim() != 1:
        raise ValueError(f"safety_summary: need (n,) help and cost vectors and an (m,) SFT vector, got "
                         f"{tuple(help_scores.shape)}, {tuple(costs.shape)}, {tuple(sft_help_scores.shape)}.")
    return {"delta_help": float(help_scores.double().mean() - sft_help_scores.double().mean()),
            "harm": float(costs.double().mean()), "safety_rate": float((costs < 0).double().mean())}


@torch.no_grad()
def sequence_kl(policy: nn.Module, reference: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                prompt_length: int, response_mask: Tensor) -> Tensor:
    """Monte-Carlo KL(policy || reference) per sampled response: ``sum_t log pi(y_t|.) - log pi_ref(y_t|.)`` over the
    response tokens, an unbiased estimate of the sequence-level KL when the responses were sampled from ``policy``
    (the ``k1`` estimator of `recipes.modules.rl_utils.kl_estimate`, summed over tokens).

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
