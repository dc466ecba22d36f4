"""The study's gold-reward testbeds: synthetic letter-writing tasks whose true reward is code (`GoldReward`), an SFT
teacher, writers of preference pairs (the behaviour policies), Bradley-Terry labels on the gold reward and held-out
prompts. Two kinds of gold: the prompt's own letters are good (a prompt-conditional task, hard for a small reward
model to learn: Track A uses the gold reward itself, as unit tests are the reward on code) or a fixed lexicon of good
letters (learnable, like a sentiment lexicon: Track B learns a reward model from the pairs). Everything is built in
and seeded; nothing is downloaded."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ALPHABET = "abcdefgh"
PROMPT_SUFFIX = ":"


def prompt_letters(prompt: str) -> str:
    """The letters a prompt names: ``"bdg:"`` -> ``"bdg"``."""
    return prompt.removesuffix(PROMPT_SUFFIX)


class GoldReward:
    """The testbed's true reward of a response ``y`` to a prompt ``x`` (three distinct letters of ``alphabet``).

    ``gold(x, y) = mean_c s(c) - length_penalty * dist(len(y), [min_len, max_len])`` where each character scores
    ``s(c) = +1`` if it is a good letter, ``0`` if it is another letter of the alphabet and ``-1`` otherwise (upper
    case, digits, spaces, ...). The good letters are the prompt's letters, or the fixed ``lexicon`` when one is given
    (the prompt is then only context). The empty response has mean 0. So a perfect response is 1.0, and a response
    outside the task's shape (foreign characters, too long, too short) is punished however plausible it looks to a
    learned model.

    Example::

        GoldReward()(["abc:", "abc:"], ["aabb", "AB"])  # tensor([1.0, -1.5]): -1 for foreign chars, -0.5 for 2 short
        GoldReward(lexicon="ab")(["fgh:"], ["aabb"])  # tensor([1.0]): the lexicon's letters are good for any prompt

    Args:
        alphabet: the letters of the task.
        min_len, max_len: the response lengths that carry no penalty.
        length_penalty: reward lost per character of distance from ``[min_len, max_len]``.
        lexicon: fixed good letters (a subset of ``alphabet``); None: the prompt's letters.
    """

    def __init__(self, alphabet: str = ALPHABET, min_len: int = 4, max_len: int = 8, length_penalty: float = 0.25,
                 lexicon: str | None = None) -> None:
        if not 0 < min_len <= max_len:
            raise ValueError(f"GoldReward: need 0 < min_len <= max_len, got {min_len}, {max_len}.")
        if lexicon is not None and (not lexicon or not set(lexicon) <= set(alphabet)):
            raise ValueError(f"GoldReward: lexicon {lexicon!r} must be non-empty letters of the alphabet {alphabet!r}.")
        self.alphabet, self.min_len, self.max_len, self.length_penalty = set(alphabet), min_len, max_len, length_penalty
        self.lexicon = lexicon

    def good(self, prompt: str) -> str:
        """The good letters for ``prompt``: the lexicon, or the prompt's letters."""
        return self.lexicon if self.lexicon is not None else prompt_letters(prompt)

    def score(self, prompt: str, response: str) -> float:
        """The gold reward of one response (see the class docstring)."""
        wanted = set(self.good(prompt))
        chars = [1.0 if c in wanted else 0.0 if c in self.alphabet else -1.0 for c in response]
        quality = sum(chars) / len(chars) if chars else 0.0
        n = len(response)
        distance = max(0, self.min_len - n) + max(0, n - self.max_len)
        return quality - self.length_penalty * distance

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> torch.Tensor:
        """`recipes.modules.reward_functions.RewardFunction`: one gold score per (prompt, response)."""
        return torch.tensor([self.score(p, r) for p, r in zip(prompts, responses)], dtype=torch.float32)


