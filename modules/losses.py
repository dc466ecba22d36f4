"""Preference losses: DPO, IPO, SLiC hinge, reference-free SimPO and ORPO, KTO, and the Bradley-Terry reward loss.

Each is a small ``nn.Module`` holding only hyperparameters; it returns per-example losses plus detached metrics, and
is chosen by ``class_path`` in YAML. The policy-gradient losses live in `recipes.modules.policy_losses`; PPO's are
re-exported here so configs naming ``recipes.modules.losses.PPOPolicyLoss`` keep working.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from recipes.modules.policy_losses import PPOPolicyLoss, PPOValueLoss
from recipes.modules.validation import at_least, positive

__all__ = ["DPOLoss", "HingeLoss", "IPOLoss", "KTOLoss", "ORPOLoss", "PairwiseRewardLoss", "PPOPolicyLoss",
           "PPOValueLoss", "PreferenceLoss", "ReferenceFreePreferenceLoss", "SimPOLoss"]


class PreferenceLoss(nn.Module, ABC):
    """Shared frame of the pairwise preference losses (DPO, IPO, SLiC hinge): one forward that turns sequence
    log-probs into per-response log-ratios ``log pi - log pi_ref`` (``log pi_ref := 0`` when ``reference_free``),
    a subclass's ``pair_losses`` on them, and the detached implicit rewards ``beta * (log pi - log pi_ref)``.

    Args:
        beta: the loss's temperature (each subclass states its meaning).
        reference_free: treat ``log pi_ref`` as 0 (a uniform reference); the ``ref_*`` arguments may then be None.
    """

    def __init__(self, beta: float = 0.1, reference_free: bool = False) -> None:
        super().__init__()
        positive(type(self).__name__, "beta", beta, "beta 0 trains nothing and a negative beta learns the rejected "
                 "responses; use a small positive value such as 0.1 (the DPO paper's)")
        self.beta = beta
        self.reference_free = reference_free

    @abstractmethod
    def pair_losses(self, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor) -> torch.Tensor:
        """Per-pair loss from the two log-ratios. Shape: (b,), (b,) -> (b,)."""

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute the per-pair loss.

        Args:
            policy_chosen_logps: summed log-probs of the chosen responses under the policy. Shape: (b,)
            policy_rejected_logps: summed log-probs of the rejected responses under the policy. Shape: (b,)
            ref_chosen_logps: the same under the reference model; None only if ``reference_free``. Shape: (b,)
            ref_rejected_logps: the same under the reference model; None only if ``reference_free``. Shape: (b,)

        Returns:
            losses: per-pair loss. Shape: (b,)
            chosen_rewards: detached implicit reward ``beta * (log pi - log pi_ref)`` of the chosen. Shape: (b,)
            rejected_rewards: detached implicit reward of the rejected. Shape: (b,)
        """
        if self.reference_free:
            chosen_logratios, rejected_logratios = policy_chosen_logps, policy_rejected_logps
        elif ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(
                f"{type(self).__name__}: ref_chosen_logps and ref_rejected_logps are None; pass the reference "
                "model's sequence log-probs, or set reference_free: true in the loss's init_args."
            )
        else:
            chosen_logratios = policy_chosen_logps - ref_chosen_logps
            rejected_logratios = policy_rejected_logps - ref_rejected_logps
        losses = self.pair_losses(chosen_logratios, rejected_logratios)
        return losses, self.beta * chosen_logratios.detach(), self.beta * rejected_logratios.detach()


