"""Policy-gradient losses: PPO's clipped policy and value losses (with a critic) and GRPO's critic-free clipped
surrogate with its KL term (GRPO, RLOO, DAPO and Dr. GRPO differ only in their advantages, KL placement and reduction).

Each is a small ``nn.Module`` holding only hyperparameters, chosen by ``class_path`` in YAML. PPO's losses return the
token mean of a minibatch; `GRPOLoss` returns per-token losses, which `recipes.modules.grpo.GRPOModule` reduces by its
``loss_aggregation`` (`recipes.modules.rl_utils.aggregation_weights`). `recipes.modules.losses` re-exports the PPO
losses under their old class paths.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from recipes.modules.rl_utils import masked_mean
from recipes.modules.validation import at_least, positive


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, Schulman et al., arXiv 1707.06347, Eq. 7, as a loss:
    ``max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))``, ``ratio = exp(logprobs - old_logprobs)``.

    Args:
        logprobs: log-probs of the sampled tokens under the current policy. Shape: (b, t)
        old_logprobs: the same under the sampling policy (no grad). Shape: (b, t)
        advantages: per-token advantages, or ``(b, 1)`` to broadcast one per row (no grad). Shape: (b, t)
        clip_low, clip_high: the ratio's clip range below and above 1.

    Returns:
        per_token: the loss at each token (not masked). Shape: (b, t)
        ratio, log_ratio: the probability ratio and its log. Shape: (b, t)
        was_clipped: True where the clipped term is the larger loss (the clip removed the gradient). Shape: (b, t)
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), ratio, log_ratio, clipped > unclipped


class PPOPolicyLoss(nn.Module):
    """PPO clipped surrogate policy loss.

    Schulman et al., arXiv 1707.06347, Eq. 7:
    ``loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``, ``ratio = exp(logprobs - old_logprobs)``.

    Reduction: the masked mean over every response token of the minibatch (each token weighs the same, as in TRL
    and OpenRLHF), so the result is a scalar rather than per-example losses.

    Args:
        clip_eps: the clip range ``eps`` of the probability ratio.
    """

    def __init__(self, clip_eps: float = 0.2) -> None:
        super().__init__()
        positive("PPOPolicyLoss", "clip_eps", clip_eps, "A clip range of 0 freezes the policy; PPO uses 0.2")
        self.clip_eps = clip_eps

    def forward(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute the clipped surrogate loss of a minibatch.

        Args:
            logprobs: per-token log-probs of the sampled tokens under the current policy. Shape: (b, t)
            old_logprobs: the same under the policy that sampled the rollout (no grad). Shape: (b, t)
            advantages: per-token advantages (no grad). Shape: (b, t)
            mask: 1 on response tokens, 0 on padding. Shape: (b, t)

        Returns:
            loss: masked mean of the per-token clipped loss; a scalar.
            approx_kl: detached k3 estimate of KL(old || new), ``(ratio - 1) - log ratio`` (Schulman, "Approximating
                KL Divergence", 2020), masked mean; a scalar.
            clipfrac: detached fraction of tokens whose clipped term is the larger loss, i.e. whose gradient the
                clip removed; a scalar.
        """
        per_token, ratio, log_ratio, was_clipped = clipped_surrogate(logprobs, old_logprobs, advantages, self.clip_eps,
                                                                     self.clip_eps)
        loss = masked_mean(per_token, mask)
        with torch.no_grad():
            approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
            clipfrac = masked_mean(was_clipped.float(), mask)
        return loss, approx_kl, clipfrac


