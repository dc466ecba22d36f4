"""The bare PPO floor of `benchmarks/ppo_iteration.py`: PPOModule's iteration (sampling on a KV cache, reward-model
scoring at the last token, old / reference log-probs and values, KL-penalised rewards, GAE, whitening, clipped policy
and value losses, one AdamW step per model per minibatch) written as a plain loop in its cheapest exact form: the
heads applied only at the positions that are read, prompts' left padding trimmed, no pad tail past the longest
response. `tests/benchmarks/test_ppo_floor.py` checks its math against the module's own functions."""

from __future__ import annotations

import statistics
import time

from benchmarks.common import BENCH_LLAMA, gathered_logprobs, hidden_at


class BarePPO:
    """The floor: PPOModule's iteration with its default hyperparameters, as a plain loop (see the module docstring).

    Args:
        reward: a reward-model folder, or a `RewardFunction` called on the decoded texts as PPOModule calls it.
        new_tokens, epochs, mini_batch_size: as PPOModule's ``max_new_tokens``, ``ppo_epochs``, ``mini_batch_size``.
    """

    kl_coef, gamma, lam, clip_eps, value_clip_eps = 0.1, 1.0, 1.0, 0.2, 0.2  # PPOModule's defaults
    reward_clip, max_grad_norm, lr = 20.0, 1.0, 1e-5

    def __init__(self, reward, new_tokens: int, epochs: int, mini_batch_size: int, seed: int = 1) -> None:
        import copy

        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        from recipes.modules.tokenizer import load_tokenizer

        self.tok, self.new_tokens = load_tokenizer("builtin:byte"), new_tokens
        self.epochs, self.mini = epochs, mini_batch_size
        self.policy = AutoModelForCausalLM.from_config(AutoConfig.for_model(**BENCH_LLAMA))
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.critic = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**BENCH_LLAMA, num_labels=1))
        self.reward_model, self.reward_fn = None, reward
        if isinstance(reward, str):
            self.reward_model = AutoModelForSequenceClassification.from_pretrained(reward).eval().requires_grad_(False)
        self.opts = [torch.optim.AdamW(m.parameters(), lr=self.lr, weight_decay=0.0)
                     for m in (self.policy, self.critic)]
        self.generator = torch.Generator().manual_seed(seed)

    def iteration(self, prompt_ids, prompt_mask, prompts: list[str]) -> dict:
        """One iteration; returns the seconds of each phase (as PPOModule logs them) and the update statistics."""
        t0, cpu = time.perf_counter(), time.process_time()
        traj, times = self.rollout(prompt_ids, prompt_mask, prompts)
        t1 = time.perf_counter()
        stats = self.update(traj)
        t2 = time.perf_counter()
        return {**times, "rollout": t1 - t0, "train": t2 - t1, "iteration": t2 - t0,
                "iteration_cpu": time.process_time() - cpu, **stats}

    def sample(self, ids, mask):
        """``new_tokens`` draws from the policy's softmax on a KV cache, stopping when every row has emitted EOS."""
        import torch

        from recipes.modules.generation import CACHE, preallocated_cache

        (b, p), eos, pad = ids.shape, self.tok.eos_token_id, self.tok.pad_token_id
        full_mask = mask.new_ones(b, p + self.new_tokens)
        full_mask[:, :p] = mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        tokens = ids.new_full((b, self.new_tokens), pad)
        done, lengths = torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.long)
        with torch.no_grad():
            out = self.policy.eval()(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                     logits_to_keep=1, **{CACHE: preallocated_cache(self.policy, p + self.new_tokens)})
            for t in range(self.new_tokens):
                logits = out.logits[:, -1].float()  # (B, V)
                cum = (logits - logits.amax(-1, keepdim=True)).exp().double().cumsum(-1)  # inverse-CDF draw
                u = torch.rand((b, 1), dtype=torch.float64, generator=self.generator) * cum[:, -1:]
                token = torch.searchsorted(cum, u, right=True).clamp(max=cum.shape[1] - 1).squeeze(-1)
                token = token.masked_fill(done, pad)
                tokens[:, t], lengths = token, lengths + ~done
                done |= token == eos
                if t + 1 == self.new_tokens or bool(done.all()):
                    break
                out = self.policy(input_ids=token[:, None], attention_mask=full_mask[:, :p + t + 1],
                                  position_ids=positions[:, -1:] + t + 1, use_cache=True,
                                  **{CACHE: getattr(out, CACHE)})
        self.policy.train()
        width = int(lengths.max())  # no pad tail past the longest response
        return tokens[:, :width], (torch.arange(width)[None] < lengths[:, None]).long()

    def score(self, prompts: list[str], response_ids, response_mask):
        """Decode, then the reward model's head at each row's last token of ``prompt + response + eos`` (its own
        tokenization, as `SequenceClassifierReward` builds it), clipped to ``reward_clip``. Shape: (B,)"""
        import torch

        tok = self.tok
        texts = tok.batch_decode([r[:int(m.sum())] for r, m in zip(response_ids, response_mask)],
                                 skip_special_tokens=True)
        if self.reward_model is None:
            return self.reward_fn(prompts, texts, None).float().clamp(-self.reward_clip, self.reward_clip)
        rows = [p + r + [tok.eos_token_id] for p, r in zip(tok(prompts, add_special_tokens=True)["input_ids"],
                                                           tok(texts, add_special_tokens=False)["input_ids"])]
        lengths = torch.tensor([len(r) for r in rows])
        ids = torch.full((len(rows), int(lengths.max())), tok.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        with torch.no_grad():
            hidden = self.reward_model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            last = hidden[torch.arange(len(rows)), lengths - 1]  # (B, H)
            scores = self.reward_model.score(last).squeeze(-1).float()
        return scores.clamp(-self.reward_clip, self.reward_clip)

    def values(self, input_ids, attention_mask, targets):
        """The critic's value head only at the positions that predict a response token. Shape: (N,)"""
        return self.critic.score(hidden_at(self.critic, input_ids, attention_mask, targets)).squeeze(-1).float()

    def rollout(self, prompt_ids, prompt_mask, prompts: list[str]) -> tuple[dict, dict]:
        import torch

        keep = int(prompt_mask.any(0).nonzero()[0])  # left padding trimmed to the longest prompt
        prompt_ids, prompt_mask = prompt_ids[:, keep:], prompt_mask[:, keep:]
        t0 = time.perf_counter()
        response_ids, response_mask = self.sample(prompt_ids, prompt_mask)
        t1 = time.perf_counter()
        scores = self.score(prompts, response_ids, response_mask)  # (B,)
        t2 = time.perf_counter()
        input_ids = torch.cat([prompt_ids, response_ids], 1)  # (B, P + R)
        attention_mask = torch.cat([prompt_mask, response_mask], 1)
        m = response_mask.bool()  # (B, R)
        targets = torch.nn.functional.pad(m, (prompt_ids.shape[1], 0))  # (B, P + R): the response tokens
        with torch.no_grad():
            self.policy.eval(), self.critic.eval()
            old_logprobs, entropy = gathered_logprobs(self.policy, input_ids, attention_mask, targets, True)  # (N,)
            ref_logprobs, _ = gathered_logprobs(self.reference, input_ids, attention_mask, targets)
            values = self.values(input_ids, attention_mask, targets)
            self.policy.train(), self.critic.train()
            grid = lambda flat: torch.zeros(m.shape).masked_scatter(m, flat)  # noqa: E731  (N,) -> (B, R), row-major
            rewards = grid(-self.kl_coef * (old_logprobs - ref_logprobs))
            rewards[torch.arange(m.shape[0]), m.sum(1) - 1] += scores  # the score on the last response token
            returns = gae_returns(rewards, grid(values), m, self.gamma, self.lam)[m]  # (N,)
            advantages = whiten(returns - values)  # over the whole rollout
        traj = {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets,
                "token_row": m.nonzero()[:, 0], "old_logprobs": old_logprobs, "values": values, "returns": returns,
                "advantages": advantages}
        return traj, {"generate": t1 - t0, "score": t2 - t1, "entropy": float(entropy.mean())}

    def update(self, traj: dict) -> dict:
        """``epochs`` shuffled passes of ``mini_batch_size`` rows: clipped policy and value loss, one backward, each
        model's gradient norm clipped, one AdamW step each."""
        import torch

        n, stats = traj["input_ids"].shape[0], []
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=self.generator) if self.mini < n else torch.arange(n)
            for start in range(0, n, self.mini):
                rows = order[start:start + self.mini].sort().values  # ascending: tokens stay row-major
                tokens = torch.isin(traj["token_row"], rows)
                ids, att, targets = trim(traj["input_ids"][rows], traj["attention_mask"][rows], traj["targets"][rows])
                logprobs, _ = gathered_logprobs(self.policy, ids, att, targets)  # (N_mb,)
                values = self.values(ids, att, targets)
                loss, approx_kl, clipfrac = floor_losses(logprobs, values, *(traj[k][tokens] for k in (
                    "old_logprobs", "advantages", "values", "returns")), self.clip_eps, self.value_clip_eps)
                loss.backward()
                for model, opt in zip((self.policy, self.critic), self.opts):
                    torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                stats.append((float(loss.detach()), float(approx_kl), float(clipfrac)))
        return {"loss": statistics.mean(s[0] for s in stats), "approx_kl": statistics.mean(s[1] for s in stats)}


