"""`recipes.study.findings`: the claims' validation, the paired statistics, the verdict rule on each branch and its
boundaries, frontier interpolation, per-seed contrasts and the estimate's formatting, against hand-computed values."""

import math

import pytest

from recipes.study.findings import VERDICTS, Finding, format_estimate, gold_at_kl, judge, paired_stats, per_seed_values

# --- Finding ------------------------------------------------------------------------------------------------------


def test_finding_defaults_are_valid():
    f = Finding("PPO > DPO", "A", {"ppo": 1, "dpo": -1})
    assert (f.metric, f.claim, f.delta, f.at_kl) == ("gold", "greater", 0.03, None)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"contrast": {"ppo": 1}, "claim": "bigger"}, "claim is 'bigger'"),
    ({"contrast": {}}, "contrast is empty"),
    ({"contrast": {"ppo": 1}, "delta": 0.0}, "delta must be > 0"),
    ({"contrast": {"ppo": 1}, "delta": -0.1}, "delta must be > 0"),
])
def test_a_bad_finding_raises_naming_the_finding(kwargs, words):
    with pytest.raises(ValueError, match="Finding 'my claim'") as info:
        Finding("my claim", "A", **kwargs)
    assert words in str(info.value)


# --- paired_stats -------------------------------------------------------------------------------------------------


def test_paired_stats_by_hand():
    """[0.1, 0.3, 0.2, 0.4, 0.5]: mean 1.5 / 5 = 0.3; deviations -0.2, 0, -0.1, 0.1, 0.2, squares sum to 0.10;
    sample variance 0.10 / 4 = 0.025; SE = sqrt(0.025 / 5) = sqrt(0.005) = 0.0707107."""
    mean, se, n = paired_stats([0.1, 0.3, 0.2, 0.4, 0.5])
    assert n == 5
    assert mean == pytest.approx(0.3, abs=1e-12)
    assert se == pytest.approx(0.07071067811865475, abs=1e-12)


def test_paired_stats_two_values():
    """[1, 3]: mean 2, sample std sqrt(((-1)^2 + 1^2) / 1) = sqrt(2), SE = sqrt(2) / sqrt(2) = 1."""
    assert paired_stats([1.0, 3.0]) == pytest.approx((2.0, 1.0, 2))


def test_paired_stats_one_value_has_no_standard_error():
    mean, se, n = paired_stats([0.7])
    assert (mean, n) == (0.7, 1) and math.isnan(se)


def test_paired_stats_empty():
    mean, se, n = paired_stats([])
    assert n == 0 and math.isnan(mean) and math.isnan(se)


# --- judge --------------------------------------------------------------------------------------------------------
# Dyadic numbers (exact in binary) so the boundaries mean - 2 se = 0 and mean ± 2 se = ±delta hold exactly.


@pytest.mark.parametrize(("mean", "se", "delta", "verdict"), [
    (0.1, 0.04, 0.03, "reproduced"),          # low = 0.02 > 0
    (0.5, 0.125, 0.25, "reproduced"),         # low = 0.25 > 0
    (0.5, 0.25, 0.25, "inconclusive"),        # low = 0 exactly: not > 0; high = 1 >= delta
    (-0.1, 0.02, 0.03, "not reproduced"),     # high = -0.06 < delta (negative)
    (0.01, 0.005, 0.03, "not reproduced"),    # positive but high = 0.02 < delta: smaller than what matters
    (0.0625, 0.09375, 0.25, "inconclusive"),  # high = 0.0625 + 0.1875 = 0.25 = delta exactly: not < delta
    (0.0625, 0.0625, 0.25, "not reproduced"),  # high = 0.1875 < 0.25, low = -0.0625
    (0.02, 0.02, 0.03, "inconclusive"),       # low = -0.02, high = 0.06
])
def test_judge_greater(mean, se, delta, verdict):
    assert judge(mean, se, 5, "greater", delta) == verdict


@pytest.mark.parametrize(("mean", "se", "delta", "verdict"), [
    (0.0, 0.0625, 0.25, "reproduced"),        # [-0.125, 0.125] inside (-0.25, 0.25)
    (-0.0625, 0.0625, 0.25, "reproduced"),    # [-0.1875, 0.0625]
    (0.125, 0.0625, 0.25, "inconclusive"),    # high = 0.25 = delta: not strictly inside; |m| - 2 se = 0 < delta
    (-0.125, 0.0625, 0.25, "inconclusive"),   # low = -0.25 = -delta
    (0.5, 0.0625, 0.25, "not reproduced"),    # |m| - 2 se = 0.375 >= 0.25
    (-0.5, 0.0625, 0.25, "not reproduced"),   # the same on the negative side
    (0.375, 0.0625, 0.25, "not reproduced"),  # |m| - 2 se = 0.25 = delta exactly: >= holds
    (0.25, 0.125, 0.25, "inconclusive"),      # [0, 0.5] straddles delta; |m| - 2 se = 0
])
def test_judge_equivalent(mean, se, delta, verdict):
    assert judge(mean, se, 5, "equivalent", delta) == verdict


@pytest.mark.parametrize(("mean", "se", "n"), [(0.5, math.nan, 1), (0.5, 0.01, 1), (0.5, math.nan, 3)])
@pytest.mark.parametrize("claim", ["greater", "equivalent"])
def test_judge_without_a_standard_error_gives_no_verdict(mean, se, n, claim):
    assert judge(mean, se, n, claim, 0.03) == "1 seed"


