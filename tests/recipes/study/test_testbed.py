"""The study's testbeds: gold reward by hand (prompt letters and a fixed lexicon), Bradley-Terry labels, the shift
between the SFT teacher and the pairs' writers, the coverage cap, Bayes accuracy, held-out prompts and seeding."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from recipes.study.testbed import (
    GoldReward,
    PairSpec,
    TestbedSpec,
    Writer,
    bayes_accuracy,
    bradley_terry_pair,
    build_testbed,
    write_testbed,
)


def test_gold_reward_hand_cases():
    """Prompt "abc:" (letters a, b, c; alphabet a-h; no penalty for lengths 4-8, 0.25 per character outside):
    "aabb": 4 prompt letters -> mean 1, length 4 -> 1.0.  "adde": (1 + 0 + 0 + 0) / 4 = 0.25.
    "AB": two foreign characters -> mean -1, 2 short of 4 -> -1 - 0.5 = -1.5.
    "abcabcabca" (10): mean 1, 2 over 8 -> 0.5.  "": mean 0, 4 short -> -1.0.  "ab1h": (1 + 1 - 1 + 0) / 4 = 0.25."""
    gold = GoldReward()
    responses = ["aabb", "adde", "AB", "abcabcabca", "", "ab1h"]
    got = gold(["abc:"] * len(responses), responses)
    assert torch.allclose(got, torch.tensor([1.0, 0.25, -1.5, 0.5, -1.0, 0.25]))
    assert gold.score("abc:", "xyzw") == pytest.approx(-1.0)  # letters outside the alphabet are foreign


def test_gold_reward_lexicon_ignores_the_prompt():
    """Lexicon "ab": "aabb" is 1.0 for any prompt; for prompt "abc:" the letter c is now only an alphabet letter:
    "abcc" = (1 + 1 + 0 + 0) / 4 = 0.5; "fgh" (prompt fgh:) = 0, one short -> -0.25."""
    gold = GoldReward(lexicon="ab")
    assert gold.score("fgh:", "aabb") == 1.0 and gold.score("abc:", "abcc") == 0.5
    assert gold.score("fgh:", "fgh") == pytest.approx(-0.25)
    assert gold.good("fgh:") == "ab" and GoldReward().good("fgh:") == "fgh"


def test_gold_reward_rejects_bad_settings():
    with pytest.raises(ValueError, match="min_len <= max_len"):
        GoldReward(min_len=5, max_len=4)
    with pytest.raises(ValueError, match="lexicon"):
        GoldReward(lexicon="xyz")


def test_bradley_terry_labels_follow_the_sigmoid():
    """gold("abc:", "aaaa") = 1.0 and gold("abc:", "aaad") = 0.75: P("aaaa" chosen) = sigmoid(0.25 / 0.25) = 0.7311.
    Over 4000 draws the frequency's standard error is sqrt(0.731 * 0.269 / 4000) = 0.007; allow 4 of them."""
    rng, gold = random.Random(0), GoldReward()
    rows = [bradley_terry_pair("abc:", "aaaa", "aaad", gold, 0.25, rng) for _ in range(4000)]
    wins = sum(r["chosen"] == "aaaa" for r in rows)
    assert abs(wins / 4000 - 1 / (1 + math.exp(-1))) < 0.028
    # the label's probability travels with the row; Bayes accuracy is max(p, 1 - p) = 0.7311 on every row
    assert bayes_accuracy(rows) == pytest.approx(1 / (1 + math.exp(-1)))


