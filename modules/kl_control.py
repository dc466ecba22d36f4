"""KL coefficient controllers for PPO's per-token penalty (`recipes.modules.ppo.PPOModule` ``kl_controller``), chosen by
``class_path`` in YAML; their state goes into the module's checkpoint."""

from __future__ import annotations

from typing import Any

from recipes.modules.validation import positive


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al., arXiv 1909.08593, Sec. 2.2: a proportional controller that moves
    the per-sequence KL towards ``target``.

    ``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * n / horizon)`` after every rollout of ``n``
    responses (the paper writes ``K_beta = 0.1`` for ``n / horizon``; its code, lm-human-preferences, and TRL use
    this form). ``KL`` is the rollout's mean summed per-token KL of a response, over every rank.

    Args:
        init_kl_coef: ``beta`` before the first rollout.
        target: the per-response KL to hold, in nats (the paper and TRL: 6).
        horizon: how many responses a full correction takes (the paper and TRL: 10000).
    """

    def __init__(self, init_kl_coef: float = 0.1, target: float = 6.0, horizon: int = 10000) -> None:
        for name, value in (("init_kl_coef", init_kl_coef), ("target", target), ("horizon", horizon)):
            positive("AdaptiveKLController", name, value, "the paper uses init 0.1-0.2, target 6, horizon 10000")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)

    def update(self, kl: float, n_responses: int) -> float:
        """Adjust ``value`` to the KL measured on a rollout of ``n_responses``; returns the new coefficient."""
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_responses / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """The coefficient, for a checkpoint."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` wrote."""
        self.value = float(state["value"])
