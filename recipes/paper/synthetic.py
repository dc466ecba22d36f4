"""Synthetic experiment of Xu et al. (arXiv 2404.10719, Sec. 4.2, Fig. 1): with preference pairs covering only a
few responses per prompt, DPO moves probability onto responses absent from the data; PPO on a learned reward does not.

Run: ``python -m recipes.paper.synthetic --seeds 5 --out docs/img`` (CPU, about a minute).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from recipes.modules.losses import DPOLoss, PairwiseRewardLoss, PPOPolicyLoss
from recipes.modules.rl_utils import kl_penalized_rewards, masked_whiten
from recipes.paper.synthetic_report import format_markdown, plot


@dataclass(frozen=True)
class SyntheticConfig:
    """The setup; every value here is a choice of this reproduction (the paper gives the shape, not these numbers)."""

    num_prompts: int = 8  # = num_responses; the optimal response to prompt i is response i (the diagonal)
    rejected_offsets: tuple[int, ...] = (1, 2)  # pairs (y_i > y_{i+k mod 8}); responses i, i+1, i+2 are "in data"
    ref_out_of_data_mass: float = 0.1  # pi_ref's SFT target puts this mass, spread evenly, on the other 5 responses
    hidden: int = 64
    ref_steps: int = 500
    beta: float = 0.1  # DPO beta and PPO kl_coef alike
    dpo_steps: int = 1000  # long enough that the DPO loss is near its infimum 0 (see dpo_final_loss)
    dpo_lr: float = 1e-2
    reward_steps: int = 300
    reward_lr: float = 1e-2
    ppo_iterations: int = 100
    ppo_samples_per_prompt: int = 32
    ppo_epochs: int = 4
    ppo_lr: float = 1e-3


def mlp(num_prompts: int, hidden: int) -> nn.Module:
    """One-hot prompt -> one logit (policy) or one reward (reward model) per response."""
    return nn.Sequential(
        nn.Linear(num_prompts, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_prompts)
    )


def preference_pairs(config: SyntheticConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(prompts, chosen, rejected)`` index tensors: the diagonal response beats each rejected offset."""
    n = config.num_prompts
    rows = [(i, i, (i + k) % n) for i in range(n) for k in config.rejected_offsets]
    prompts, chosen, rejected = (torch.tensor(col) for col in zip(*rows, strict=True))
    return prompts, chosen, rejected


def in_data_mask(config: SyntheticConfig) -> torch.Tensor:
    """``(n, n)`` bool: True where response j appears in some preference pair of prompt i."""
    prompts, chosen, rejected = preference_pairs(config)
    mask = torch.zeros(config.num_prompts, config.num_prompts, dtype=torch.bool)
    mask[prompts, chosen] = True
    mask[prompts, rejected] = True
    return mask


@dataclass(frozen=True)
class PolicyStats:
    """What Fig. 1 reads off a policy, averaged over the prompts."""

    out_of_data_mass: float  # sum of pi(y | x) over responses in no preference pair of x
    diagonal_prob: float  # pi(y* | x), also the expected true reward (r* = 1 on the diagonal, 0 elsewhere)
    diagonal_accuracy: float  # fraction of prompts whose most likely response is the optimal one


def policy_stats(probs: torch.Tensor, config: SyntheticConfig) -> PolicyStats:
    """Statistics of an ``(n, n)`` table of pi(y | x)."""
    diagonal = probs.diagonal()
    return PolicyStats(
        out_of_data_mass=(probs * ~in_data_mask(config)).sum(1).mean().item(),
        diagonal_prob=diagonal.mean().item(),
        diagonal_accuracy=(probs.argmax(1) == torch.arange(len(probs))).float().mean().item(),
    )


def _train_reference(config: SyntheticConfig) -> nn.Module:
    """SFT: fit pi_ref to a target uniform over each prompt's in-data responses, with a little mass elsewhere."""
    in_data = in_data_mask(config).float()
    out_data = 1.0 - in_data
    target = (1 - config.ref_out_of_data_mass) * in_data / in_data.sum(1, keepdim=True)
    target = target + config.ref_out_of_data_mass * out_data / out_data.sum(1, keepdim=True)
    policy, eye = mlp(config.num_prompts, config.hidden), torch.eye(config.num_prompts)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(config.ref_steps):
        loss = -(target * torch.log_softmax(policy(eye), dim=1)).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy


def _probs(policy: nn.Module, config: SyntheticConfig) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(policy(torch.eye(config.num_prompts)), dim=1)


def train_dpo(reference: nn.Module, config: SyntheticConfig) -> tuple[nn.Module, float]:
    """DPO (the real ``DPOLoss``) on the preference pairs, full batch, from pi_ref; returns the policy and last loss."""
    prompts, chosen, rejected = preference_pairs(config)
    x = torch.eye(config.num_prompts)[prompts]
    with torch.no_grad():
        ref_logp = torch.log_softmax(reference(x), dim=1)
    ref_chosen, ref_rejected = ref_logp.gather(1, chosen[:, None])[:, 0], ref_logp.gather(1, rejected[:, None])[:, 0]
    policy = _copy(reference, config)
    loss_fn, optimizer = DPOLoss(beta=config.beta), torch.optim.Adam(policy.parameters(), lr=config.dpo_lr)
    for _ in range(config.dpo_steps):
        logp = torch.log_softmax(policy(x), dim=1)
        losses, _, _ = loss_fn(
            logp.gather(1, chosen[:, None])[:, 0], logp.gather(1, rejected[:, None])[:, 0], ref_chosen, ref_rejected
        )
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
    return policy, losses.mean().item()


