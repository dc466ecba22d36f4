"""The programmatic reward protocol: texts in, one score per response out.

PPO (step 3 of a rollout), DPO-Iter (pair labelling) and the study's gold reward all call rewards through this
protocol; a reward model wrapped by `modules.reward` satisfies it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class RewardFunction(Protocol):
    """Scores responses to prompts.

    Args:
        prompts: the prompt texts, one per response.
        responses: the generated texts (prompt excluded, stop token stripped).
        metadata: optional per-row records from the prompt dataset (unit tests of a code problem, a target value),
            aligned with ``prompts``; ``None`` when the prompt set carries none.

    Returns:
        A float tensor of shape ``(B,)`` on the CPU.
    """

    def __call__(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> torch.Tensor: ...
