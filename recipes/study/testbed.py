"""The study's gold-reward testbed: a synthetic "use the prompt's letters" task whose true reward is code
(`GoldReward`), the noisy SFT teacher, a *different* behaviour policy that writes the preference pairs, Bradley-Terry
labels on the gold reward, and the held-out prompts. Everything is built in and seeded; nothing is downloaded."""

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
    """The letters a prompt asks for: ``"bdg:"`` -> ``"bdg"``."""
    return prompt.removesuffix(PROMPT_SUFFIX)


class GoldReward:
    """The testbed's true reward of a response ``y`` to a prompt ``x`` (three distinct letters of ``alphabet``).

    ``gold(x, y) = mean_c s(c) - length_penalty * dist(len(y), [min_len, max_len])`` where each character scores
    ``s(c) = +1`` if it is one of the prompt's letters, ``0`` if it is another letter of the alphabet and ``-1``
    otherwise (upper case, digits, spaces, ...). The empty response has mean 0. So a perfect response is 1.0, and a
    response outside the task's shape (foreign characters, too long, too short) is punished however plausible it
    looks to a learned model.

    Example::

        GoldReward()(["abc:", "abc:"], ["aabb", "AB"])  # tensor([1.0, -1.5]): -1 for foreign chars, -0.5 for 2 short

    Args:
        alphabet: the letters of the task.
        min_len, max_len: the response lengths that carry no penalty.
        length_penalty: reward lost per character of distance from ``[min_len, max_len]``.
    """

    def __init__(self, alphabet: str = ALPHABET, min_len: int = 4, max_len: int = 8,
                 length_penalty: float = 0.25) -> None:
        if not 0 < min_len <= max_len:
            raise ValueError(f"GoldReward: need 0 < min_len <= max_len, got {min_len}, {max_len}.")
        self.alphabet, self.min_len, self.max_len, self.length_penalty = set(alphabet), min_len, max_len, length_penalty

    def score(self, prompt: str, response: str) -> float:
        """The gold reward of one response (see the class docstring)."""
        wanted = set(prompt_letters(prompt))
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
    """A synthetic writer of responses: length uniform in ``[min_len, max_len]``; each character is one of the
    prompt's letters with probability ``p_prompt``, an upper-case alphabet letter with ``p_upper``, and otherwise
    another (lower-case, non-prompt) alphabet letter. With ``p_prompt_spread > 0`` each response draws its own
    ``p_prompt`` uniformly from ``p_prompt ± p_prompt_spread`` (clipped to what ``p_upper`` leaves), so responses
    differ in quality along the axis the gold reward cares about, not only by chance."""

    p_prompt: float = 0.5
    p_upper: float = 0.0
    min_len: int = 4
    max_len: int = 8
    p_prompt_spread: float = 0.0

    def __post_init__(self) -> None:
        if not (0 <= self.p_prompt and 0 <= self.p_upper and self.p_prompt + self.p_upper <= 1):
            raise ValueError(f"Writer: need p_prompt, p_upper >= 0 with sum <= 1, got {self.p_prompt}, {self.p_upper}.")
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(f"Writer: need 0 <= min_len <= max_len, got {self.min_len}, {self.max_len}.")

    def write(self, prompt: str, rng: random.Random, alphabet: str = ALPHABET) -> str:
        wanted = prompt_letters(prompt)
        others = [c for c in alphabet if c not in wanted]
        out, p_prompt = [], self.p_prompt
        if self.p_prompt_spread > 0:
            p_prompt = min(max(rng.uniform(p_prompt - self.p_prompt_spread, p_prompt + self.p_prompt_spread), 0.0),
                           1.0 - self.p_upper)
        for _ in range(rng.randint(self.min_len, self.max_len)):
            u = rng.random()
            if u < p_prompt:
                out.append(rng.choice(wanted))
            elif u < p_prompt + self.p_upper:
                out.append(rng.choice(alphabet).upper())
            else:
                out.append(rng.choice(others))
        return "".join(out)