def train_reward_model(config: SyntheticConfig) -> nn.Module:
    """A Bradley-Terry reward model (the real ``PairwiseRewardLoss``) on the same pairs."""
    prompts, chosen, rejected = preference_pairs(config)
    x = torch.eye(config.num_prompts)[prompts]
    reward_model = mlp(config.num_prompts, config.hidden)
    loss_fn, optimizer = PairwiseRewardLoss(), torch.optim.Adam(reward_model.parameters(), lr=config.reward_lr)
    for _ in range(config.reward_steps):
        rewards = reward_model(x)
        losses, _ = loss_fn(rewards.gather(1, chosen[:, None])[:, 0], rewards.gather(1, rejected[:, None])[:, 0])
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
    return reward_model


def train_ppo(
    reference: nn.Module, reward_model: nn.Module, config: SyntheticConfig, generator: torch.Generator
) -> nn.Module:
    """PPO on the learned reward: sample, per-token KL-penalized reward, whitened advantages, clipped loss.

    Responses are one token, so with no critic the advantage is the KL-penalized reward itself, whitened over the
    whole rollout batch (the paper's advantage normalization).
    """
    n, k = config.num_prompts, config.ppo_samples_per_prompt
    prompts = torch.arange(n).repeat_interleave(k)  # (B,)
    x = torch.eye(n)[prompts]
    mask = torch.ones(n * k, 1)
    with torch.no_grad():
        ref_logp_all = torch.log_softmax(reference(x), dim=1)
        reward_all = reward_model(x)
    policy = _copy(reference, config)
    loss_fn, optimizer = PPOPolicyLoss(clip_eps=0.2), torch.optim.Adam(policy.parameters(), lr=config.ppo_lr)
    for _ in range(config.ppo_iterations):
        with torch.no_grad():
            old_logp_all = torch.log_softmax(policy(x), dim=1)
            responses = torch.multinomial(old_logp_all.exp(), 1, generator=generator)  # (B, 1)
            old_logprobs = old_logp_all.gather(1, responses)
            ref_logprobs = ref_logp_all.gather(1, responses)
            scores = reward_all.gather(1, responses)[:, 0]
            rewards = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, config.beta)
            advantages = masked_whiten(rewards, mask)
        for _ in range(config.ppo_epochs):
            logprobs = torch.log_softmax(policy(x), dim=1).gather(1, responses)
            loss, _, _ = loss_fn(logprobs, old_logprobs, advantages, mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return policy


def _copy(module: nn.Module, config: SyntheticConfig) -> nn.Module:
    clone = mlp(config.num_prompts, config.hidden)
    clone.load_state_dict(module.state_dict())
    return clone


@dataclass(frozen=True)
class SeedResult:
    """One seed: the statistics of each policy and the probability tables for plotting."""

    seed: int
    reference: PolicyStats
    dpo: PolicyStats
    ppo: PolicyStats
    kl_optimum: PolicyStats  # closed form pi_ref * exp(r_learned / beta) / Z: where PPO should converge
    dpo_final_loss: float
    reward_pair_accuracy: float
    tables: dict[str, list[list[float]]] = field(repr=False, compare=False)


def run_seed(seed: int, config: SyntheticConfig = SyntheticConfig()) -> SeedResult:
    """pi_ref by SFT, then DPO on the pairs, and a reward model + PPO on the same pairs; all from this seed."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    reference = _train_reference(config)
    dpo, dpo_final_loss = train_dpo(reference, config)
    reward_model = train_reward_model(config)
    ppo = train_ppo(reference, reward_model, config, generator)
    prompts, chosen, rejected = preference_pairs(config)
    with torch.no_grad():
        rewards = reward_model(torch.eye(config.num_prompts))  # (n, n)
        ref_logp = torch.log_softmax(reference(torch.eye(config.num_prompts)), dim=1)
    accuracy = (rewards[prompts, chosen] > rewards[prompts, rejected]).float().mean().item()
    probs = {"pi_ref": _probs(reference, config), "DPO": _probs(dpo, config), "PPO": _probs(ppo, config)}
    kl_optimum = torch.softmax(ref_logp + rewards / config.beta, dim=1)
    return SeedResult(
        seed,
        policy_stats(probs["pi_ref"], config),
        policy_stats(probs["DPO"], config),
        policy_stats(probs["PPO"], config),
        policy_stats(kl_optimum, config),
        dpo_final_loss,
        accuracy,
        {name: table.tolist() for name, table in probs.items()},
    )


def run_synthetic(seeds: int = 5, config: SyntheticConfig = SyntheticConfig()) -> list[SeedResult]:
    """``run_seed`` for seeds 0 .. seeds - 1."""
    return [run_seed(seed, config) for seed in range(seeds)]


def main(argv: list[str] | None = None) -> None:
    """Run the seeds, print the markdown table, save the plot."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny MLPs: threads only add overhead
    config = SyntheticConfig()
    results = run_synthetic(args.seeds, config)
    print(format_markdown(results))
    for r in results:
        print(
            f"seed {r.seed}: out-of-data mass pi_ref {r.reference.out_of_data_mass:.3f} "
            f"DPO {r.dpo.out_of_data_mass:.3f} PPO {r.ppo.out_of_data_mass:.3f} "
            f"KL-optimum {r.kl_optimum.out_of_data_mass:.3f}; diagonal accuracy "
            f"DPO {r.dpo.diagonal_accuracy:.2f} PPO {r.ppo.diagonal_accuracy:.2f}"
        )
    plot(results, in_data_mask(config), args.out / "synthetic_dpo_vs_ppo.png")
    print(f"\nplot: {args.out / 'synthetic_dpo_vs_ppo.png'}")


if __name__ == "__main__":
    main()