@dataclass
class Writer:
    """A synthetic writer of responses: length uniform in ``[min_len, max_len]``; each character is a good letter
    (`GoldReward.good`) with probability ``p_good``, an upper-case alphabet letter with ``p_upper``, and otherwise
    another (lower-case, not good) alphabet letter. With ``p_good_spread > 0`` each response draws its own ``p_good``
    uniformly from ``p_good ± p_good_spread`` (clipped to what ``p_upper`` leaves), so responses differ in quality
    along the axis the gold reward cares about, not only by chance."""

    p_good: float = 0.5
    p_upper: float = 0.0
    min_len: int = 4
    max_len: int = 8
    p_good_spread: float = 0.0

    def __post_init__(self) -> None:
        if not (0 <= self.p_good and 0 <= self.p_upper and self.p_good + self.p_upper <= 1):
            raise ValueError(f"Writer: need p_good, p_upper >= 0 with sum <= 1, got {self.p_good}, {self.p_upper}.")
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(f"Writer: need 0 <= min_len <= max_len, got {self.min_len}, {self.max_len}.")

    def write(self, good: str, rng: random.Random, alphabet: str = ALPHABET) -> str:
        """One response whose good letters are ``good``."""
        others = [c for c in alphabet if c not in good]
        out, p_good = [], self.p_good
        if self.p_good_spread > 0:
            p_good = min(max(rng.uniform(p_good - self.p_good_spread, p_good + self.p_good_spread), 0.0),
                         1.0 - self.p_upper)
        for _ in range(rng.randint(self.min_len, self.max_len)):
            u = rng.random()
            if u < p_good:
                out.append(rng.choice(good))
            elif u < p_good + self.p_upper:
                out.append(rng.choice(alphabet).upper())
            else:
                out.append(rng.choice(others))
        return "".join(out)


@dataclass
class PairSpec:
    """One set of preference pairs: both responses of a pair from ``writer`` (the behaviour policy), labelled by
    Bradley-Terry on the gold reward.

    Args:
        writer: the behaviour policy. The SFT teacher's settings give the no-shift control.
        num: pairs on the training prompts; ``num_test`` more on the held-out prompts (reward-model accuracy).
        max_gold: redraw any response whose gold reward is above this (the coverage variant: no pair holds a
            near-optimal response); None keeps every response.
    """

    writer: Writer = field(default_factory=Writer)
    num: int = 2000
    num_test: int = 500
    max_gold: float | None = None


@dataclass
class TestbedSpec:
    """What one track's testbed generates (all of it seeded by the study seed).

    Args:
        alphabet: task letters; prompts are every ordered triple of distinct letters plus ``:``.
        heldout_fraction: share of prompts kept out of every training stage (evaluation only).
        sft_teacher: writes the SFT demonstrations (the SFT policy imitates it).
        pairs: named preference-pair sets (``NAME.jsonl``, ``NAME_preferred.jsonl`` and ``NAME_test.jsonl``).
        num_sft: SFT demonstrations.
        bt_temperature: Bradley-Terry labels, ``P(y1 preferred) = sigmoid((gold1 - gold2) / bt_temperature)``.
        gold: the gold reward's settings (`GoldReward`'s arguments other than ``alphabet``).
    """

    __test__ = False  # not a pytest class
    alphabet: str = ALPHABET
    heldout_fraction: float = 0.2
    sft_teacher: Writer = field(default_factory=Writer)
    pairs: dict[str, PairSpec] = field(default_factory=lambda: {"pairs": PairSpec(
        Writer(p_good=0.4, p_upper=0.1, min_len=1, max_len=8, p_good_spread=0.4))})
    num_sft: int = 2000
    bt_temperature: float = 0.25
    gold: dict[str, Any] = field(default_factory=dict)

    def gold_reward(self) -> GoldReward:
        return GoldReward(alphabet=self.alphabet, **self.gold)

    def gold_args(self) -> dict[str, Any]:
        """`GoldReward`'s arguments (for a config's ``init_args``)."""
        return {"alphabet": self.alphabet, **self.gold}


