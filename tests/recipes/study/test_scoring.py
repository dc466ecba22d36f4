"""`recipes.study.scoring`'s pure pieces: the KL-regularised optimum frontier against plain-math importance weights
and its limits, pairwise accuracy with ties, response-shape statistics and the out-of-support probes' gold values."""

import math

import pytest
import torch

from recipes.study.scoring import ood_probes, optimum_frontier, pairwise_accuracy, response_shape
from recipes.study.testbed import GoldReward

# --- optimum_frontier ---------------------------------------------------------------------------------------------


def reference_point(rows, beta):
    """Self-normalised importance sampling by plain math: w = exp(g / beta) / sum exp(g / beta) per row,
    E[gold] = sum w g, KL = sum w log(N w) (terms with w = 0 contribute 0), ESS = 1 / sum w^2, averaged over rows."""
    golds, kls, esss = [], [], []
    for row in rows:
        top = max(row)
        e = [math.exp((g - top) / beta) for g in row]
        w = [x / sum(e) for x in e]
        golds.append(sum(wi * g for wi, g in zip(w, row)))
        kls.append(sum(wi * math.log(len(row) * wi) for wi in w if wi > 0))
        esss.append(1.0 / sum(wi * wi for wi in w))
    return {"gold": sum(golds) / len(rows), "kl": sum(kls) / len(rows), "ess": sum(esss) / len(rows)}


def test_optimum_frontier_hand_case():
    """Row [0, ln 3] at beta 1: weights 1 / (1 + 3) = 1/4 and 3/4; E[gold] = 0.75 ln 3 = 0.823959;
    KL = 1/4 ln(2/4) + 3/4 ln(6/4) = -0.173287 + 0.304099 = 0.130812; ESS = 1 / (1/16 + 9/16) = 1.6."""
    (point,) = optimum_frontier(torch.tensor([[0.0, math.log(3.0)]]), [1.0])
    assert point["beta"] == 1.0
    assert point["gold"] == pytest.approx(0.75 * math.log(3.0), abs=1e-6)
    assert point["kl"] == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    assert point["ess"] == pytest.approx(1.6, abs=1e-6)


def test_optimum_frontier_matches_plain_math_on_a_tiny_matrix():
    rows = [[0.0, 0.5, 1.0, 0.25], [1.0, 1.0, 0.0, -0.5]]
    betas = [2.0, 0.5, 0.1]
    out = optimum_frontier(torch.tensor(rows), betas)
    assert [p["beta"] for p in out] == betas
    for point, beta in zip(out, betas):
        expected = reference_point(rows, beta)
        assert set(point) == {"beta", "gold", "kl", "ess"}
        for key in ("gold", "kl", "ess"):
            assert point[key] == pytest.approx(expected[key], abs=1e-6), (beta, key)


def test_optimum_frontier_large_beta_is_the_reference():
    """beta -> inf: uniform weights, so gold -> the plain mean (rows' means 0.4375 and 0.375, mean 0.40625),
    KL -> 0 and ESS -> N = 4."""
    (point,) = optimum_frontier(torch.tensor([[0.0, 0.5, 1.0, 0.25], [1.0, 1.0, 0.0, -0.5]]), [1e6])
    assert point["gold"] == pytest.approx(0.40625, abs=1e-5)
    assert point["kl"] == pytest.approx(0.0, abs=1e-8)
    assert point["ess"] == pytest.approx(4.0, abs=1e-5)


def test_optimum_frontier_small_beta_is_each_rows_max():
    """beta -> 0: all weight on each row's best sample(s). Row 1's max 1.0 is unique: KL = log 4, ESS 1; row 2's
    max 1.0 is shared by two samples: w = (1/2, 1/2, 0, 0), KL = log(4 / 2) = log 2, ESS 2. Means: gold 1.0,
    KL (log 4 + log 2) / 2 = 1.5 log 2, ESS 1.5."""
    (point,) = optimum_frontier(torch.tensor([[0.0, 0.5, 1.0, 0.25], [1.0, 1.0, 0.0, -0.5]]), [1e-4])
    assert point["gold"] == pytest.approx(1.0, abs=1e-6)
    assert point["kl"] == pytest.approx(1.5 * math.log(2.0), abs=1e-6)
    assert point["ess"] == pytest.approx(1.5, abs=1e-6)


def test_optimum_frontier_kl_never_exceeds_log_n_and_grows_as_beta_shrinks():
    """KL = log N - H(w) <= log N; E[gold] and KL both rise as beta falls (d E[gold] / d(1/beta) = Var_w[gold])."""
    gold = torch.tensor([[0.3, -0.2, 0.9, 0.1, 0.0], [0.5, 0.4, -1.0, 0.45, 0.2]])
    betas = [10.0, 1.0, 0.3, 0.1, 0.03, 0.01, 1e-3, 1e-6]
    out = optimum_frontier(gold, betas)
    for p in out:
        assert p["kl"] <= math.log(5) + 1e-12
        assert 1.0 - 1e-9 <= p["ess"] <= 5.0 + 1e-9
    for hi, lo in zip(out, out[1:]):
        assert lo["gold"] >= hi["gold"] - 1e-12 and lo["kl"] >= hi["kl"] - 1e-12
    assert out[-1]["kl"] == pytest.approx(math.log(5), abs=1e-9)  # both rows' maxima are unique