@dataclass
class TestbedSpec:
    """What the testbed generates (all of it seeded by the study seed).

    Args:
        alphabet: task letters; prompts are every ordered triple of distinct letters plus ``:``.
        heldout_fraction: share of prompts kept out of every training stage (evaluation only).
        sft_teacher: writes the SFT demonstrations (the SFT policy imitates it).
        behaviour: writes the preference pairs: a different policy from the SFT teacher (the paper's distribution
            shift): some of its responses are shorter, more of its letters miss the prompt, and some are upper case,
            which the SFT policy never writes; its share of prompt letters varies from response to response, so the
            pairs also rank responses along the axis where the SFT policy's own samples differ.
        num_sft: SFT demonstrations; num_pairs: preference pairs.
        bt_temperature: Bradley-Terry labels, ``P(y1 preferred) = sigmoid((gold1 - gold2) / bt_temperature)``.
        gold: the gold reward's settings.
    """

    __test__ = False  # not a pytest class
    alphabet: str = ALPHABET
    heldout_fraction: float = 0.2
    sft_teacher: Writer = field(default_factory=Writer)
    behaviour: Writer = field(default_factory=lambda: Writer(p_prompt=0.4, p_upper=0.1, min_len=1, max_len=8,
                                                             p_prompt_spread=0.4))
    num_sft: int = 2000
    num_pairs: int = 2000
    bt_temperature: float = 0.25
    gold: dict[str, Any] = field(default_factory=dict)

    def gold_reward(self) -> GoldReward:
        return GoldReward(alphabet=self.alphabet, **self.gold)


def split_prompts(spec: TestbedSpec, seed: int) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts): every ordered triple of distinct letters, shuffled by ``seed``."""
    prompts = ["".join(t) + PROMPT_SUFFIX for t in itertools.permutations(spec.alphabet, 3)]
    random.Random(seed).shuffle(prompts)
    n_held = max(1, round(spec.heldout_fraction * len(prompts)))
    return prompts[n_held:], prompts[:n_held]


def bradley_terry_pair(prompt: str, a: str, b: str, gold: GoldReward, temperature: float,
                       rng: random.Random) -> dict[str, Any]:
    """Label one pair by sampling the Bradley-Terry model on the gold reward (Xu et al. 2404.10719, Eq. 1)."""
    ga, gb = gold.score(prompt, a), gold.score(prompt, b)
    p_a = 1.0 / (1.0 + math.exp(-(ga - gb) / temperature))
    a_wins = rng.random() < p_a
    chosen, rejected = (a, b) if a_wins else (b, a)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "gold_chosen": ga if a_wins else gb, "gold_rejected": gb if a_wins else ga}


def build_testbed(spec: TestbedSpec, seed: int) -> dict[str, list[dict[str, Any]]]:
    """The testbed's rows: ``sft`` ({prompt, response}), ``pairs`` ({prompt, chosen, rejected, gold_*}),
    ``train_prompts`` and ``heldout_prompts`` ({prompt}). Pairs whose two responses are equal carry no preference:
    they are redrawn (and counted in ``redrawn``)."""
    rng, gold = random.Random(seed), spec.gold_reward()
    train, heldout = split_prompts(spec, seed)
    sft = []
    for _ in range(spec.num_sft):
        prompt = rng.choice(train)
        response = spec.sft_teacher.write(prompt, rng, spec.alphabet) or spec.alphabet[0]  # min_len 0 may give ""
        sft.append({"prompt": prompt, "response": response})
    pairs, redrawn = [], 0
    while len(pairs) < spec.num_pairs:
        prompt = rng.choice(train)
        a, b = (spec.behaviour.write(prompt, rng, spec.alphabet) for _ in range(2))
        if a == b or not a or not b:
            redrawn += 1
            continue
        pairs.append(bradley_terry_pair(prompt, a, b, gold, spec.bt_temperature, rng))
    return {"sft": sft, "pairs": pairs, "train_prompts": [{"prompt": p} for p in train],
            "heldout_prompts": [{"prompt": p} for p in heldout], "redrawn": [{"count": redrawn}]}


def write_testbed(spec: TestbedSpec, seed: int, folder: str | Path) -> dict[str, str]:
    """Write the testbed as JSONL files the project's data modules read; returns name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in build_testbed(spec, seed).items():
        paths[name] = str(folder / f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    # the preferred half of the pairs as demonstrations, for the SFT-on-preferred-before-DPO variant
    paths["preferred"] = str(folder / "preferred.jsonl")
    with open(paths["pairs"], encoding="utf-8") as src, open(paths["preferred"], "w", encoding="utf-8") as f:
        for line in src:
            row = json.loads(line)
            f.write(json.dumps({"prompt": row["prompt"], "response": row["chosen"]}) + "\n")
    return paths
