"""Scoring a policy on the study's held-out prompts (gold reward, learned reward, KL to the SFT policy, what its
responses look like), and `GoldCurve`, the callback that records the gold reward over training."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from recipes.datamodules.collate import pad_prompts
from recipes.evaluate.metrics import sequence_kl
from recipes.modules.generation import sample
from recipes.study.testbed import GoldReward, prompt_letters


@dataclass
class EvalSpec:
    """How methods are scored on the held-out prompts.

    Args:
        samples_per_prompt: responses sampled per held-out prompt; a prompt's score is their mean.
        max_new_tokens: response budget (longer than the gold reward's ``max_len``, so over-long answers can occur).
        batch_size: prompts per generation batch.
        curve_every_n_steps: `GoldCurve` interval in optimizer steps (PPO: iterations); 0 disables the curves.
        curve_prompts: held-out prompts per `GoldCurve` point.
    """

    samples_per_prompt: int = 4
    max_new_tokens: int = 16
    batch_size: int = 64
    curve_every_n_steps: int = 10
    curve_prompts: int = 32


@torch.no_grad()
def sample_responses(policy: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                     max_new_tokens: int, batch_size: int, generator: torch.Generator) -> tuple[list[str], list[Any]]:
    """Sample one response per prompt at temperature 1 (no top-k/top-p, so the KL estimate is unbiased); returns
    the texts and, per batch, the tensors ``sequence_kl`` needs (input_ids, attention_mask, P, response_mask)."""
    texts, batches = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        rows = [{"input_ids": tokenizer(p, add_special_tokens=True)["input_ids"], "prompt": p, "metadata": {}}
                for p in chunk]
        batch = pad_prompts(rows, tokenizer.pad_token_id)
        gen = sample(policy, batch["input_ids"], batch["attention_mask"], max_new_tokens, tokenizer.eos_token_id,
                     tokenizer.pad_token_id, temperature=1.0, generator=generator)
        texts += tokenizer.batch_decode([ids[:int(m.sum())] for ids, m in zip(gen.response_ids, gen.response_mask)],
                                        skip_special_tokens=True)
        input_ids = torch.cat([batch["input_ids"], gen.response_ids], dim=1)  # (B, P + R)
        attention_mask = torch.cat([batch["attention_mask"], gen.response_mask], dim=1)
        batches.append((input_ids, attention_mask, batch["input_ids"].shape[1], gen.response_mask, gen.ended_with_eos))
    return texts, batches


def response_shape(prompt: str, response: str, gold: GoldReward) -> dict[str, float]:
    """What a response looks like: its length, its share of foreign characters (outside the alphabet: the SFT
    policy never writes them), whether it is longer than the gold reward's ``max_len``, its share of prompt letters."""
    n = len(response)
    foreign = sum(c not in gold.alphabet for c in response)
    hits = sum(c in set(prompt_letters(prompt)) for c in response)
    return {"length": float(n), "foreign_frac": foreign / n if n else 0.0, "too_long": float(n > gold.max_len),
            "prompt_frac": hits / n if n else 0.0}


@torch.no_grad()
def evaluate_policy(policy: nn.Module, reference: nn.Module, tokenizer: PreTrainedTokenizerBase,
                    prompts: Sequence[str], gold: GoldReward, learned: Any | None, spec: EvalSpec,
                    seed: int) -> dict[str, Any]:
    """Score ``policy`` on ``prompts``: per-prompt mean gold reward (for win-rates), and the means of the gold reward,
    the learned reward (``learned``: a `recipes.modules.reward_functions.RewardFunction`, or None), the sequence KL to
    ``reference``
    (`recipes.evaluate.metrics.sequence_kl` on the policy's own samples) and the response-shape statistics."""
    policy.eval(), reference.eval()
    generator = torch.Generator().manual_seed(seed)
    repeated = [p for p in prompts for _ in range(spec.samples_per_prompt)]
    texts, batches = sample_responses(policy, tokenizer, repeated, spec.max_new_tokens, spec.batch_size, generator)
    gold_scores = gold(repeated, texts)  # (N,)
    kl = torch.cat([sequence_kl(policy, reference, ids, att, P, mask) for ids, att, P, mask, _ in batches])
    eos = torch.cat([b[4] for b in batches]).float()
    shapes = [response_shape(p, r, gold) for p, r in zip(repeated, texts)]
    out: dict[str, Any] = {
        "gold": float(gold_scores.mean()), "kl": float(kl.mean()), "eos_rate": float(eos.mean()),
        "per_prompt_gold": gold_scores.view(len(prompts), spec.samples_per_prompt).mean(1).tolist(),
        "examples": [{"prompt": p, "response": r, "gold": float(g)}
                     for p, r, g in list(zip(repeated, texts, gold_scores.tolist()))[:8]],
    }
    for key in shapes[0]:
        out[key] = sum(s[key] for s in shapes) / len(shapes)
    out["learned_reward"] = float(learned(repeated, texts).mean()) if learned is not None else float("nan")
    return out


class GoldCurve(Callback):
    """Every ``every_n_steps`` optimizer steps (PPO: iterations), sample one response per held-out prompt at
    temperature 1 and record the mean gold reward; written to ``path`` as JSON rows ``{step, gold}`` at fit end.

    Example::

        trainer = L.Trainer(callbacks=[GoldCurve("runs/study/seed0/heldout_prompts.jsonl", "curve.json")])

    Args:
        prompts_file: JSONL of ``{prompt}`` rows (the held-out prompts); the first ``num_prompts`` are used.
        path: where the curve is written.
        every_n_steps: interval in ``trainer.global_step``; the curve also has a point at step 0 and at the end.
        num_prompts, max_new_tokens: what each point samples.
        gold: settings of `recipes.study.testbed.GoldReward`.
        policy_attr: the module attribute holding the policy.
    """

    def __init__(self, prompts_file: str, path: str, every_n_steps: int = 10, num_prompts: int = 32,
                 max_new_tokens: int = 16, gold: dict[str, Any] | None = None, policy_attr: str = "policy") -> None:
        with open(prompts_file, encoding="utf-8") as f:
            self.prompts = [json.loads(line)["prompt"] for line in f if line.strip()][:num_prompts]
        if not self.prompts:
            raise ValueError(f"GoldCurve: {prompts_file} holds no prompts; it needs JSONL rows with a 'prompt' field.")
        self.path, self.every_n_steps, self.max_new_tokens = path, every_n_steps, max_new_tokens
        self.gold, self.policy_attr = GoldReward(**(gold or {})), policy_attr
        self.points: list[dict[str, float]] = []
        self.generator = torch.Generator().manual_seed(0)

    def should_record(self, step: int) -> bool:
        """Whether to add a point after the optimizer step that brought ``global_step`` to ``step``."""
        seen = {p["step"] for p in self.points}
        return self.every_n_steps > 0 and step % self.every_n_steps == 0 and step not in seen

    def record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Add the point of the current ``global_step``."""
        policy = getattr(pl_module, self.policy_attr)
        texts, _ = sample_responses(policy, pl_module.tokenizer, self.prompts, self.max_new_tokens, len(self.prompts),
                                    self.generator)
        self.points.append({"step": trainer.global_step, "gold": float(self.gold(self.prompts, texts).mean())})

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Point at step 0: the starting policy."""
        self.record(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """A point every ``every_n_steps`` optimizer steps (global_step is 1 after the first one)."""
        if self.should_record(trainer.global_step):
            self.record(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Last point (if the final step was not on the grid), then write the curve."""
        if trainer.global_step not in {p["step"] for p in self.points}:
            self.record(trainer, pl_module)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.path).write_text(json.dumps(self.points), encoding="utf-8")


def ood_probes(prompt: str) -> dict[str, str]:
    """Hand-made responses to one prompt, inside and outside the preference data's support (lengths 1-8, letters and
    upper case only): what a learned reward model says about them is an extrapolation the gold reward can check."""
    x = prompt_letters(prompt)
    return {"prompt letters, length 6 (in support)": (x * 2)[:6], "prompt letters, length 16 (too long)": (x * 6)[:16],
            "prompt letters, length 1 (too short)": x[0], "prompt letters + upper case": x + x.upper(),
            "prompt letters + digits": x + "123", "prompt letters + spaces": " ".join(x + x[0])}


@torch.no_grad()
def probe_reward_model(reward_dir: str, prompts: Sequence[str], gold: GoldReward) -> list[dict[str, Any]]:
    """Mean learned reward and gold reward of each `ood_probes` response over ``prompts``."""
    from recipes.modules.reward_functions import SequenceClassifierReward

    learned = SequenceClassifierReward(reward_dir)
    names = list(ood_probes(prompts[0]))
    rows = []
    for name in names:
        responses = [ood_probes(p)[name] for p in prompts]
        rows.append({"probe": name, "learned_reward": float(learned(list(prompts), responses).mean()),
                     "gold": float(gold(list(prompts), responses).mean())})
    return rows