# --- pairwise_accuracy --------------------------------------------------------------------------------------------


def test_pairwise_accuracy_ties_count_half():
    """a vs b: 2 > 1 win, 1 = 1 tie, 1 < 3 loss, 5 > 4 win: (2 + 0.5) / 4 = 0.625."""
    assert pairwise_accuracy(torch.tensor([2.0, 1.0, 1.0, 5.0]), torch.tensor([1.0, 1.0, 3.0, 4.0])) == 0.625


def test_pairwise_accuracy_extremes():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 2.0])
    assert pairwise_accuracy(a, b) == 1.0
    assert pairwise_accuracy(b, a) == 0.0
    assert pairwise_accuracy(a, a.clone()) == 0.5


# --- response_shape -----------------------------------------------------------------------------------------------

LEXICON = GoldReward(lexicon="abc")  # a, b, c good for any prompt; alphabet a-h; max_len 8


@pytest.mark.parametrize(("response", "expected"), [
    # "abdZ": Z foreign (1/4); a, b good (2/4); length 4 <= 8; a foreign char puts it out of support
    ("abdZ", {"length": 4.0, "foreign_frac": 0.25, "too_long": 0.0, "out_of_support": 1.0, "good_frac": 0.5}),
    # 9 letters > max_len 8: too long, out of support; all good
    ("abcabcabc", {"length": 9.0, "foreign_frac": 0.0, "too_long": 1.0, "out_of_support": 1.0, "good_frac": 1.0}),
    # exactly max_len, alphabet letters only: in support; a, b, c of "abcdefgh" good: 3/8
    ("abcdefgh", {"length": 8.0, "foreign_frac": 0.0, "too_long": 0.0, "out_of_support": 0.0, "good_frac": 0.375}),
    # "ab 1": space and 1 foreign (2/4), a, b good (2/4)
    ("ab 1", {"length": 4.0, "foreign_frac": 0.5, "too_long": 0.0, "out_of_support": 1.0, "good_frac": 0.5}),
    ("", {"length": 0.0, "foreign_frac": 0.0, "too_long": 0.0, "out_of_support": 0.0, "good_frac": 0.0}),
])
def test_response_shape_with_a_lexicon(response, expected):
    assert response_shape("fgh:", response, LEXICON) == pytest.approx(expected)


def test_response_shape_good_letters_follow_the_gold():
    """Without a lexicon the prompt's letters are good: "fghf" to "fgh:" is all good; with lexicon "abc" none is."""
    assert response_shape("fgh:", "fghf", GoldReward())["good_frac"] == 1.0
    assert response_shape("fgh:", "fghf", LEXICON)["good_frac"] == 0.0
    assert response_shape("bdg:", "bdab", GoldReward())["good_frac"] == 0.75  # b, d, b of 4


# --- ood_probes ---------------------------------------------------------------------------------------------------

# good letters "bdg", GoldReward(): +1 good, 0 other alphabet letter, -1 foreign, mean over chars, minus 0.25 per
# char outside lengths 4-8.
PROBES_BDG = {
    "good letters, length 6 (in support)": ("bdgbdg", 1.0),                   # mean 1, length 6
    "good letters, length 16 (too long)": ("bdgbdgbdgbdgbdgb", 1.0 - 0.25 * 8),  # mean 1, 8 over: -1.0
    "good letters, length 1 (too short)": ("b", 1.0 - 0.25 * 3),               # mean 1, 3 short: 0.25
    "good letters + upper case": ("bdgBDG", (3 - 3) / 6),                      # 0.0
    "good letters + digits": ("bdg123", (3 - 3) / 6),                          # 0.0
    "good letters + spaces": ("b d g b", (4 - 3) / 7),                         # 4 good, 3 spaces, length 7: 1/7
}


def test_ood_probes_responses():
    assert ood_probes("bdg") == {name: text for name, (text, _) in PROBES_BDG.items()}


def test_ood_probes_gold_by_hand():
    probes = ood_probes("bdg")
    names = list(PROBES_BDG)
    scores = GoldReward()(["bdg:"] * len(names), [probes[n] for n in names])
    assert scores.tolist() == pytest.approx([PROBES_BDG[n][1] for n in names], abs=1e-6)


def test_ood_probes_support_by_response_shape():
    """Only the length-6 and the length-1 probes are in the data's support (lengths 1-8, alphabet letters only)."""
    probes = ood_probes("bdg")
    oos = {n: response_shape("bdg:", r, GoldReward())["out_of_support"] for n, r in probes.items()}
    assert oos == {"good letters, length 6 (in support)": 0.0, "good letters, length 16 (too long)": 1.0,
                   "good letters, length 1 (too short)": 0.0, "good letters + upper case": 1.0,
                   "good letters + digits": 1.0, "good letters + spaces": 1.0}


def test_ood_probes_with_fewer_good_letters_keep_their_lengths():
    """Good letters "ab" are cycled to "aba": "abaaba", 16 letters, "a", "abaABA", "aba123", "a b a a"."""
    probes = ood_probes("ab")
    assert list(probes.values()) == ["abaaba", "abaabaabaabaabaa", "a", "abaABA", "aba123", "a b a a"]