def split_prompts(spec: TestbedSpec, seed: int) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts): every ordered triple of distinct letters, shuffled by ``seed``."""
    prompts = ["".join(t) + PROMPT_SUFFIX for t in itertools.permutations(spec.alphabet, 3)]
    random.Random(seed).shuffle(prompts)
    n_held = max(1, round(spec.heldout_fraction * len(prompts)))
    return prompts[n_held:], prompts[:n_held]


def preference_probability(gold_a: float, gold_b: float, temperature: float) -> float:
    """Bradley-Terry ``P(a preferred to b) = sigmoid((gold_a - gold_b) / temperature)`` (Xu et al. 2404.10719,
    Eq. 1)."""
    return 1.0 / (1.0 + math.exp(-(gold_a - gold_b) / temperature))


def bradley_terry_pair(prompt: str, a: str, b: str, gold: GoldReward, temperature: float,
                       rng: random.Random) -> dict[str, Any]:
    """Label one pair by sampling the Bradley-Terry model on the gold reward; ``p_chosen`` is the probability the
    label had (the Bayes-optimal classifier is right with probability ``max(p, 1 - p)``)."""
    ga, gb = gold.score(prompt, a), gold.score(prompt, b)
    p_a = preference_probability(ga, gb, temperature)
    a_wins = rng.random() < p_a
    chosen, rejected = (a, b) if a_wins else (b, a)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "gold_chosen": ga if a_wins else gb,
            "gold_rejected": gb if a_wins else ga, "p_chosen": p_a if a_wins else 1.0 - p_a}


def draw_pairs(spec: TestbedSpec, pair_spec: PairSpec, prompts: Sequence[str], num: int, gold: GoldReward,
               rng: random.Random) -> tuple[list[dict[str, Any]], int]:
    """``num`` labelled pairs on ``prompts`` and the count of redrawn pairs: a pair whose two responses are equal
    (no preference), empty, or above ``max_gold`` is redrawn."""
    pairs, redrawn = [], 0
    while len(pairs) < num:
        prompt = rng.choice(prompts)
        a, b = (pair_spec.writer.write(gold.good(prompt), rng, spec.alphabet) for _ in range(2))
        over = pair_spec.max_gold is not None and max(gold.score(prompt, a), gold.score(prompt, b)) > pair_spec.max_gold
        if a == b or not a or not b or over:
            redrawn += 1
            if redrawn > 100 * num + 1000:
                raise ValueError(f"testbed: pairs could not be drawn (redrawn {redrawn}); max_gold "
                                 f"{pair_spec.max_gold} may exclude almost everything the writer writes.")
            continue
        pairs.append(bradley_terry_pair(prompt, a, b, gold, spec.bt_temperature, rng))
    return pairs, redrawn


def build_testbed(spec: TestbedSpec, seed: int) -> dict[str, list[dict[str, Any]]]:
    """The testbed's rows: ``sft`` ({prompt, response}), ``train_prompts`` and ``heldout_prompts`` ({prompt}), and
    for each pair set NAME: ``NAME`` (training pairs), ``NAME_test`` (pairs on held-out prompts) and
    ``NAME_preferred`` (the chosen responses as demonstrations); ``summary`` holds one row of counts."""
    rng, gold = random.Random(seed), spec.gold_reward()
    train, heldout = split_prompts(spec, seed)
    sft = []
    for _ in range(spec.num_sft):
        prompt = rng.choice(train)
        response = spec.sft_teacher.write(gold.good(prompt), rng, spec.alphabet) or spec.alphabet[0]  # min_len 0
        sft.append({"prompt": prompt, "response": response})
    out: dict[str, list[dict[str, Any]]] = {"sft": sft, "train_prompts": [{"prompt": p} for p in train],
                                            "heldout_prompts": [{"prompt": p} for p in heldout]}
    summary: dict[str, Any] = {"sft_gold": sum(gold.score(r["prompt"], r["response"]) for r in sft) / len(sft)}
    for name, pair_spec in spec.pairs.items():
        out[name], redrawn = draw_pairs(spec, pair_spec, train, pair_spec.num, gold, rng)
        out[f"{name}_test"], _ = draw_pairs(spec, pair_spec, heldout, pair_spec.num_test, gold, rng)
        out[f"{name}_preferred"] = [{"prompt": r["prompt"], "response": r["chosen"]} for r in out[name]]
        summary[name] = {"redrawn": redrawn, "chosen_gold": sum(r["gold_chosen"] for r in out[name]) / pair_spec.num,
                         "bayes_accuracy": bayes_accuracy(out[f"{name}_test"])}
    out["summary"] = [summary]
    return out


def bayes_accuracy(pairs: Sequence[Mapping[str, Any]]) -> float:
    """How often the Bayes-optimal classifier (the gold reward's ordering) agrees with the sampled labels, in
    expectation: ``mean max(p, 1 - p)`` over the pairs."""
    return sum(max(r["p_chosen"], 1.0 - r["p_chosen"]) for r in pairs) / len(pairs)


def write_testbed(spec: TestbedSpec, seed: int, folder: str | Path) -> dict[str, str]:
    """Write the testbed as JSONL files the project's data modules read; returns name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in build_testbed(spec, seed).items():
        paths[name] = str(folder / f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return paths
