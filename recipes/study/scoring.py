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
from recipes.modules.scalar_models import head_name
from recipes.study.testbed import GoldReward


@dataclass
class EvalSpec:
    """How methods are scored on the held-out prompts.

    Args:
        samples_per_prompt: responses sampled per held-out prompt; a prompt's score is their mean.
        max_new_tokens: response budget (longer than the gold reward's ``max_len``, so over-long answers can occur).
        batch_size: prompts per generation batch.
        curve_every_n_steps: `GoldCurve` interval in optimizer steps (PPO: iterations); 0 disables the curves.
        curve_prompts: held-out prompts per `GoldCurve` point.
        optimum_samples: SFT samples per held-out prompt for the KL-regularised optimum (`optimum_frontier`).
        optimum_betas: its KL coefficients.
    """

    samples_per_prompt: int = 4
    max_new_tokens: int = 16
    batch_size: int = 64
    curve_every_n_steps: int = 10
    curve_prompts: int = 32
    optimum_samples: int = 256
    optimum_betas: tuple[float, ...] = (0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


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
    """What a response looks like: its length, its share of foreign characters (outside the alphabet: no SFT
    demonstration and no preference pair holds them), whether it is longer than the gold reward's ``max_len`` (as no
    demonstration or pair is), whether it is out of the data's support (too long or any foreign character), and its
    share of good letters (`GoldReward.good`)."""
    n = len(response)
    foreign = sum(c not in gold.alphabet for c in response)
    hits = sum(c in set(gold.good(prompt)) for c in response)
    return {"length": float(n), "foreign_frac": foreign / n if n else 0.0, "too_long": float(n > gold.max_len),
            "out_of_support": float(n > gold.max_len or foreign > 0), "good_frac": hits / n if n else 0.0}


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


def optimum_frontier(gold: torch.Tensor, betas: Sequence[float]) -> list[dict[str, float]]:
    """The KL-regularised optimum of the gold reward, ``pi*(y|x) ∝ pi_ref(y|x) exp(gold(x, y) / beta)`` (Rafailov et
    al. arXiv 2305.18290, Eq. 4), estimated by self-normalised importance sampling from ``N`` samples of ``pi_ref``
    per prompt: weights ``w = softmax(gold / beta)`` over a prompt's samples give ``E_pi*[gold] ~ sum w gold`` and
    ``KL(pi* || pi_ref) ~ sum w log(N w)``, averaged over prompts. The KL estimate cannot exceed ``log N``; ``ess``
    (the mean effective sample size ``1 / sum w^2``) says how many samples carry the estimate.

    Args:
        gold: gold rewards of the reference's samples. Shape: (prompts, N)
        betas: the KL coefficients to evaluate.
    Returns:
        One ``{beta, gold, kl, ess}`` per beta.
    """
    n = gold.shape[1]
    out = []
    for beta in betas:
        w = torch.softmax(gold.double() / beta, dim=1)
        kl = (w * torch.log(n * w.clamp_min(1e-300))).sum(1)
        out.append({"beta": float(beta), "gold": float((w * gold).sum(1).mean()), "kl": float(kl.mean()),
                    "ess": float((1.0 / (w ** 2).sum(1)).mean())})
    return out


@torch.no_grad()
def kl_regularised_optimum(reference: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                           gold: GoldReward, spec: EvalSpec, seed: int) -> list[dict[str, float]]:
    """`optimum_frontier` over ``spec.optimum_betas`` from ``spec.optimum_samples`` samples of ``reference`` per
    prompt: the ceiling of gold reward any KL-anchored method can reach at a given KL to the reference."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    repeated = [p for p in prompts for _ in range(spec.optimum_samples)]
    texts, _ = sample_responses(reference.eval(), tokenizer, repeated, spec.max_new_tokens, spec.batch_size,
                                generator)
    scores = gold(repeated, texts).view(len(prompts), spec.optimum_samples)
    return optimum_frontier(scores, spec.optimum_betas)


def pairwise_accuracy(scores_a: torch.Tensor, scores_b: torch.Tensor) -> float:
    """Share of pairs where ``a`` outscores ``b``, ties counting half."""
    return float(((scores_a > scores_b).float() + 0.5 * (scores_a == scores_b).float()).mean())


@torch.no_grad()
def evaluate_reward_model(reward_dir: str, test_pairs: str, reference: nn.Module,
                          tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], gold: GoldReward,
                          spec: EvalSpec, seed: int) -> dict[str, Any]:
    """A reward model against its labels and against the gold reward where the policies live:

    - ``accuracy``: agreement with the sampled labels of the held-out pairs (``test_pairs``, written by the testbed),
      beside ``bayes_accuracy``, the expected agreement of the gold reward's own ordering with those labels (the
      most any model can reach);
    - ``gold_accuracy``: agreement with the gold reward's ordering on the same pairs (ties in gold left out);
    - ``sft_gold_accuracy``: the same on pairs of the reference (SFT) policy's own samples on held-out prompts, where
      PPO and DPO-Iter read the reward model (ties in gold left out).
    """
    from recipes.modules.reward_functions import SequenceClassifierReward
    from recipes.study.testbed import bayes_accuracy

    learned = SequenceClassifierReward(reward_dir)
    with open(test_pairs, encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    ps = [r["prompt"] for r in pairs]
    chosen, rejected = learned(ps, [r["chosen"] for r in pairs]), learned(ps, [r["rejected"] for r in pairs])
    g_c, g_r = torch.tensor([r["gold_chosen"] for r in pairs]), torch.tensor([r["gold_rejected"] for r in pairs])
    untied = g_c != g_r
    sign = torch.where(g_c > g_r, 1.0, -1.0)[untied]
    out = {"accuracy": pairwise_accuracy(chosen, rejected), "bayes_accuracy": bayes_accuracy(pairs),
           "gold_accuracy": pairwise_accuracy(sign * chosen[untied], sign * rejected[untied])}
    generator = torch.Generator().manual_seed(20_000 + seed)
    repeated = [p for p in prompts for _ in range(2 * spec.samples_per_prompt)]
    texts, _ = sample_responses(reference.eval(), tokenizer, repeated, spec.max_new_tokens, spec.batch_size,
                                generator)
    learned_scores, gold_scores = learned(repeated, texts), gold(repeated, texts)
    a, b = slice(0, None, 2), slice(1, None, 2)
    untied = gold_scores[a] != gold_scores[b]
    sign = torch.where(gold_scores[a] > gold_scores[b], 1.0, -1.0)[untied]
    out["sft_gold_accuracy"] = pairwise_accuracy(sign * learned_scores[a][untied], sign * learned_scores[b][untied])
    out["sft_pairs"] = int(untied.sum())
    out["probes"] = probe_reward_model(reward_dir, prompts, gold)
    standardization = Path(reward_dir) / "standardization.json"
    if standardization.exists():
        out["standardization"] = json.loads(standardization.read_text(encoding="utf-8"))
    return out


@torch.no_grad()
def standardize_reward_model(reward_dir: str, sft_dir: str, prompts: Sequence[str], gold: GoldReward,
                             spec: EvalSpec, seed: int) -> dict[str, float]:
    """Put an exported reward model on the gold reward's scale where the policies start: sample the SFT policy on
    ``prompts`` (``spec.samples_per_prompt`` each), and multiply the reward head's weights by ``std(gold) /
    std(learned)`` over those samples, so one unit of learned reward is one unit of gold and a KL coefficient means
    the same on every seed and track. (A shift changes no policy-gradient method's optimum and the Llama head has
    no bias: it is recorded, not applied.) Writes ``standardization.json`` into ``reward_dir``; returns its content.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from recipes.modules.reward_functions import SequenceClassifierReward
    from recipes.modules.tokenizer import load_tokenizer

    sft = AutoModelForCausalLM.from_pretrained(sft_dir)
    generator = torch.Generator().manual_seed(30_000 + seed)
    repeated = [p for p in prompts for _ in range(spec.samples_per_prompt)]
    texts, _ = sample_responses(sft.eval(), load_tokenizer(sft_dir), repeated, spec.max_new_tokens, spec.batch_size,
                                generator)
    learned, gold_scores = SequenceClassifierReward(reward_dir)(repeated, texts), gold(repeated, texts)
    scale = float(gold_scores.std() / learned.std().clamp_min(1e-8))
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    getattr(model, head_name(model)).weight.mul_(scale)
    model.save_pretrained(reward_dir)
    info = {"scale": scale, "learned_mean": float(learned.mean()), "learned_std": float(learned.std()),
            "gold_mean": float(gold_scores.mean()), "gold_std": float(gold_scores.std()), "samples": len(texts)}
    (Path(reward_dir) / "standardization.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return info


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


def ood_probes(good: str) -> dict[str, str]:
    """Hand-made responses of good letters ``good`` (`GoldReward.good`), inside and outside the preference data's
    support (lengths 1-8, alphabet letters only): what a learned reward model says about them is an extrapolation
    the gold reward can check."""
    x = (good * 3)[:3]
    return {"good letters, length 6 (in support)": (x * 2)[:6], "good letters, length 16 (too long)": (x * 6)[:16],
            "good letters, length 1 (too short)": x[0], "good letters + upper case": x + x.upper(),
            "good letters + digits": x + "123", "good letters + spaces": " ".join(x + x[0])}


@torch.no_grad()
def probe_reward_model(reward_dir: str, prompts: Sequence[str], gold: GoldReward) -> list[dict[str, Any]]:
    """Mean learned reward and gold reward of each `ood_probes` response over ``prompts``."""
    from recipes.modules.reward_functions import SequenceClassifierReward

    learned = SequenceClassifierReward(reward_dir)
    names = list(ood_probes(gold.good(prompts[0])))
    rows = []
    for name in names:
        responses = [ood_probes(gold.good(p))[name] for p in prompts]
        rows.append({"probe": name, "learned_reward": float(learned(list(prompts), responses).mean()),
                     "gold": float(gold(list(prompts), responses).mean())})
    return rows
