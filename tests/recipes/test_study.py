"""The study command: gold reward by hand, the testbed's distribution shift, config parsing and placeholders, the
report's win-rates and findings, and a shrunken end-to-end study."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import pytest
import torch

from recipes import config_path
from recipes.study.report import findings, table_rows
from recipes.study.runner import apply_sets, build_parser, gather_lists, plan_jobs
from recipes.study.stages import deep_merge, fill, lightning_config, resolve_stages, stage_dependencies
from recipes.study.testbed import GoldReward, TestbedSpec, Writer, bradley_terry_pair, build_testbed, write_testbed

TINY_YAML = str(config_path("study/tiny.yaml"))


# --- gold reward --------------------------------------------------------------------------------------------------
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


def test_gold_reward_rejects_bad_length_window():
    with pytest.raises(ValueError, match="min_len <= max_len"):
        GoldReward(min_len=5, max_len=4)


# --- testbed ------------------------------------------------------------------------------------------------------
def test_bradley_terry_labels_follow_the_sigmoid():
    """gold("abc:", "aaaa") = 1.0 and gold("abc:", "aaad") = 0.75: P("aaaa" chosen) = sigmoid(0.25 / 0.25) = 0.7311.
    Over 4000 draws the frequency's standard error is sqrt(0.731 * 0.269 / 4000) = 0.007; allow 4 of them."""
    rng, gold = random.Random(0), GoldReward()
    wins = sum(bradley_terry_pair("abc:", "aaaa", "aaad", gold, 0.25, rng)["chosen"] == "aaaa" for _ in range(4000))
    assert abs(wins / 4000 - 1 / (1 + math.exp(-1))) < 0.028


def test_testbed_preference_data_comes_from_a_different_policy_than_sft():
    spec = TestbedSpec(num_sft=600, num_pairs=600)
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
    # the behaviour policy scores lower on average than the SFT teacher (0.4 vs 0.5 prompt letters, upper case,
    # too-short answers): gold about 0.5 for SFT against about 0.25 for the pairs
    sft_gold = sum(gold.score(r["prompt"], r["response"]) for r in data["sft"]) / len(data["sft"])
    pair_gold = sum(r["gold_chosen"] + r["gold_rejected"] for r in data["pairs"]) / (2 * len(data["pairs"]))
    assert sft_gold > pair_gold + 0.15
    # labels are informative but noisy: chosen beats rejected on gold mostly, not always
    better = sum(r["gold_chosen"] > r["gold_rejected"] for r in data["pairs"]) / len(data["pairs"])
    assert 0.7 < better < 0.99


def test_testbed_holds_out_prompts_and_is_seeded():
    spec = TestbedSpec(num_sft=200, num_pairs=200)
    a, b = build_testbed(spec, seed=1), build_testbed(spec, seed=1)
    assert a == b
    held = {r["prompt"] for r in a["heldout_prompts"]}
    assert len(held) == round(0.2 * 8 * 7 * 6)
    used = {r["prompt"] for name in ("sft", "pairs", "train_prompts") for r in a[name]}
    assert not held & used
    assert build_testbed(spec, seed=2)["pairs"] != a["pairs"]


def test_ood_probes_gold_values():
    """Prompt "bdg:": "bdgbdg" 1.0; 16 prompt letters 1 - 0.25 * 8 = -1.0; "b" 1 - 0.25 * 3 = 0.25; "bdgBDG"
    (3 - 3) / 6 = 0.0; "bdg123" (3 - 3) / 6 = 0.0; "b d g b" (4 - 3) / 7 = 0.1429."""
    from recipes.study.scoring import ood_probes

    probes = ood_probes("bdg:")
    got = GoldReward()(["bdg:"] * len(probes), list(probes.values()))
    assert torch.allclose(got, torch.tensor([1.0, -1.0, 0.25, 0.0, 0.0, 1 / 7]))


def test_writer_rejects_impossible_probabilities():
    with pytest.raises(ValueError, match="sum <= 1"):
        Writer(p_prompt=0.8, p_upper=0.3)


# --- config -------------------------------------------------------------------------------------------------------
def test_placeholders_merge_and_dependencies():
    base = {"model": {"init_args": {"lr": 1, "path": "{sft}"}}, "cb": [1, 2]}
    merged = deep_merge(base, {"model": {"init_args": {"lr": 2}}, "cb": [3]})
    assert merged == {"model": {"init_args": {"lr": 2, "path": "{sft}"}}, "cb": [3]}
    assert base["model"]["init_args"]["lr"] == 1  # inputs untouched
    assert stage_dependencies({"a": ["{reward}/x", "{data}/y"], "b": "{seed}"}) == {"reward"}
    assert fill({"s": "{seed}", "p": "{data}/f{seed}"}, {"seed": 3, "data": "d"}) == {"s": 3, "p": "d/f3"}
    with pytest.raises(ValueError, match="cycle"):
        resolve_stages({"a": {"extends": "b"}, "b": {"extends": "a"}})
    with pytest.raises(ValueError, match="neither a stage"):
        resolve_stages({"a": {"config": {"x": "{nope}"}}})
    assert gather_lists(["--seeds", "0", "1", "--set", "a=1", "b=[{x: 1}]", "--out", "o"]) == [
        "--seeds", "[0,1]", "--set", '["a=1", "b=[{x: 1}]"]', "--out", "o"]
    tree = {"stages": {"dpo": {"config": {"trainer": {"max_steps": 150}}}}}
    apply_sets(tree, ["stages.dpo.config.trainer.max_steps=7"])
    assert tree["stages"]["dpo"]["config"]["trainer"]["max_steps"] == 7


