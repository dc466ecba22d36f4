"""Rewards built from other rewards: a weighted sum (reward model + unit tests + a length penalty) and Safe RLHF's
constrained combination ``reward - lambda * cost`` with a learned multiplier. Each is a
`recipes.modules.reward_functions.RewardFunction`; its parts' batch means are in ``last_metrics`` (logged by the
on-policy modules as ``reward/<name>``), and a multiplier goes into the module's checkpoint
(``checkpoint_state`` / ``load_checkpoint_state``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from recipes.modules.distributed import all_reduce_sum
from recipes.modules.validation import at_least, positive


class LengthPenalty:
    """``-coef * max(0, len(response) - free_chars)`` in characters: 0 up to ``free_chars``, then linear.

    Args:
        coef: the penalty per character past ``free_chars``.
        free_chars: the length that costs nothing.
    """

    def __init__(self, coef: float = 0.01, free_chars: int = 0) -> None:
        positive("LengthPenalty", "coef", coef, "a penalty per character, e.g. 0.01")
        at_least("LengthPenalty", "free_chars", free_chars, 0, "0 penalizes every character")
        self.coef, self.free_chars = float(coef), int(free_chars)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> torch.Tensor:
        """Score each response by its length past ``free_chars``."""
        return torch.tensor([-self.coef * max(0, len(r) - self.free_chars) for r in responses])


class _Parts:
    """Calls named rewards on one batch, moves and shards them with the module, records their means."""

    def __init__(self, parts: Mapping[str, Callable[..., Any]]) -> None:
        if not parts:
            raise ValueError(f"{type(self).__name__}: no reward parts; give at least one name: reward function.")
        self.parts = dict(parts)
        self.last_metrics: dict[str, float] = {}

    def score_parts(self, prompts, responses, metadata) -> dict[str, torch.Tensor]:
        scores = {name: part(prompts, responses, metadata).float().cpu() for name, part in self.parts.items()}
        for name, value in scores.items():
            if value.shape != (len(responses),):
                raise ValueError(f"{type(self).__name__}: part {name!r} returned shape {tuple(value.shape)} for "
                                 f"{len(responses)} responses; a reward returns one score per response.")
        self.last_metrics = {name: float(value.mean()) for name, value in scores.items()}
        return scores

    def to(self, device: torch.device | str) -> None:
        """Move every part that has a device (a reward model)."""
        for part in self.parts.values():
            getattr(part, "to", lambda device: None)(device)

    def shard(self, mesh: Any) -> None:
        """Shard every part that can be sharded (a reward model under FSDP2)."""
        for part in self.parts.values():
            getattr(part, "shard", lambda mesh: None)(mesh)


class WeightedSumReward(_Parts):
    """``sum_i w_i * r_i(x, y)`` over named rewards, e.g. a reward model, unit tests and a length penalty.

    Example (YAML)::

        reward:
          class_path: recipes.modules.combined_rewards.WeightedSumReward
          init_args:
            parts:
              rm: {class_path: recipes.modules.reward_functions.SequenceClassifierReward, init_args: {path: runs/rm/hf}}
              length: {class_path: recipes.modules.combined_rewards.LengthPenalty, init_args: {coef: 0.01}}
            weights: {rm: 1.0, length: 1.0}

    Args:
        parts: name -> reward function.
        weights: name -> weight; a name left out weighs 1.
    """

    def __init__(self, parts: dict[str, Callable[..., Any]], weights: dict[str, float] | None = None) -> None:
        super().__init__(parts)
        unknown = set(weights or {}) - set(self.parts)
        if unknown:
            raise ValueError(f"WeightedSumReward: weights name {sorted(unknown)}, which are not parts "
                             f"({sorted(self.parts)}); use the parts' names.")
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in self.parts}

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> torch.Tensor:
        """The weighted sum of the parts' scores; their means are in ``last_metrics``."""
        scores = self.score_parts(prompts, responses, metadata)
        return sum(self.weights[name] * value for name, value in scores.items())


class LagrangianReward(_Parts):
    """Safe RLHF's constrained combination: maximize the reward subject to ``E[cost] <= threshold``.

    Dai et al., arXiv 2310.12773, Eq. 9-11: the policy maximizes ``reward - lambda * cost`` (here unnormalized; the
    paper divides by ``1 + lambda``, set ``normalize: true``) while ``lambda >= 0`` ascends the constraint's
    violation, ``lambda <- max(0, lambda + lr * (mean(cost) - threshold))``, after every scored batch (the mean over
    every rank). ``lambda`` goes into the module's checkpoint.

    Args:
        reward: the helpfulness reward (e.g. a reward model).
        cost: the harmfulness cost (e.g. a cost model: higher is more harmful).
        threshold: the allowed mean cost ``d`` (the paper: 0 for a cost model centred on the safe/unsafe boundary).
        lambda_init: the multiplier before the first batch (the paper: 1).
        lambda_lr: its step size (the paper: 0.04 on the log-multiplier; here on the multiplier itself).
        normalize: divide the combination by ``1 + lambda`` to keep its scale.
    """

    def __init__(self, reward: Callable[..., Any], cost: Callable[..., Any], threshold: float = 0.0,
                 lambda_init: float = 1.0, lambda_lr: float = 0.04, normalize: bool = False) -> None:
        super().__init__({"reward": reward, "cost": cost})
        at_least("LagrangianReward", "lambda_init", lambda_init, 0.0, "the multiplier of a constraint is >= 0")
        positive("LagrangianReward", "lambda_lr", lambda_lr, "Safe RLHF uses 0.04")
        self.threshold, self.lam, self.lr, self.normalize = float(threshold), float(lambda_init), lambda_lr, normalize

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> torch.Tensor:
        """``(reward - lambda * cost)`` (over ``1 + lambda``) with the multiplier before this batch; then update it."""
        scores = self.score_parts(prompts, responses, metadata)
        combined = scores["reward"] - self.lam * scores["cost"]
        if self.normalize:
            combined = combined / (1.0 + self.lam)
        total = all_reduce_sum(torch.tensor([scores["cost"].sum().item(), float(len(responses))]))
        self.last_metrics["lambda"] = self.lam
        self.lam = max(0.0, self.lam + self.lr * (float(total[0] / total[1]) - self.threshold))
        return combined

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Score without moving the multiplier (validation)."""
        lam = self.lam
        try:
            yield
        finally:
            self.lam = lam

    def checkpoint_state(self) -> dict[str, float]:
        """The multiplier, for the module's checkpoint."""
        return {"lambda": self.lam}

    def load_checkpoint_state(self, state: dict[str, float]) -> None:
        """Restore what `checkpoint_state` wrote."""
        self.lam = float(state["lambda"])
