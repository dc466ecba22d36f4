"""Synthetic experiment of Xu et al. (arXiv 2404.10719, Sec. 4.2, Fig. 1): with preference pairs covering only a
few responses per prompt, DPO moves probability onto responses absent from the data; PPO on a learned reward is held
back by its KL penalty, and PPO at kl_coef 0 (the control) is not.

Run: ``python -m recipes.paper.synthetic --seeds 5 --out docs/img --doc docs/paper_small_experiments.md`` (CPU,
about 15 s); ``--doc`` rewrites the doc's block between its ``<!-- synthetic:begin/end -->`` markers.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from recipes.modules.losses import DPOLoss, PairwiseRewardLoss, PPOPolicyLoss
from recipes.modules.rl_utils import kl_penalized_rewards, masked_whiten
from recipes.paper.synthetic_report import plot, render_doc_block, write_doc_block


@dataclass(frozen=True)
class SyntheticConfig:
    """The setup; every value here is a choice of this reproduction (the paper gives the shape, not these numbers).

    Two choices make the kl_coef 0 control informative (with the earlier setup, an RM trained from scratch on raw
    scores, PPO with and without the KL were equally safe, so the experiment could not isolate the KL):

    - ``reward_from_reference``: the reward model starts from pi_ref's network with its output layer zeroed, and is
      fine-tuned whole, as RLHF reward models start from the SFT model (Ziegler et al., arXiv 1909.08593; Ouyang et
      al., arXiv 2203.02155). Its reward is 0 everywhere before training, as DPO's implicit reward
      ``beta log pi / pi_ref`` is at ``pi = pi_ref``, so both learn from the same network. Trained from scratch
      (False), the MLP learns "only the diagonal is good" and ranks the optimal response first in almost every
      prompt: there is no out-of-data response rated high for PPO to exploit, with or without the KL. Built on
      pi_ref's features it extrapolates upward to some out-of-data responses, the premise of the paper's Fig. 1.
    - ``normalize_reward``: PPO sees the RM normalized to mean 0 and variance 1 under x uniform, y ~ pi_ref
      (Ziegler et al., Sec. 2), so ``kl_coef`` is in units of the reward's spread. The raw Bradley-Terry margins grow
      without bound on 16 separable pairs (their spread is the "RM scale" line of the doc's block), and against
      them a kl_coef of 0.1 is negligible: PPO with the KL would behave as the control does.
    """

    num_prompts: int = 8  # = num_responses; the optimal response to prompt i is response i (the diagonal)
    rejected_offsets: tuple[int, ...] = (1, 2)  # pairs (y_i > y_{i+k mod 8}); responses i, i+1, i+2 are "in data"
    ref_out_of_data_mass: float = 0.1  # pi_ref's SFT target puts this mass, spread evenly, on the other 5 responses
    hidden: int = 64
    ref_steps: int = 500
    beta: float = 0.1  # DPO beta and PPO kl_coef alike (the KL-regularized objective DPO's loss is derived from)
    dpo_steps: int = 1000  # long enough that the DPO loss is near its infimum 0 (see dpo_final_loss)
    dpo_lr: float = 1e-2
    reward_from_reference: bool = True  # see the class docstring
    reward_steps: int = 300
    reward_lr: float = 1e-2
    normalize_reward: bool = True  # see the class docstring
    ppo_iterations: int = 100
    ppo_samples_per_prompt: int = 32
    ppo_epochs: int = 4
    ppo_lr: float = 1e-3
    near_margin: float = 0.05  # "PPO with the KL stays near pi_ref": adds less than half pi_ref's out-of-data mass


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


def train_reward_model(reference: nn.Module, config: SyntheticConfig) -> nn.Module:
    """A Bradley-Terry reward model (the real ``PairwiseRewardLoss``) on the same pairs, from pi_ref or from scratch."""
    prompts, chosen, rejected = preference_pairs(config)
    x = torch.eye(config.num_prompts)[prompts]
    if config.reward_from_reference:
        reward_model = _copy(reference, config)
        nn.init.zeros_(reward_model[-1].weight)  # r = 0 everywhere before training, like DPO's implicit reward
        nn.init.zeros_(reward_model[-1].bias)
    else:
        reward_model = mlp(config.num_prompts, config.hidden)
    loss_fn, optimizer = PairwiseRewardLoss(), torch.optim.Adam(reward_model.parameters(), lr=config.reward_lr)
    for _ in range(config.reward_steps):
        rewards = reward_model(x)
        losses, _ = loss_fn(rewards.gather(1, chosen[:, None])[:, 0], rewards.gather(1, rejected[:, None])[:, 0])
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
    return reward_model


def normalize_reward(rewards: torch.Tensor, ref_probs: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(r - mean) / std`` with mean and variance under x uniform, y ~ pi_ref (Ziegler et al., arXiv 1909.08593,
    Sec. 2); returns the normalized ``(n, n)`` table and the std it divided by."""
    mean = (ref_probs * rewards).sum(1).mean()
    std = (ref_probs * (rewards - mean) ** 2).sum(1).mean().sqrt()
    return (rewards - mean) / std, std.item()


def train_ppo(
    reference: nn.Module,
    rewards: torch.Tensor,
    kl_coef: float,
    config: SyntheticConfig,
    generator: torch.Generator,
) -> nn.Module:
    """PPO on a reward table: sample, per-token KL-penalized reward, whitened advantages, clipped loss.

    Responses are one token, so with no critic the advantage is the KL-penalized reward itself, whitened over the
    whole rollout batch (the paper's advantage normalization). ``rewards`` is the ``(n, n)`` table r(x, y) the
    learned reward model gives; ``kl_coef`` 0 is the control without the KL penalty.
    """
    if kl_coef < 0:
        raise ValueError(f"train_ppo: kl_coef must be >= 0 (0 is the control without the KL), got {kl_coef}.")
    n, k = config.num_prompts, config.ppo_samples_per_prompt
    prompts = torch.arange(n).repeat_interleave(k)  # (B,)
    x = torch.eye(n)[prompts]
    mask = torch.ones(n * k, 1)
    with torch.no_grad():
        ref_logp_all = torch.log_softmax(reference(x), dim=1)
    reward_all = rewards[prompts]  # (B, n)
    policy = _copy(reference, config)
    loss_fn, optimizer = PPOPolicyLoss(clip_eps=0.2), torch.optim.Adam(policy.parameters(), lr=config.ppo_lr)
    for _ in range(config.ppo_iterations):
        with torch.no_grad():
            old_logp_all = torch.log_softmax(policy(x), dim=1)
            responses = torch.multinomial(old_logp_all.exp(), 1, generator=generator)  # (B, 1)
            old_logprobs = old_logp_all.gather(1, responses)
            ref_logprobs = ref_logp_all.gather(1, responses)
            scores = reward_all.gather(1, responses)[:, 0]
            ppo_rewards = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef)
            advantages = masked_whiten(ppo_rewards, mask)
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
    """One seed: the statistics of each policy, of the reward model, and the tables for plotting."""

    seed: int
    reference: PolicyStats
    dpo: PolicyStats
    ppo: PolicyStats  # PPO with kl_coef = config.beta
    ppo_kl0: PolicyStats  # the control: the same reward, seed and PPO, kl_coef 0
    kl_optimum: PolicyStats  # closed form pi_ref * exp(r / beta) / Z: where PPO with the KL should converge
    dpo_final_loss: float
    reward_pair_accuracy: float
    reward_overrated: float  # fraction of prompts where the RM rates some out-of-data response above the optimal one
    reward_scale: float  # std of the raw RM under pi_ref (what normalize_reward divides by)
    tables: dict[str, list[list[float]]] = field(repr=False, compare=False)