def _tiny_study(tmp_path):
    parser = build_parser()
    parsed = parser.parse_args(["--config", TINY_YAML])
    cfg = parser.instantiate_classes(parsed)
    write_testbed(cfg.testbed, 0, tmp_path / "data")  # GoldCurve reads the held-out prompts when built
    stages = resolve_stages(dict(parsed.stages))
    return parsed, stages, plan_jobs(cfg, stages, 0, str(tmp_path))


def test_tiny_study_config_parses_into_the_ladder(tmp_path):
    parsed, stages, jobs = _tiny_study(tmp_path)
    assert {"sft", "reward", "dpo", "dpo_sft_preferred", "dpo_iter", "ppo_base", "ppo_advnorm", "ppo_largebatch",
            "ppo_ema"} <= set(stages)
    # the Table-3 ladder adds one trick per rung
    rung = {name: stages[name]["config"] for name in ("ppo_base", "ppo_advnorm", "ppo_largebatch", "ppo_ema")}
    assert [c["model"]["init_args"]["normalize_advantages"] for c in rung.values()] == [False, True, True, True]
    assert [c["data"]["init_args"]["rollout_batch_size"] for c in rung.values()] == [16, 16, 64, 64]
    assert [len(c["trainer"].get("callbacks", [])) for c in rung.values()] == [0, 0, 0, 1]
    assert jobs["seed0/fit:ppo_ema"][1] == {"seed0/fit:sft", "seed0/fit:reward"}
    assert jobs["seed0/fit:dpo_sft_preferred"][1] == {"seed0/fit:sft_preferred"}
    assert jobs["seed0/eval:dpo"][1] == {"seed0/fit:dpo", "seed0/fit:sft", "seed0/fit:reward"}
    assert "seed0/eval:reward" not in jobs  # the reward model is not a policy
    config = lightning_config(jobs["seed0/fit:ppo_base"][0], dict(parsed.defaults))
    assert config["model"]["init_args"]["model"]["name_or_path"] == str(tmp_path / "sft" / "hf")
    assert config["data"]["init_args"]["seed"] == 0 and config["seed_everything"] == 0


@pytest.mark.slow
def test_every_study_stage_instantiates_through_the_cli(tmp_path):
    """Each stage's generated Lightning config goes through the project's own CLI (``run=False``: parse and
    instantiate; models load in configure_model, so the placeholder folders need not exist yet)."""
    import yaml
    from recipes.__main__ import cli_main

    parsed, _, jobs = _tiny_study(tmp_path)
    for key, (job, _) in jobs.items():
        if job.kind != "fit":
            continue
        path = tmp_path / f"{job.stage}.yaml"
        path.write_text(yaml.safe_dump(lightning_config(job, dict(parsed.defaults))))
        cli = cli_main(["--config", str(path)], run=False)
        assert type(cli.model).__module__.startswith("recipes.modules."), key


# --- report -------------------------------------------------------------------------------------------------------
def _eval(seed, stage, gold, per_prompt):
    return {"seed": seed, "stage": stage, "label": stage, "gold": gold, "learned_reward": 0.0, "kl": 0.0,
            "foreign_frac": 0.0, "too_long": 0.0, "length": 5.0, "eos_rate": 1.0, "per_prompt_gold": per_prompt}