def test_judge_on_paired_stats_end_to_end():
    """[0.1, 0.3, 0.2, 0.4, 0.5]: mean 0.3, SE 0.0707; low = 0.3 - 0.1414 = 0.159 > 0: reproduced. As an
    equivalence within ±0.03: |0.3| - 0.1414 = 0.159 >= 0.03: not reproduced."""
    stats = paired_stats([0.1, 0.3, 0.2, 0.4, 0.5])
    assert judge(*stats, "greater", 0.03) == "reproduced"
    assert judge(*stats, "equivalent", 0.03) == "not reproduced"
    assert {judge(*stats, c, 0.03) for c in ("greater", "equivalent")} <= set(VERDICTS)


# --- gold_at_kl ---------------------------------------------------------------------------------------------------

POINTS = [(0.0, 0.1), (1.0, 0.5), (3.0, 0.9)]


@pytest.mark.parametrize(("kl", "gold"), [
    (0.5, 0.3),    # halfway from 0.1 to 0.5
    (2.0, 0.7),    # halfway from 0.5 to 0.9
    (2.5, 0.8),    # 0.5 + 0.4 * 1.5 / 2
    (1.0, 0.5),    # exact hit on an inner point
    (0.0, 0.1),    # the first point
    (3.0, 0.9),    # the last point
])
def test_gold_at_kl_interpolates(kl, gold):
    assert gold_at_kl(POINTS, kl) == pytest.approx(gold, abs=1e-12)


@pytest.mark.parametrize("kl", [3.5, -0.1])
def test_gold_at_kl_does_not_extrapolate(kl):
    assert gold_at_kl(POINTS, kl) is None


def test_gold_at_kl_sorts_its_points():
    shuffled = [POINTS[2], POINTS[0], POINTS[1]]
    assert gold_at_kl(shuffled, 2.0) == pytest.approx(0.7, abs=1e-12)
    assert gold_at_kl(shuffled, 0.5) == pytest.approx(0.3, abs=1e-12)
    assert gold_at_kl(shuffled, 3.5) is None


def test_gold_at_kl_empty_and_single_point():
    assert gold_at_kl([], 0.0) is None
    assert gold_at_kl([(0.5, 0.2)], 0.5) == 0.2
    assert gold_at_kl([(0.5, 0.2)], 0.4) is None


# --- per_seed_values ----------------------------------------------------------------------------------------------


def test_per_seed_values_weighted_contrast_leaves_out_incomplete_seeds():
    """ppo - dpo: seed 0: 0.6 - 0.4 = 0.2; seed 1: 0.5 - 0.55 = -0.05; seed 2 lacks dpo; seed 3 has a nan; seed 9
    has nothing."""
    f = Finding("PPO > DPO", "A", {"ppo": 1, "dpo": -1})
    metric = {(0, "ppo"): 0.6, (0, "dpo"): 0.4, (1, "ppo"): 0.5, (1, "dpo"): 0.55, (2, "ppo"): 0.7,
              (3, "ppo"): math.nan, (3, "dpo"): 0.1}
    values = per_seed_values(f, metric, {}, [0, 1, 2, 3, 9])
    assert values.keys() == {0, 1}
    assert values[0] == pytest.approx(0.2, abs=1e-12)
    assert values[1] == pytest.approx(-0.05, abs=1e-12)


def test_per_seed_values_interaction_with_fractional_weights():
    """0.5 * (dpo_noshift - dpo - ppo_noshift + ppo) = 0.5 * (0.8 - 0.4 - 0.7 + 0.6) = 0.5 * 0.3 = 0.15; only the
    seeds asked for are read."""
    f = Finding("shift costs DPO more", "A", {"dpo_noshift": 0.5, "dpo": -0.5, "ppo_noshift": -0.5, "ppo": 0.5})
    metric = {(1, "dpo_noshift"): 0.8, (1, "dpo"): 0.4, (1, "ppo_noshift"): 0.7, (1, "ppo"): 0.6,
              (2, "dpo_noshift"): 0.0, (2, "dpo"): 0.0, (2, "ppo_noshift"): 0.0, (2, "ppo"): 0.0}
    values = per_seed_values(f, metric, {}, [1])
    assert values.keys() == {1}
    assert values[1] == pytest.approx(0.15, abs=1e-12)


def test_per_seed_values_at_kl_reads_the_frontiers():
    """At KL 1: seed 0: ppo's frontier (0, 0.1)-(2, 0.5) gives 0.3, the optimum's (0, 0.1)-(1, 0.6) gives 0.6, so
    ppo - optimum = -0.3; seed 1's ppo frontier stops at KL 0.5 (None); seed 2 has no optimum frontier. The stages'
    own metric (which would give 10 - 20) is not read."""
    f = Finding("PPO reaches the optimum", "A", {"ppo": 1, "optimum": -1}, at_kl=1.0)
    frontiers = {(0, "ppo"): [(0.0, 0.1), (2.0, 0.5)], (0, "optimum"): [(0.0, 0.1), (1.0, 0.6)],
                 (1, "ppo"): [(0.0, 0.1), (0.5, 0.2)], (1, "optimum"): [(0.0, 0.1), (1.0, 0.6)],
                 (2, "ppo"): [(0.0, 0.1), (2.0, 0.5)]}
    metric = {(s, k): v for s in range(3) for k, v in (("ppo", 10.0), ("optimum", 20.0))}
    values = per_seed_values(f, metric, frontiers, [0, 1, 2])
    assert values.keys() == {0}
    assert values[0] == pytest.approx(-0.3, abs=1e-12)


# --- format_estimate ----------------------------------------------------------------------------------------------


def test_format_estimate():
    assert format_estimate(math.nan, math.nan, 0) == "—"
    assert format_estimate(0.5, 0.1, 0) == "—"
    assert format_estimate(0.5, math.nan, 1) == "0.500 (1 seed)"
    assert format_estimate(0.12345, 0.0456, 5) == "0.123 ± 0.046"
    assert format_estimate(-0.12345, 0.0456, 5, digits=2) == "-0.12 ± 0.05"
