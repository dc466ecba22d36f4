"""Theorem 4.1 toy of Xu et al. (arXiv 2404.10719, Table 1): DPO's minimizers include policies that bet on an
unseen response, while the KL-regularized (PPO) optimum keeps it at the reference's zero.

Three responses, pi_ref = (0.5, 0.5, 0), one preference pair y1 > y2. Run: ``python -m recipes.paper.theorem41``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from recipes.modules.losses import DPOLoss, PPOPolicyLoss
from recipes.modules.rl_utils import kl_penalized_rewards, masked_whiten

PI_REF = (0.5, 0.5, 0.0)
REWARD = (1.0, 0.0, 5.0)  # r(y3) is an arbitrary extrapolation, made large on purpose: it must not matter
DPO_INIT = (0.1, 0.1, 0.8)  # a policy that has already drifted to y3 (e.g. through shared parameters)


def dpo_objective(pi: tuple[float, ...], pi_ref: tuple[float, ...] = PI_REF, beta: float = 0.1) -> float:
    """The DPO loss of a tabular policy on the single pair (y1 > y2), computed by the real ``DPOLoss``."""
    logpi, logref = (
        torch.log(torch.tensor(pi, dtype=torch.float64)),
        torch.log(torch.tensor(pi_ref, dtype=torch.float64)),
    )
    losses, _, _ = DPOLoss(beta=beta)(logpi[:1], logpi[1:2], logref[:1], logref[1:2])
    return losses.item()


def kl_regularized_objective(
    pi: tuple[float, ...], pi_ref: tuple[float, ...] = PI_REF, reward: tuple[float, ...] = REWARD, beta: float = 0.1
) -> float:
    """``E_pi[r] - beta KL(pi || pi_ref)``, the objective PPO maximizes; -inf if pi puts mass where pi_ref has none."""
    value = 0.0
    for p, q, r in zip(pi, pi_ref, reward, strict=True):
        if p == 0:
            continue  # 0 log 0 = 0
        if q == 0:
            return -math.inf
        value += p * (r - beta * math.log(p / q))
    return value


def kl_regularized_optimum(
    pi_ref: tuple[float, ...] = PI_REF, reward: tuple[float, ...] = REWARD, beta: float = 0.1
) -> tuple[float, ...]:
    """Closed-form maximizer ``pi*(y) = pi_ref(y) exp(r(y) / beta) / Z`` (DPO paper, arXiv 2305.18290, Eq. 4)."""
    support = [i for i, q in enumerate(pi_ref) if q > 0]
    shift = max(reward[i] / beta for i in support)  # subtract the max exponent for numerical safety
    weights = [q * math.exp(r / beta - shift) if q > 0 else 0.0 for q, r in zip(pi_ref, reward, strict=True)]
    z = sum(weights)
    return tuple(w / z for w in weights)


@dataclass(frozen=True)
class DPORun:
    """Gradient descent on the DPO loss of a tabular softmax policy."""

    beta: float
    steps: int
    loss: float
    pi: tuple[float, float, float]
    init_logits: tuple[float, float, float]
    logits: tuple[float, float, float]


def train_dpo_tabular(
    init: tuple[float, ...] = DPO_INIT,
    beta: float = 0.1,
    target_loss: float = 0.05,
    lr: float = 1.0,
    max_steps: int = 20_000,
) -> DPORun:
    """Plain SGD on softmax logits until the DPO loss reaches ``target_loss``.

    The loss depends on the logits only through ``theta1 - theta2`` (the normalizer cancels), so SGD leaves
    ``theta3`` and ``theta1 + theta2`` unchanged: DPO never sees y3 and never moves it.
    """
    logits = torch.log(torch.tensor(init, dtype=torch.float64)).requires_grad_()
    init_logits = tuple(logits.tolist())
    logref = torch.log(torch.tensor(PI_REF, dtype=torch.float64))
    loss_fn, optimizer = DPOLoss(beta=beta), torch.optim.SGD([logits], lr=lr)
    for step in range(max_steps):
        logpi = torch.log_softmax(logits, dim=0)
        loss = loss_fn(logpi[:1], logpi[1:2], logref[:1], logref[1:2])[0].sum()
        if loss.item() <= target_loss:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pi = torch.softmax(logits.detach(), dim=0)
    return DPORun(beta, step, loss.item(), tuple(pi.tolist()), init_logits, tuple(logits.detach().tolist()))


@dataclass(frozen=True)
class PPORun:
    """PPO on a tabular softmax policy started at pi_ref, with the per-token KL penalty in the reward."""

    kl_coef: float
    iterations: int
    pi: tuple[float, float, float]
    closed_form: tuple[float, float, float]


def train_ppo_tabular(
    reward: tuple[float, ...] = REWARD,
    kl_coef: float = 0.1,
    iterations: int = 200,
    batch_size: int = 256,
    epochs: int = 4,
    lr: float = 0.05,
    seed: int = 0,
) -> PPORun:
    """PPO with the real ``kl_penalized_rewards`` / ``masked_whiten`` / ``PPOPolicyLoss`` on one-token responses.

    Each iteration samples ``batch_size`` responses from the current policy, gives each ``r(y) - kl_coef * k1``,
    whitens the advantages over the rollout batch (no critic: one step, so the advantage is the reward) and takes
    ``epochs`` Adam steps on the clipped loss. Starting at pi_ref, y3 has probability 0 and its logit gets exactly
    zero gradient, so it is never sampled and stays at 0.
    """
    generator = torch.Generator().manual_seed(seed)
    ref_logits = torch.log(torch.tensor(PI_REF))  # y3: -inf
    logits = ref_logits.clone().requires_grad_()
    scores_table = torch.tensor(reward)
    loss_fn, optimizer = PPOPolicyLoss(clip_eps=0.2), torch.optim.Adam([logits], lr=lr)
    mask = torch.ones(batch_size, 1)
    for _ in range(iterations):
        with torch.no_grad():
            old_logpi = torch.log_softmax(logits, dim=0)
            actions = torch.multinomial(old_logpi.exp(), batch_size, replacement=True, generator=generator)
            old_logprobs = old_logpi[actions].unsqueeze(1)  # (B, 1)
            ref_logprobs = torch.log_softmax(ref_logits, dim=0)[actions].unsqueeze(1)
            rewards = kl_penalized_rewards(scores_table[actions], old_logprobs, ref_logprobs, mask, kl_coef)
            advantages = masked_whiten(rewards, mask)
        for _ in range(epochs):
            logprobs = torch.log_softmax(logits, dim=0)[actions].unsqueeze(1)
            loss, _, _ = loss_fn(logprobs, old_logprobs, advantages, mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    pi = tuple(torch.softmax(logits.detach(), dim=0).tolist())
    return PPORun(kl_coef, iterations, pi, kl_regularized_optimum(PI_REF, reward, kl_coef))


@dataclass(frozen=True)
class Theorem41Result:
    """Objective values at the paper's candidate policies and the policies each method actually reaches."""

    dpo_loss: dict[str, float]  # candidate name -> DPO loss
    kl_objective: dict[str, float]  # candidate name -> E[r] - beta KL
    dpo_runs: list[DPORun]
    ppo_runs: list[PPORun]