class DPOLoss(PreferenceLoss):
    """Direct Preference Optimization loss, with conservative label smoothing (cDPO).

    Rafailov et al., arXiv 2305.18290, Eq. 7; cDPO from Mitchell (2023), "A note on DPO with noisy preferences":
    ``loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``,
    ``h = (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))``.

    Args:
        beta: inverse temperature of the implicit reward ``beta * log(pi / pi_ref)``; 0.1 in the paper.
        label_smoothing: ``eps``, the assumed probability that a preference label is flipped; 0 is plain DPO.
        reference_free: treat ``log pi_ref`` as 0 (a uniform reference); the ``ref_*`` arguments may then be None.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, reference_free: bool = False) -> None:
        super().__init__(beta, reference_free)
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"DPOLoss: label_smoothing must be in [0, 0.5), got {label_smoothing}.")
        self.label_smoothing = label_smoothing

    def pair_losses(self, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor) -> torch.Tensor:
        h = chosen_logratios - rejected_logratios  # (B,)
        eps = self.label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(self.beta * h)
        if eps > 0:  # skip the term at eps = 0 so that h = -inf (pi(y_c) = 0) does not make 0 * inf = nan
            losses = losses - eps * F.logsigmoid(-self.beta * h)
        return losses


class IPOLoss(PreferenceLoss):
    """Identity Preference Optimization loss.

    Azar et al., arXiv 2310.12036, Eq. 17: ``loss = (h - 1 / (2 tau))^2`` with
    ``h = (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))``.

    The paper's empirical version is written with sequence log-probs; several implementations (TRL) average the
    log-probs over tokens for IPO instead. This module takes the log-probs as given: the caller chooses the
    reduction (the DPO module passes what it computes, summed by default).

    Args:
        beta: the regularization ``tau``; the target log-ratio margin is ``1 / (2 tau)``.
        reference_free: treat ``log pi_ref`` as 0.
    """

    def pair_losses(self, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor) -> torch.Tensor:
        h = chosen_logratios - rejected_logratios  # (B,)
        return (h - 1.0 / (2.0 * self.beta)) ** 2


class HingeLoss(PreferenceLoss):
    """SLiC hinge loss on the policy/reference log-ratio margin.

    Zhao et al., arXiv 2305.10425, Eq. 4 (the calibration hinge, with pi_ref-normalized log-probs as in the
    DPO-style ``h``): ``loss = max(0, 1 - beta h)``,
    ``h = (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))``.

    Args:
        beta: scales the margin; the hinge is satisfied once ``h >= 1 / beta``.
        reference_free: treat ``log pi_ref`` as 0.
    """

    def pair_losses(self, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor) -> torch.Tensor:
        return F.relu(1.0 - self.beta * (chosen_logratios - rejected_logratios))  # (B,)


class PairwiseRewardLoss(nn.Module):
    """Bradley-Terry reward-model loss with an optional margin and reward centering.

    InstructGPT, arXiv 2203.02155, Eq. 1; margin as in Llama 2, arXiv 2307.09288, Eq. 2; centering term from
    Eisenstein et al., arXiv 2312.09244:
    ``loss = -log sigmoid(r_c - r_r - m) + center_coef * (r_c + r_r)^2``.

    Args:
        center_coef: weight of the centering term that pulls each pair's summed reward to 0 (0.01 in Eisenstein
            et al.); 0 disables it.
    """

    def __init__(self, center_coef: float = 0.0) -> None:
        super().__init__()
        at_least("PairwiseRewardLoss", "center_coef", center_coef, 0.0, "0 disables centering; 0.01 is typical")
        self.center_coef = center_coef

    def forward(
        self,
        chosen_rewards: torch.Tensor,
        rejected_rewards: torch.Tensor,
        margin: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the per-pair reward-model loss.

        Args:
            chosen_rewards: scalar rewards of the chosen responses. Shape: (b,)
            rejected_rewards: scalar rewards of the rejected responses. Shape: (b,)
            margin: optional per-pair margin ``m`` (Llama 2's graded preference strength); None means 0. Shape: (b,)

        Returns:
            losses: per-pair loss. Shape: (b,)
            accuracies: detached 1.0 where ``r_c > r_r`` else 0.0 (the ``rewards/accuracies`` metric). Shape: (b,)
        """
        margins = chosen_rewards - rejected_rewards  # (B,)
        if margin is not None:
            margins = margins - margin
        losses = -F.logsigmoid(margins)
        if self.center_coef > 0:
            losses = losses + self.center_coef * (chosen_rewards + rejected_rewards) ** 2
        accuracies = (chosen_rewards > rejected_rewards).float().detach()
        return losses, accuracies