def trim(input_ids, attention_mask, targets):
    """Drop the columns left of every row's first token and right of the last response token. Shapes: (b, t)"""
    first, last = int(attention_mask.any(0).nonzero()[0]), int(targets.any(0).nonzero()[-1])
    return input_ids[:, first:last + 1], attention_mask[:, first:last + 1], targets[:, first:last + 1]


def gae_returns(rewards, values, mask, gamma: float, lam: float):
    """GAE returns ``A_t + V_t`` (arXiv 1506.02438, Eq. 16) on right-padded ``(B, R)`` grids, 0 after each row's
    end; with ``gamma = lam = 1`` they are the reverse cumulative sums of the rewards."""
    import torch

    if gamma == lam == 1.0:
        return rewards.flip(1).cumsum(1).flip(1) * mask
    advantages, last = torch.zeros_like(values), torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_values = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        last = rewards[:, t] + gamma * next_values - values[:, t] + gamma * lam * last
        advantages[:, t] = last
    return (advantages + values) * mask


def whiten(x):
    """``(x - mean) / sqrt(var + 1e-8)`` over a flat ``(N,)`` tensor, the unbiased variance (as PPOModule's)."""
    import torch

    return (x - x.mean()) * torch.rsqrt(x.var() + 1e-8)


def floor_losses(logprobs, values, old_logprobs, advantages, old_values, returns, clip_eps: float,
                 value_clip_eps: float):
    """PPO's clipped policy loss (arXiv 1707.06347, Eq. 7) plus the clipped value loss, each the mean over the
    minibatch's response tokens; all inputs flat ``(N,)``. Returns ``(loss, approx_kl, clipfrac)``."""
    import torch

    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    values_clipped = old_values + (values - old_values).clamp(-value_clip_eps, value_clip_eps)
    value_loss = 0.5 * torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2).mean()
    with torch.no_grad():
        approx_kl, clipfrac = ((ratio - 1) - log_ratio).mean(), (clipped > unclipped).float().mean()
    return policy_loss + value_loss, approx_kl, clipfrac