def test_report_win_rate_and_findings():
    """Seed 0: DPO's per-prompt gold (0.5, 0.2, 0.1, 0.4) against SFT's (0.3, 0.3, 0.1, 0.3): win, loss, tie, win
    -> (2 + 0.5) / 4 = 0.625. Findings on gold: seed 0 PPO 0.6 >= DPO-Iter 0.5 > DPO 0.3 holds; seed 1 PPO 0.4 <
    DPO-Iter 0.5 fails -> 1 of 2."""
    evals = [_eval(0, "sft", 0.25, [0.3, 0.3, 0.1, 0.3]), _eval(0, "dpo", 0.3, [0.5, 0.2, 0.1, 0.4]),
             _eval(0, "dpo_iter", 0.5, [0.5] * 4), _eval(0, "ppo_ema", 0.6, [0.6] * 4),
             _eval(1, "sft", 0.25, [0.3] * 4), _eval(1, "dpo", 0.3, [0.3] * 4),
             _eval(1, "dpo_iter", 0.5, [0.5] * 4), _eval(1, "ppo_ema", 0.4, [0.4] * 4)]
    rows = table_rows(evals, ["sft", "dpo", "dpo_iter", "ppo_ema"])
    dpo0 = next(r for r in rows if r["seed"] == 0 and r["method"] == "dpo")
    assert dpo0["win_rate"] == pytest.approx(0.625)
    checks = {c["finding"]: c for c in findings(rows)}
    assert checks["PPO >= DPO-Iter > DPO"]["per_seed"] == {0: True, 1: False}
    assert checks["PPO >= DPO-Iter > DPO"]["holds"] == 1
    assert "full ladder > PPO base" not in checks  # ppo_base was not run


def test_report_only_rewrites_the_report_from_saved_evaluations(tmp_path):
    import json

    from recipes.study import main

    for seed, stage, gold in [(0, "sft", 0.25), (0, "dpo", 0.3), (1, "sft", 0.2), (1, "dpo", 0.1)]:
        (tmp_path / f"seed{seed}" / stage).mkdir(parents=True)
        (tmp_path / f"seed{seed}" / stage / "eval.json").write_text(json.dumps(_eval(seed, stage, gold, [gold] * 4)))
    report = main(["--config", TINY_YAML, "--out", str(tmp_path), "--seeds", "0", "1", "--report_only", "true"])
    assert "| dpo | 0.200 ± 0.141 |" in report["table"]  # mean of 0.3 and 0.1; sample std sqrt(2 * 0.1^2) = 0.141
    assert (tmp_path / "results.csv").read_text().count("\n") == 5  # header + 4 rows


# --- end to end ---------------------------------------------------------------------------------------------------
SHRINK = ["stages.sft.config.trainer.max_steps=30", "stages.reward.config.trainer.max_steps=10",
          "stages.dpo.config.trainer.max_steps=4", "stages.sft_preferred.config.trainer.max_steps=4",
          "stages.dpo_iter.config.trainer.max_epochs=1",
          ("stages.dpo_iter.config.trainer.callbacks=[{class_path: recipes.callbacks.dpo_iter.DPOIterRound, "
           "init_args: {rounds: 1}}]"), "stages.dpo_iter.config.data.init_args.prompts_per_round=16",
          "stages.ppo_base.config.trainer.max_steps=2", "stages.ppo_base.config.data.init_args.rollout_batch_size=8",
          "stages.ppo_base.config.model.init_args.mini_batch_size=4",
          "stages.ppo_largebatch.config.data.init_args.rollout_batch_size=16"]


@pytest.mark.slow
def test_shrunken_study_writes_table_csv_and_plots(tmp_path):
    from recipes.study import main

    report = main(["--config", TINY_YAML, "--out", str(tmp_path), "--seeds", "[0]", "--workers", "2",
                   "--testbed.num_sft", "128", "--testbed.num_pairs", "128", "--eval.samples_per_prompt", "1",
                   "--eval.curve_every_n_steps", "2", "--eval.curve_prompts", "4", "--set", *SHRINK])
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["sft", "dpo", "dpo_sft_preferred", "dpo_iter", "ppo_base", "ppo_advnorm",
                                           "ppo_largebatch", "ppo_ema"]
    assert float(rows[0]["kl"]) == pytest.approx(0.0, abs=1e-5)  # SFT against itself
    assert float(rows[0]["win_rate"]) == 0.5  # SFT against itself: every prompt a tie
    assert "| SFT |" in (tmp_path / "results.md").read_text() and "PPO >= DPO-Iter > DPO" in report["table"]
    for name in ("study_gold_vs_kl.png", "study_reward_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = next(e for e in Path(tmp_path).glob("seed0/dpo/gold_curve.json"))
    assert '"step": 0' in curve.read_text()


def test_writer_spread_gives_each_response_its_own_share_of_prompt_letters():
    """Length 8, p_prompt 0.5: a fixed share gives a binomial std of sqrt(0.25 / 8) = 0.177; drawing each response's
    share uniformly from [0, 1] adds the uniform's variance 1/12 to the mean binomial one E[p(1-p)]/8 = 1/48, so the
    std is sqrt(1/12 + 1/48) = 0.323."""
    import statistics

    rng = random.Random(0)

    def share_std(writer):
        shares = [sum(c in "abc" for c in writer.write("abc:", rng)) / 8 for _ in range(4000)]
        return statistics.pstdev(shares)

    assert abs(share_std(Writer(p_prompt=0.5, min_len=8, max_len=8)) - 0.177) < 0.015
    assert abs(share_std(Writer(p_prompt=0.5, p_prompt_spread=0.5, min_len=8, max_len=8)) - 0.323) < 0.015