def run_seed(seed: int, config: SyntheticConfig = SyntheticConfig()) -> SeedResult:
    """pi_ref by SFT, then DPO on the pairs, and a reward model + PPO (with and without KL) on the same pairs."""
    torch.manual_seed(seed)
    eye = torch.eye(config.num_prompts)
    reference = _train_reference(config)
    dpo, dpo_final_loss = train_dpo(reference, config)
    reward_model = train_reward_model(reference, config)
    with torch.no_grad():
        raw_rewards = reward_model(eye)  # (n, n)
        ref_logp = torch.log_softmax(reference(eye), dim=1)
    normalized, scale = normalize_reward(raw_rewards, ref_logp.exp())
    rewards = normalized if config.normalize_reward else raw_rewards
    # both PPO runs sample from a generator seeded alike, so they differ only in kl_coef
    ppo = train_ppo(reference, rewards, config.beta, config, torch.Generator().manual_seed(seed))
    ppo_kl0 = train_ppo(reference, rewards, 0.0, config, torch.Generator().manual_seed(seed))
    prompts, chosen, rejected = preference_pairs(config)
    accuracy = (raw_rewards[prompts, chosen] > raw_rewards[prompts, rejected]).float().mean().item()
    out_of_data_best = raw_rewards.masked_fill(in_data_mask(config), -torch.inf).max(1).values
    overrated = (out_of_data_best > raw_rewards.diagonal()).float().mean().item()
    probs = {
        "pi_ref": ref_logp.exp(),
        "DPO": _probs(dpo, config),
        "PPO": _probs(ppo, config),
        "PPO kl 0": _probs(ppo_kl0, config),
    }
    kl_optimum = torch.softmax(ref_logp + rewards / config.beta, dim=1)
    tables = {name: table.tolist() for name, table in probs.items()} | {"reward": rewards.tolist()}
    return SeedResult(
        seed,
        policy_stats(probs["pi_ref"], config),
        policy_stats(probs["DPO"], config),
        policy_stats(probs["PPO"], config),
        policy_stats(probs["PPO kl 0"], config),
        policy_stats(kl_optimum, config),
        dpo_final_loss,
        accuracy,
        overrated,
        scale,
        tables,
    )