class ReferenceFreePreferenceLoss(nn.Module, ABC):
    """Shared frame of the reference-free, length-normalized pairwise losses (SimPO, ORPO): one forward that turns
    summed log-probs and token counts into mean token log-probs ``log pi(y) / |y|`` and applies ``pair_losses``.

    ``needs_reference = False`` tells `recipes.modules.dpo.DPOModule` to build, load and run no reference model and
    to call this forward with token counts instead of reference log-probs.
    """

    needs_reference = False
    length_normalized = True  # False: ``pair_losses`` receives the summed log-probs (SimPO's ablation)

    @abstractmethod
    def pair_losses(
        self, chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair loss and the detached chosen/rejected rewards from mean token log-probs. Shape: (b,) -> 3 x (b,)."""

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute the per-pair loss.

        Args:
            policy_chosen_logps: summed log-probs of the chosen responses under the policy. Shape: (b,)
            policy_rejected_logps: summed log-probs of the rejected responses under the policy. Shape: (b,)
            chosen_lengths: response tokens ``|y_c|`` of each chosen response (>= 1). Shape: (b,)
            rejected_lengths: response tokens ``|y_r|`` of each rejected response (>= 1). Shape: (b,)

        Returns:
            losses: per-pair loss. Shape: (b,)
            chosen_rewards: the loss's detached reward of the chosen (each subclass names it). Shape: (b,)
            rejected_rewards: the same for the rejected. Shape: (b,)
        """
        if not self.length_normalized:
            return self.pair_losses(policy_chosen_logps, policy_rejected_logps)
        chosen_avg = policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype)  # (B,)
        rejected_avg = policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype)  # (B,)
        return self.pair_losses(chosen_avg, rejected_avg)


class SimPOLoss(ReferenceFreePreferenceLoss):
    """Simple Preference Optimization loss: a length-normalized reward with a target margin and no reference.

    Meng et al., arXiv 2405.14734, Eq. 6:
    ``loss = -log sigmoid(beta / |y_c| log pi(y_c) - beta / |y_r| log pi(y_r) - gamma)``.

    Defaults: ``beta = 2.0`` is the paper's setting for its Base models (its hyperparameter table; its README: "a
    small beta, e.g. 2.0 or 2.5"); the paper and its code tune the margin as the ratio ``gamma / beta``, with the
    README's grid {0.25, 0.3, 0.4}: ``gamma = 0.5`` is ``gamma / beta = 0.25`` (also TRL's ``simpo_gamma``).

    ``length_normalize=False`` is the paper's ablation without length normalization (its Table 5, "w/o LN"):
    the reward is ``beta log pi(y)``, and with ``gamma = 0`` the loss is DPO's with a reference that gives every
    response probability 1 (``-log sigmoid(beta (log pi(y_c) - log pi(y_r)))``).

    Args:
        beta: scale of the reward ``beta / |y| log pi(y)``.
        gamma: target reward margin, in reward units (Eq. 6's ``gamma``, not the code's ``gamma / beta``); >= 0.
        length_normalize: divide the summed log-probs by the response lengths (SimPO); False: use the sums.
    """

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, length_normalize: bool = True) -> None:
        super().__init__()
        self.length_normalized = length_normalize
        positive("SimPOLoss", "beta", beta, "SimPO uses beta 2.0 to 2.5 (10 for Gemma 2)")
        at_least("SimPOLoss", "gamma", gamma, 0.0, "gamma is a target margin; tune gamma / beta in 0.25-0.8")
        self.beta = beta
        self.gamma = gamma

    def pair_losses(
        self, chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the losses and the detached rewards ``beta * log pi(y) / |y|`` (Eq. 4)."""
        chosen_rewards = self.beta * chosen_avg_logps  # (B,)
        rejected_rewards = self.beta * rejected_avg_logps
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards - self.gamma)
        return losses, chosen_rewards.detach(), rejected_rewards.detach()


class ORPOLoss(ReferenceFreePreferenceLoss):
    """Odds Ratio Preference Optimization loss: SFT on the chosen plus a log-odds-ratio penalty, no reference.

    Hong et al., arXiv 2403.07691, Eq. 6-7 (with Eq. 2-4):
    ``loss = -log P(y_c) + lam * -log sigmoid(log odds(y_c) - log odds(y_r))``, where ``log P(y) = log pi(y) / |y|``
    (the mean token log-prob, Eq. 3), ``odds(y) = P(y) / (1 - P(y))`` (Eq. 4) and ``-log P(y_c)`` is Eq. 2's
    length-normalized NLL.

    Args:
        lam: weight ``lambda`` of the odds-ratio term; 0.1, the paper's setting in its experiments (also TRL's
            ``ORPOConfig.beta``).
    """

    def __init__(self, lam: float = 0.1) -> None:
        super().__init__()
        positive("ORPOLoss", "lam", lam, "lam 0 is plain SFT on the chosen; the paper uses 0.1")
        self.lam = lam

    def pair_losses(
        self, chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the losses and the detached log-odds ``log odds(y)`` of the chosen and the rejected."""
        # log odds = log P - log(1 - P); expm1 keeps log(1 - P) accurate when P is near 1 (log P near 0)
        chosen_log_odds = chosen_avg_logps - torch.log(-torch.expm1(chosen_avg_logps))  # (B,)
        rejected_log_odds = rejected_avg_logps - torch.log(-torch.expm1(rejected_avg_logps))
        odds_ratio_loss = -F.logsigmoid(chosen_log_odds - rejected_log_odds)
        losses = -chosen_avg_logps + self.lam * odds_ratio_loss
        return losses, chosen_log_odds.detach(), rejected_log_odds.detach()