def test_testbed_pairs_come_from_a_different_policy_than_sft():
    spec = TestbedSpec(num_sft=600, pairs={"pairs": PairSpec(Writer(p_good=0.4, p_good_spread=0.4, p_upper=0.1,
                                                                    min_len=1, max_len=8), num=600, num_test=100)})
    data = build_testbed(spec, seed=3)
    gold = spec.gold_reward()
    sft_text = "".join(r["response"] for r in data["sft"])
    pair_text = "".join(r["chosen"] + r["rejected"] for r in data["pairs"])
    # upper case: never written by the SFT teacher, ~10% of the behaviour policy's characters
    assert not any(c.isupper() for c in sft_text)
    assert 0.07 < sum(c.isupper() for c in pair_text) / len(pair_text) < 0.13
    # lengths: SFT 4-8 only; the behaviour policy also writes 1-3 (too short under the gold reward)
    assert {len(r["response"]) for r in data["sft"]} <= set(range(4, 9))
    assert any(len(r["chosen"]) < 4 or len(r["rejected"]) < 4 for r in data["pairs"])
    sft_gold = sum(gold.score(r["prompt"], r["response"]) for r in data["sft"]) / len(data["sft"])
    pair_gold = sum(r["gold_chosen"] + r["gold_rejected"] for r in data["pairs"]) / (2 * len(data["pairs"]))
    assert sft_gold > pair_gold + 0.15
    assert data["summary"][0]["sft_gold"] == pytest.approx(sft_gold)
    # labels are informative but noisy: chosen beats rejected on gold mostly, not always
    better = sum(r["gold_chosen"] > r["gold_rejected"] for r in data["pairs"]) / len(data["pairs"])
    assert 0.7 < better < 0.99
    # preferred = the chosen responses, as demonstrations
    assert [r["response"] for r in data["pairs_preferred"]] == [r["chosen"] for r in data["pairs"]]


def test_coverage_cap_redraws_near_optimal_responses():
    spec = TestbedSpec(num_sft=10, gold={"lexicon": "abc"}, pairs={"cov": PairSpec(
        Writer(p_good=0.5, p_good_spread=0.4, min_len=1, max_len=8), num=300, num_test=50, max_gold=0.5)})
    data = build_testbed(spec, seed=0)
    assert max(max(r["gold_chosen"], r["gold_rejected"]) for r in data["cov"] + data["cov_test"]) <= 0.5
    assert data["summary"][0]["cov"]["redrawn"] > 0
    with pytest.raises(ValueError, match="max_gold"):
        build_testbed(TestbedSpec(num_sft=1, pairs={"x": PairSpec(Writer(p_good=0.0), num=5, max_gold=-2.0)}), 0)


def test_testbed_holds_out_prompts_and_is_seeded(tmp_path):
    spec = TestbedSpec(num_sft=200, pairs={"pairs": PairSpec(num=200, num_test=40)})
    a, b = build_testbed(spec, seed=1), build_testbed(spec, seed=1)
    assert a == b
    held = {r["prompt"] for r in a["heldout_prompts"]}
    assert len(held) == round(0.2 * 8 * 7 * 6)
    used = {r["prompt"] for name in ("sft", "pairs", "train_prompts") for r in a[name]}
    assert not held & used
    assert {r["prompt"] for r in a["pairs_test"]} <= held  # reward-model accuracy is measured on held-out prompts
    assert build_testbed(spec, seed=2)["pairs"] != a["pairs"]
    paths = write_testbed(spec, 1, tmp_path)
    assert sorted(paths) == sorted(a) and sum(1 for _ in open(paths["pairs_test"])) == 40


def test_writer_rejects_impossible_probabilities():
    with pytest.raises(ValueError, match="sum <= 1"):
        Writer(p_good=0.8, p_upper=0.3)


def test_writer_spread_gives_each_response_its_own_share_of_good_letters():
    """Length 8, p_good 0.5: a fixed share gives a binomial std of sqrt(0.25 / 8) = 0.177; drawing each response's
    share uniformly from [0, 1] adds the uniform's variance 1/12 to the mean binomial one E[p(1-p)]/8 = 1/48, so the
    std is sqrt(1/12 + 1/48) = 0.323."""
    rng = random.Random(0)

    def share_std(writer):
        shares = [sum(c in "abc" for c in writer.write("abc", rng)) / 8 for _ in range(4000)]
        return statistics.pstdev(shares)

    assert abs(share_std(Writer(p_good=0.5, min_len=8, max_len=8)) - 0.177) < 0.015
    assert abs(share_std(Writer(p_good=0.5, p_good_spread=0.5, min_len=8, max_len=8)) - 0.323) < 0.015