def run_synthetic(seeds: int = 5, config: SyntheticConfig = SyntheticConfig()) -> list[SeedResult]:
    """``run_seed`` for seeds 0 .. seeds - 1."""
    return [run_seed(seed, config) for seed in range(seeds)]


def main(argv: list[str] | None = None) -> list[SeedResult]:
    """Run the seeds, print the markdown block, save the plot and, with ``--doc``, rewrite the doc's block."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--doc", type=Path, default=None, help="markdown file whose synthetic block to rewrite")
    parser.add_argument("--reward-from-scratch", action="store_true", help="reward_from_reference=False")
    parser.add_argument("--raw-reward", action="store_true", help="normalize_reward=False")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error(f"--seeds {args.seeds}: the paired standard errors need at least 2 seeds")
    torch.set_num_threads(1)  # tiny MLPs: threads only add overhead
    config = SyntheticConfig(reward_from_reference=not args.reward_from_scratch, normalize_reward=not args.raw_reward)
    results = run_synthetic(args.seeds, config)
    flags = [("--reward-from-scratch", args.reward_from_scratch), ("--raw-reward", args.raw_reward)]
    command = f"python -m recipes.paper.synthetic --seeds {args.seeds} --out {args.out}"
    command += "".join(f" {flag}" for flag, on in flags if on)
    command += f" --doc {args.doc}" if args.doc else ""
    block = render_doc_block(results, config, command)
    print(block)
    plot(results, in_data_mask(config), config, args.out / "synthetic_dpo_vs_ppo.png")
    print(f"\nplot: {args.out / 'synthetic_dpo_vs_ppo.png'}")
    if args.doc:
        write_doc_block(args.doc, block)
        print(f"rewrote the synthetic block of {args.doc}")
    return results


if __name__ == "__main__":
    main()