class KTOLoss(nn.Module):
    """Kahneman-Tversky Optimization loss on unpaired completions, each labelled desirable or undesirable.

    Ethayarajh et al., arXiv 2402.01306, Eq. 8 (with Sec. 4's implementation of ``z0``):
    ``loss = lambda_D (1 - sigmoid(beta (r - z0)))`` for a desirable row, ``lambda_U (1 - sigmoid(beta (z0 - r)))``
    for an undesirable one, with the implied reward ``r = log pi(y|x) - log pi_ref(y|x)`` and the reference point
    ``z0 = max(0, KL estimate)``, detached (the paper does not backpropagate through it). The KL estimate is the mean
    of ``log pi(y'|x) - log pi_ref(y'|x)`` over mismatched pairs ``(x, y')`` of the batch; the caller computes it
    (`recipes.modules.kto.KTOModule`: every rank's rows, each prompt with the next row's completion).

    Args:
        beta: scale of the reward in the value function; 0.1, the paper's default (also TRL's ``KTOConfig``).
        desirable_weight: ``lambda_D``; 1.0, the paper's default for balanced data.
        undesirable_weight: ``lambda_U``; 1.0. With imbalanced data the paper recommends keeping
            ``lambda_D n_D / (lambda_U n_U)`` in [1, 4/3] (``n_D``, ``n_U``: desirable and undesirable rows).
    """

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> None:
        super().__init__()
        positive("KTOLoss", "beta", beta, "beta 0 trains nothing; the paper uses 0.1")
        for name, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
            at_least("KTOLoss", name, weight, 0.0, "A negative weight trains towards the opposite label; use 1.0")
        if desirable_weight == undesirable_weight == 0.0:
            raise ValueError("KTOLoss: desirable_weight and undesirable_weight are both 0, which trains nothing. "
                             "Use 1.0 for both (the paper's default).")
        self.beta = beta
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight

    def forward(
        self,
        policy_logps: torch.Tensor,
        ref_logps: torch.Tensor,
        desirable: torch.Tensor,
        kl: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute the per-row loss.

        Args:
            policy_logps: summed completion log-probs ``log pi(y|x)`` under the policy. Shape: (b,)
            ref_logps: the same under the reference model. Shape: (b,)
            desirable: True for a desirable completion, False for an undesirable one. Shape: (b,)
            kl: the KL estimate from mismatched pairs (any sign; clamped at 0 and detached here). Shape: ()

        Returns:
            losses: per-row loss. Shape: (b,)
            rewards: detached implied reward ``beta * r`` (the ``rewards/chosen|rejected`` metrics). Shape: (b,)
            z0: the detached reference point ``max(0, kl)``. Shape: ()
            accuracies: detached 1.0 where ``r`` lies on its label's side of ``z0`` (``r > z0`` for a desirable
                row, ``r < z0`` for an undesirable one), else 0.0. Shape: (b,)
        """
        logratios = policy_logps - ref_logps  # (B,) the implied reward r
        z0 = kl.detach().clamp(min=0)
        desirable = desirable.bool()
        values = torch.where(desirable, torch.sigmoid(self.beta * (logratios - z0)),
                             torch.sigmoid(self.beta * (z0 - logratios)))  # (B,) v(x, y) / lambda_y
        weights = torch.where(desirable, self.desirable_weight, self.undesirable_weight).to(values.dtype)
        losses = weights * (1.0 - values)
        accuracies = torch.where(desirable, logratios > z0, logratios < z0).float().detach()
        return losses, self.beta * logratios.detach(), z0, accuracies
