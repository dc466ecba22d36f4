"""The study's claims and how they are judged: each `Finding` is a contrast between stages (or between frontiers at
a matched KL), computed seed by seed, so the verdict rests on the paired per-seed differences and their standard
error, never on one run or on a strict ``a >= b``. Pure functions over the evaluations' numbers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

VERDICTS = ("reproduced", "not reproduced", "inconclusive", "1 seed")


@dataclass
class Finding:
    """A claim the report judges, declared in the study config before anything runs.

    The claim's value on one seed is ``sum_s weight_s * metric(s)`` over the stages of ``contrast`` (e.g. ``{ppo: 1,
    dpo: -1}``: PPO's gold minus DPO's; ``{dpo_noshift: 1, dpo: -1, ppo_noshift: -1, ppo: 1}``: how much more the
    shift costs DPO than PPO). With ``at_kl`` the keys are frontier names and the metric is the frontier's gold reward
    interpolated at that KL (`gold_at_kl`). `judge` turns the per-seed values into a verdict.

    Args:
        name: the claim in words, e.g. "PPO > DPO-Iter".
        track: the track whose stages the contrast reads.
        contrast: stage (or frontier) -> weight.
        metric: an evaluation field (``gold``, ``out_of_support``, ``kl``, ...).
        claim: ``greater`` (the value is positive) or ``equivalent`` (the value is within ``±delta``: "the
            large-batch gain is compute", "EMA acts as KL relaxation").
        delta: the smallest difference that matters, in the metric's units (the noise floor the doc states).
        at_kl: compare frontiers at this KL to the SFT policy (nats); None compares the stages' own points.
        note: what the control is or what the claim stands for, printed beside the verdict.
    """

    name: str
    track: str
    contrast: dict[str, float] = field(default_factory=dict)
    metric: str = "gold"
    claim: str = "greater"
    delta: float = 0.03
    at_kl: float | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.claim not in ("greater", "equivalent"):
            raise ValueError(f"Finding {self.name!r}: claim is {self.claim!r}; write 'greater' or 'equivalent'.")
        if not self.contrast:
            raise ValueError(f"Finding {self.name!r}: contrast is empty; give stage -> weight, e.g. "
                             "{ppo: 1, dpo: -1}.")
        if self.delta <= 0:
            raise ValueError(f"Finding {self.name!r}: delta must be > 0, got {self.delta}.")


def paired_stats(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, standard error of the mean (sample std / sqrt(n); nan for one value) and count of per-seed values."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan, 1
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n), n


def judge(mean: float, se: float, n: int, claim: str = "greater", delta: float = 0.03) -> str:
    """The verdict on a claim from its per-seed values' mean and standard error (the rule docs/study.md states):

    - ``greater``: *reproduced* when ``mean - 2 se > 0``; *not reproduced* when ``mean + 2 se < delta`` (confidently
      smaller than the smallest difference that matters, or negative); otherwise *inconclusive*.
    - ``equivalent``: *reproduced* when ``[mean - 2 se, mean + 2 se]`` lies inside ``(-delta, delta)``; *not
      reproduced* when it lies outside, ``|mean| - 2 se >= delta``; otherwise *inconclusive*.
    - one seed: ``1 seed`` (no standard error, no verdict).
    """
    if n < 2 or math.isnan(se):
        return "1 seed"
    low, high = mean - 2 * se, mean + 2 * se
    if claim == "greater":
        return "reproduced" if low > 0 else "not reproduced" if high < delta else "inconclusive"
    if -delta < low and high < delta:
        return "reproduced"
    return "not reproduced" if abs(mean) - 2 * se >= delta else "inconclusive"


def gold_at_kl(points: Sequence[tuple[float, float]], kl: float) -> float | None:
    """Gold reward at ``kl`` on a frontier: linear interpolation between its ``(kl, gold)`` points taken in order of
    KL (the SFT policy is the point at KL 0); None when the frontier never reaches ``kl`` (no extrapolation)."""
    pts = sorted(points)
    if not pts or kl < pts[0][0] or kl > pts[-1][0]:
        return None
    for (k0, g0), (k1, g1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            return g0 if k1 == k0 else g0 + (g1 - g0) * (kl - k0) / (k1 - k0)
    return pts[-1][1]  # a single point at exactly kl


def per_seed_values(finding: Finding, metric: Mapping[tuple[int, str], float],
                    frontiers: Mapping[tuple[int, str], Sequence[tuple[float, float]]],
                    seeds: Sequence[int]) -> dict[int, float]:
    """The finding's value on each seed where every term is available: ``metric[(seed, stage)]`` for the stages of
    the contrast, or ``gold_at_kl(frontiers[(seed, name)], at_kl)`` for the frontiers of a matched-KL claim."""
    values = {}
    for seed in seeds:
        terms = []
        for key, weight in finding.contrast.items():
            if finding.at_kl is None:
                value = metric.get((seed, key))
            else:
                value = gold_at_kl(frontiers.get((seed, key), ()), finding.at_kl)
            if value is None or math.isnan(value):
                break
            terms.append(weight * value)
        else:
            values[seed] = sum(terms)
    return values


def format_estimate(mean: float, se: float, n: int, digits: int = 3) -> str:
    """``0.123 ± 0.045`` (mean ± standard error), or ``0.123 (1 seed)``, or ``—`` when nothing was measured."""
    if n == 0 or math.isnan(mean):
        return "—"
    if n == 1 or math.isnan(se):
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"