class PPOValueLoss(nn.Module):
    """PPO value loss, optionally clipped around the rollout's values.

    Value clipping as in OpenAI baselines' ``ppo2`` and Engstrom et al., arXiv 2005.12729, Sec. 3 (optimization 1):
    ``loss = 0.5 * max((V - R)^2, (old_V + clip(V - old_V, -eps, eps) - R)^2)``; with ``clip_eps=None`` it is
    ``0.5 * (V - R)^2``. Reduced by the masked mean over all response tokens, like ``PPOPolicyLoss``.

    Args:
        clip_eps: how far the new values may move from the rollout's values before the gradient stops; None
            turns clipping off.
    """

    def __init__(self, clip_eps: float | None = 0.2) -> None:
        super().__init__()
        positive("PPOValueLoss", "clip_eps", clip_eps, "A clip range of 0 freezes the critic; use 0.2, or null to "
                 "turn value clipping off")
        self.clip_eps = clip_eps

    def forward(
        self,
        values: torch.Tensor,
        old_values: torch.Tensor,
        returns: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the (clipped) value loss of a minibatch.

        Args:
            values: per-token value predictions of the current value head. Shape: (b, t)
            old_values: the values recorded at rollout time (no grad). Shape: (b, t)
            returns: per-token regression targets, ``advantages + old_values``. Shape: (b, t)
            mask: 1 on response tokens, 0 on padding. Shape: (b, t)

        Returns:
            loss: masked mean of the per-token value loss; a scalar.
            clipfrac: detached fraction of tokens where the clipped error is the larger one (0 when unclipped).
        """
        unclipped = (values - returns) ** 2  # (B, T)
        if self.clip_eps is None:
            return 0.5 * masked_mean(unclipped, mask), torch.zeros((), device=values.device)
        values_clipped = old_values + torch.clamp(values - old_values, -self.clip_eps, self.clip_eps)
        clipped = (values_clipped - returns) ** 2
        loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
        clipfrac = masked_mean((clipped > unclipped).float(), mask).detach()
        return loss, clipfrac


class GRPOTokenLosses(NamedTuple):
    """Per-token outputs of `GRPOLoss`, each ``(b, t)``; all but ``loss`` detached.

    Fields:
        loss: ``-min(ratio * A, clip(ratio) * A) + kl_coef * kl`` (0 on padding).
        approx_kl: ``(ratio - 1) - log ratio``, the k3 estimate of KL(old || new) (what ``target_kl`` compares).
        clipped: 1 where the clip removed the token's gradient.
        kl: the k3 estimate of KL(new || reference) at the token (0 without a reference).
    """

    loss: torch.Tensor
    approx_kl: torch.Tensor
    clipped: torch.Tensor
    kl: torch.Tensor


class GRPOLoss(nn.Module):
    """GRPO's clipped surrogate with the KL to the reference inside the loss, per token.

    Shao et al., arXiv 2402.03300, Eq. 3 and 4: ``loss_t = -min(ratio_t A, clip(ratio_t, 1 - eps, 1 + eps) A)
    + kl_coef * KL_t`` with ``ratio_t = exp(logprobs_t - old_logprobs_t)`` and the k3 estimator
    ``KL_t = exp(ref_t - logprobs_t) - (ref_t - logprobs_t) - 1`` (unbiased, >= 0). ``clip_eps_high`` is DAPO's
    "clip-higher" (Yu et al., arXiv 2503.14476, Eq. 10): the upper bound ``1 + clip_eps_high`` instead of
    ``1 + clip_eps``. With ``kl_coef = 0`` and one update per rollout (ratio 1) the gradient is REINFORCE's,
    ``-A * grad log pi``, which is what RLOO (Ahmadian et al., arXiv 2402.14740) applies with its own advantages.

    Args:
        clip_eps: the lower clip range ``eps`` (GRPO and PPO use 0.2).
        clip_eps_high: the upper clip range; None: ``clip_eps`` (symmetric).
        kl_coef: the coefficient ``beta`` of the KL term (GRPO: 0.04); 0 reads no reference.
    """

    def __init__(self, clip_eps: float = 0.2, clip_eps_high: float | None = None, kl_coef: float = 0.04) -> None:
        super().__init__()
        positive("GRPOLoss", "clip_eps", clip_eps, "A clip range of 0 freezes the policy; GRPO uses 0.2")
        positive("GRPOLoss", "clip_eps_high", clip_eps_high, "Use null for a symmetric clip; DAPO uses 0.28")
        at_least("GRPOLoss", "kl_coef", kl_coef, 0.0, "0 turns the KL term off; GRPO uses 0.04")
        self.clip_eps, self.clip_eps_high, self.kl_coef = clip_eps, clip_eps_high, kl_coef

    def forward(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        ref_logprobs: torch.Tensor | None = None,
    ) -> GRPOTokenLosses:
        """Per-token losses and metrics of a (micro-)batch.

        Args:
            logprobs: log-probs of the sampled tokens under the current policy. Shape: (b, t)
            old_logprobs: the same under the policy that sampled them (no grad). Shape: (b, t)
            advantages: one advantage per response, or per token (no grad). Shape: (b,) or (b, t)
            mask: 1 on response tokens, 0 on padding. Shape: (b, t)
            ref_logprobs: the same under the reference (no grad); needed when ``kl_coef > 0``. Shape: (b, t)

        Returns:
            A `GRPOTokenLosses` of ``(b, t)`` tensors, 0 on padding.
        """
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)  # (B, 1): the response's advantage at each of its tokens
        high = self.clip_eps if self.clip_eps_high is None else self.clip_eps_high
        loss, ratio, log_ratio, was_clipped = clipped_surrogate(logprobs, old_logprobs, advantages, self.clip_eps, high)
        kl = torch.zeros_like(logprobs)
        if self.kl_coef > 0:
            if ref_logprobs is None:
                raise ValueError("GRPOLoss: kl_coef > 0 needs ref_logprobs (the module builds no reference at 0).")
            log_r = ref_logprobs - logprobs
            kl = torch.expm1(log_r) - log_r  # (B, T), >= 0
            loss = loss + self.kl_coef * kl
        m = mask.to(loss.dtype)
        with torch.no_grad():
            approx_kl, clipfrac = ((ratio - 1.0) - log_ratio) * m, was_clipped.to(m.dtype) * m
        return GRPOTokenLosses(loss * m, approx_kl, clipfrac, kl.detach() * m)
