"""RL math shared by PPO: masked statistics, whitening, GAE, KL estimators, per-token rewards, running moments.

Free functions on ``(B, T)`` tensors whose ``mask`` is 1 on response tokens and 0 on right padding.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

KLEstimator = Literal["k1", "k3"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1.

    ``sum(x * mask) / sum(mask)``; a float mask acts as weights. An all-zero mask gives nan (0 / 0): there is
    nothing to average, and a silent 0 would hide that.

    Args:
        x: values. Shape: (b, t)
        mask: 1 where an entry counts, 0 on padding. Shape: (b, t)
        dim: reduce over this dimension only; None reduces over all entries to a scalar.

    Returns:
        The masked mean: a scalar, or ``x`` with ``dim`` removed.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all entries where ``mask`` is 1.

    ``mean((x - mean(x))^2)``, times ``n / (n - 1)`` when ``unbiased`` (Bessel's correction, as ``torch.var``).

    Args:
        x: values. Shape: (b, t)
        mask: 1 where an entry counts, 0 on padding. Shape: (b, t)
        unbiased: apply Bessel's correction; needs at least 2 unmasked entries.

    Returns:
        The variance, a scalar.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"masked_var: unbiased variance needs >= 2 unmasked entries, the mask has {int(n)}.")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``x`` to zero mean and unit (unbiased) variance over all masked entries of the given batch.

    ``(x - mean) / sqrt(var + eps)``, adding the mean back when ``shift_mean`` is False. The statistics run over
    whatever batch the caller passes: PPO passes the whole rollout batch, so advantage normalization is per rollout,
    not per minibatch. Padded entries are returned as 0 so they cannot leak into a later sum.

    Args:
        x: values, e.g. advantages. Shape: (b, t)
        mask: 1 where an entry counts, 0 on padding. Shape: (b, t)
        shift_mean: remove the mean (TRL's default); False keeps it and only rescales (torchtune's default).
        eps: added to the variance for numerical safety.

    Returns:
        The whitened values, 0 on padding. Shape: (b, t)
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over right-padded responses.

    Schulman et al., arXiv 1506.02438, Eq. 16: ``A_t = sum_l (gamma lam)^l delta_{t+l}``,
    ``delta_t = r_t + gamma V_{t+1} - V_t``, with ``V = 0`` past the last real token (the episode ends there).
    Padded positions contribute nothing and get advantage 0.

    Args:
        rewards: per-token rewards. Shape: (b, t)
        values: per-token value estimates. Shape: (b, t)
        mask: 1 on response tokens, 0 on right padding (each row a prefix of ones). Shape: (b, t)
        gamma: discount factor.
        lam: GAE's bias-variance trade-off ``lambda``.

    Returns:
        advantages: ``A_t``, 0 on padding. Shape: (b, t)
        returns: ``A_t + V_t``, the value targets, 0 on padding. Shape: (b, t)
    """
    if (mask[:, 1:] > mask[:, :-1]).any():
        raise ValueError("gae_advantages: mask must be right-padded (each row 1...1 0...0); got a 0 before a 1.")
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    last_gae = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_values = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_values - values[:, t]  # (B,); 0 on padding since all terms are 0
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, advantages + values


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    Schulman, "Approximating KL Divergence" (2020): ``k1 = log pi - log pi_ref``;
    ``k3 = (r - 1) - log r`` with ``r = pi_ref / pi`` (unbiased and always >= 0).

    Args:
        logprobs: log-probs of the sampled tokens under the policy. Shape: (b, t)
        ref_logprobs: log-probs of the same tokens under the reference. Shape: (b, t)
        estimator: "k1" or "k3".

    Returns:
        The per-token estimate. Shape: (b, t)
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_r = ref_logprobs - logprobs
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl_estimate: estimator must be 'k1' or 'k3', got {estimator!r}.")


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> torch.Tensor:
    """Per-token PPO rewards: a KL penalty on every response token plus the score on the last real token.

    ``r_t = -kl_coef * KL_t + [t = last] * score`` (Ziegler et al., arXiv 1909.08593; per-token KL with coefficient
    0.1 in Xu et al., arXiv 2404.10719).

    Args:
        scores: one scalar score per response, e.g. from ``terminal_scores``. Shape: (b,)
        logprobs: per-token log-probs under the rollout policy. Shape: (b, t)
        ref_logprobs: per-token log-probs under the reference. Shape: (b, t)
        mask: 1 on response tokens, 0 on right padding. Shape: (b, t)
        kl_coef: the KL coefficient ``beta``.
        estimator: the per-token KL estimator, see ``kl_estimate``.

    Returns:
        Per-token rewards, 0 on padding. Shape: (b, t)
    """
    lengths = mask.sum(dim=1).long()  # (B,)
    if (lengths == 0).any():
        raise ValueError(f"kl_penalized_rewards: rows {torch.nonzero(lengths == 0).flatten().tolist()} are empty.")
    rewards = -kl_coef * kl_estimate(logprobs, ref_logprobs, estimator) * mask.to(logprobs.dtype)
    last = (lengths - 1).unsqueeze(1)  # (B, 1): index of the last real token
    return rewards.scatter_add(1, last, scores.to(rewards.dtype).unsqueeze(1))