CANDIDATES = {
    "pi_ref (0.5, 0.5, 0)": PI_REF,
    "PPO-like (1, 0, 0)": (1.0, 0.0, 0.0),
    "DPO-like (0.1, 0, 0.9)": (0.1, 0.0, 0.9),
}


def run_theorem41(betas: tuple[float, ...] = (0.1, 1.0), ppo_iterations: int = 200, seed: int = 0) -> Theorem41Result:
    """Evaluate both objectives at the candidates, then train DPO and PPO on the tabular policy for each beta."""
    return Theorem41Result(
        dpo_loss={name: dpo_objective(pi) for name, pi in CANDIDATES.items()},
        kl_objective={name: kl_regularized_objective(pi) for name, pi in CANDIDATES.items()},
        dpo_runs=[train_dpo_tabular(beta=beta) for beta in betas],
        ppo_runs=[train_ppo_tabular(kl_coef=beta, iterations=ppo_iterations, seed=seed) for beta in betas],
    )


def _fmt(pi: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{p:.3f}" for p in pi) + ")"


def format_markdown(result: Theorem41Result) -> str:
    """The result as markdown tables."""
    lines = ["| policy | DPO loss (beta 0.1) | E[r] - 0.1 KL |", "|---|---|---|"]
    for name in CANDIDATES:
        lines.append(f"| {name} | {result.dpo_loss[name] + 0.0:.4f} | {result.kl_objective[name]:.4f} |")
    lines += [
        "",
        "| method | beta | steps | DPO loss (same beta) | pi (y1, y2, y3) | closed-form KL optimum |",
        "|---|---|---|---|---|---|",
    ]
    for run in result.dpo_runs:
        lines.append(
            f"| DPO, SGD from {_fmt(DPO_INIT)} | {run.beta} | {run.steps} | {run.loss + 0.0:.4f} | {_fmt(run.pi)} | - |"
        )
    for run in result.ppo_runs:
        lines.append(
            f"| PPO from pi_ref | {run.kl_coef} | {run.iterations} | {dpo_objective(run.pi, beta=run.kl_coef):.4f} "
            f"| {_fmt(run.pi)} | {_fmt(run.closed_form)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the toy's tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ppo-iterations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(format_markdown(run_theorem41(ppo_iterations=args.ppo_iterations, seed=args.seed)))


if __name__ == "__main__":
    main()
