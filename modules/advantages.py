"""Critic-free advantage estimators over groups of responses to one prompt, chosen by ``class_path`` in YAML
(`recipes.modules.grpo.GRPOModule`). Each maps one scalar reward per response to one advantage per response.

Rows come in groups of ``group_size`` adjacent rows that answer the same prompt
(`recipes.modules.rollout.repeat_prompts`), so every statistic is a group's own and data parallelism needs no
collective: a group never spans two ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from recipes.modules.validation import positive


class AdvantageEstimator(ABC):
    """``advantages = estimator(rewards, group_size)``; ``min_group_size`` is the smallest group it is defined on."""

    min_group_size = 1

    def check_group_size(self, group_size: int) -> None:
        """Refuse a ``samples_per_prompt`` below ``min_group_size``, naming the fix."""
        if group_size < self.min_group_size:
            raise ValueError(f"{type(self).__name__} needs samples_per_prompt >= {self.min_group_size} (a baseline "
                             f"from the other responses to the same prompt), got {group_size}. Sample several "
                             "responses per prompt (GRPO: 8 to 64; RLOO: 2 to 4).")

    def groups(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        """``rewards`` as ``(prompts, group_size)``, each row one prompt's responses. Shape: (b,) -> (b / k, k)"""
        self.check_group_size(group_size)
        if rewards.dim() != 1 or rewards.numel() % group_size:
            raise ValueError(f"{type(self).__name__}: {tuple(rewards.shape)} rewards do not form groups of "
                             f"{group_size} adjacent rows.")
        return rewards.view(-1, group_size)

    @abstractmethod
    def __call__(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        """One advantage per response. Shape: (b,) -> (b,)"""


class GroupNormalizedAdvantage(AdvantageEstimator):
    """GRPO's outcome-supervision advantage: each reward standardized within its group.

    Shao et al., arXiv 2402.03300, Sec. 4.1.2: ``A_i = (r_i - mean(r)) / std(r)`` over the ``G`` responses to one
    prompt (``std`` unbiased, as ``torch.std``, plus ``eps``). ``scale_by_std=False`` keeps only the centering, as
    Dr. GRPO recommends (Liu et al., arXiv 2503.20783, Sec. 3.1: the std division up-weights prompts whose responses
    all score alike). A group whose rewards are all equal gets advantage 0 either way.

    Args:
        scale_by_std: divide by the group's standard deviation (GRPO) or not (Dr. GRPO).
        eps: added to the standard deviation (TRL and the DeepSeekMath code use 1e-4).
    """

    min_group_size = 2

    def __init__(self, scale_by_std: bool = True, eps: float = 1e-4) -> None:
        positive("GroupNormalizedAdvantage", "eps", eps, "eps keeps an all-equal group finite; use 1e-4")
        self.scale_by_std, self.eps = scale_by_std, eps

    def __call__(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        """Args: rewards ``(b,)``, ``b`` a multiple of ``group_size``. Returns: advantages ``(b,)``."""
        groups = self.groups(rewards.float(), group_size)  # (B / k, k)
        centered = groups - groups.mean(1, keepdim=True)
        if self.scale_by_std:
            centered = centered / (groups.std(1, keepdim=True) + self.eps)
        return centered.flatten()


class LeaveOneOutAdvantage(AdvantageEstimator):
    """RLOO: each reward minus the mean reward of the other responses to the same prompt.

    Kool et al., "Buy 4 REINFORCE samples, get a baseline for free!" (ICLR 2019 workshop), used for RLHF by Ahmadian
    et al., arXiv 2402.14740, Sec. 3.2: ``A_i = r_i - 1/(k-1) sum_{j != i} r_j = k/(k-1) (r_i - mean(r))``, an
    unbiased baseline since it does not depend on ``y_i``.
    """

    min_group_size = 2

    def __call__(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        """Args: rewards ``(b,)``, ``b`` a multiple of ``group_size``. Returns: advantages ``(b,)``."""
        groups = self.groups(rewards.float(), group_size)  # (B / k, k)
        others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
        return (groups - others).flatten()