def terminal_scores(
    scores: torch.Tensor,
    ended_with_eos: torch.Tensor,
    missing_eos_penalty: float | None = None,
    clip: float | None = None,
) -> torch.Tensor:
    """Scores to place on the last token: clipped, and replaced by a penalty where a response was truncated.

    Clipping to ``[-clip, clip]`` comes first (Xu et al., arXiv 2404.10719, clip the reward at 20); then responses
    that did not end with EOS get ``missing_eos_penalty`` instead of their score. The penalty is used as given,
    not clipped, so the value the user configures is the value the policy sees.

    Args:
        scores: reward-model or programmatic scores. Shape: (b,)
        ended_with_eos: True where the response stopped with the EOS token. Shape: (b,)
        missing_eos_penalty: the score of a truncated response; None keeps its own (clipped) score.
        clip: the clip bound; None does not clip.

    Returns:
        The terminal scores. Shape: (b,)
    """
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    if missing_eos_penalty is not None:
        scores = torch.where(ended_with_eos.bool(), scores, torch.full_like(scores, missing_eos_penalty))
    return scores


class RunningMoments:
    """Running mean and standard deviation of a stream of scalars, merged batch by batch.

    Chan et al. (1979) parallel update: with ``delta = mean_b - mean``,
    ``mean += delta * n_b / n``, ``M2 += M2_b + delta^2 * n_a * n_b / n``; ``std = sqrt(M2 / (n - 1))`` (unbiased,
    as ``torch.std``). Kept in Python floats (float64) so long runs do not drift; checkpoints through
    ``state_dict`` / ``load_state_dict``.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.m2 = 0.0
        self.count = 0

    @property
    def var(self) -> float:
        """Unbiased variance of everything seen so far (nan before two values)."""
        return self.m2 / (self.count - 1) if self.count > 1 else math.nan

    @property
    def std(self) -> float:
        """Unbiased standard deviation of everything seen so far (nan before two values)."""
        return math.sqrt(self.var)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge a batch of values (any shape; every element counts) into the running moments."""
        x = x.detach().double().flatten()
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = x.mean().item()
        m2_b = ((x - mean_b) ** 2).sum().item()
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * self.count * n_b / n
        self.count = n

    def state_dict(self) -> dict[str, float | int]:
        """The running statistics, for a checkpoint."""
        return {"mean": self.mean, "m2": self.m2, "count": self.count}

    def load_state_dict(self, state_dict: dict[str, float | int]) -> None:
        """Restore the running statistics written by ``state_dict``."""
        self.mean = float(state_dict["mean"])
        self.m2 = float(state_dict["m2"])
        self.count = int(state_dict["count"])


LossAggregation = Literal["sequence_mean", "token_mean", "constant"]


def aggregation_weights(
    mask: torch.Tensor,
    aggregation: LossAggregation,
    max_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights and unit count that reduce per-token losses to a batch loss, ``sum(w * loss) / units``.

    Split this way so that micro-batches and data-parallel ranks add up exactly: each part contributes its
    ``sum(w * loss)``, divided by the ``units`` of the whole (all-reduced) batch.

    - ``sequence_mean``: each response's token mean, then the mean over responses (GRPO, Shao et al.,
      arXiv 2402.03300, Eq. 3): ``w = mask / |o_i|``, units = responses.
    - ``token_mean``: every token of the batch weighs the same (DAPO, Yu et al., arXiv 2503.14476, Eq. 8):
      ``w = mask``, units = tokens.
    - ``constant``: token sums over a constant ``max_tokens`` per response (Dr. GRPO, Liu et al., arXiv 2503.20783,
      Sec. 3.1: no length bias): ``w = mask / max_tokens``, units = responses.

    Args:
        mask: 1 on response tokens, 0 on right padding. Shape: (b, t)
        aggregation: one of the three above.
        max_tokens: the constant of ``constant`` (the rollout's ``max_new_tokens``).

    Returns:
        weights: ``(b, t)``, 0 on padding.
        units: a scalar tensor, this batch's responses or tokens.
    """
    m = mask.float()
    lengths = m.sum(1, keepdim=True)  # (B, 1)
    if aggregation == "sequence_mean":
        return m / lengths.clamp(min=1), torch.tensor(float(m.shape[0]), device=m.device)
    if aggregation == "token_mean":
        return m, m.sum()
    if aggregation == "constant":
        return m / max_tokens, torch.tensor(float(m.shape[0]), device=m.device)
    raise ValueError(f"aggregation_weights: aggregation must be 'sequence_mean', 'token_mean' or 'constant', got "
                     f"{aggregation!r}.")
