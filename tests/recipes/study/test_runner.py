"""The study command: config parsing into two tracks, placeholders and dependencies, the job graph, every stage
through the project's CLI, ``--report_only``, and a shrunken end-to-end study of both tracks."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import pytest

from recipes import config_path
from recipes.study.runner import apply_sets, build_parser, check_tracks, gather_lists, plan_jobs, run_command, select
from recipes.study.stages import deep_merge, fill, resolve_stages, stage_dependencies
from recipes.study.testbed import write_testbed

TINY_YAML = str(config_path("study/tiny.yaml"))


def test_placeholders_merge_and_dependencies():
    base = {"model": {"init_args": {"lr": 1, "path": "{sft}"}}, "cb": [1, 2]}
    merged = deep_merge(base, {"model": {"init_args": {"lr": 2}}, "cb": [3]})
    assert merged == {"model": {"init_args": {"lr": 2, "path": "{sft}"}}, "cb": [3]}
    assert base["model"]["init_args"]["lr"] == 1  # inputs untouched
    assert stage_dependencies({"a": ["{reward}/x", "{data}/y"], "b": "{seed}", "c": "{gold}"}) == {"reward"}
    gold = {"alphabet": "ab", "lexicon": "a"}
    assert fill({"s": "{seed}", "p": "{data}/f{seed}", "g": "{gold}"}, {"seed": 3, "data": "d", "gold": gold}) == {
        "s": 3, "p": "d/f3", "g": gold}
    with pytest.raises(ValueError, match="cycle"):
        resolve_stages({"a": {"extends": "b"}, "b": {"extends": "a"}})
    with pytest.raises(ValueError, match="neither a stage"):
        resolve_stages({"a": {"config": {"x": "{nope}"}}})
    with pytest.raises(ValueError, match="role"):
        resolve_stages({"a": {"role": "judge"}})
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_stages({"a": {"evaluate": False}})
    assert gather_lists(["--seeds", "0", "1", "--set", "a=1", "b=[{x: 1}]", "--out", "o"]) == [
        "--seeds", "[0,1]", "--set", '["a=1", "b=[{x: 1}]"]', "--out", "o"]
    tree = {"stages": {"dpo": {"config": {"trainer": {"max_steps": 150}}}}}
    apply_sets(tree, ["stages.dpo.config.trainer.max_steps=7"])
    assert tree["stages"]["dpo"]["config"]["trainer"]["max_steps"] == 7
    assert run_command(["--config", "c.yaml", "--report_only", "true", "--seeds", "[0,1]"]) == (
        "python -m recipes study --config c.yaml --seeds [0,1]")


def test_inheritance_keeps_role_and_track_but_not_label_or_frontier():
    stages = resolve_stages({
        "sft": {"track": "A", "label": "SFT", "config": {"x": 1}},
        "rm": {"track": "A", "role": "reward", "standardize": True, "frontier": "F", "config": {"y": 1}},
        "rm2": {"extends": "rm", "config": {"y": 2}}})
    assert stages["rm2"] == {"label": "rm2", "role": "reward", "config": {"y": 2}, "track": "A", "frontier": None,
                             "standardize": True}


def _tiny_study(tmp_path):
    parser = build_parser()
    parsed = parser.parse_args(["--config", TINY_YAML])
    cfg = parser.instantiate_classes(parsed)
    for t, track in cfg.tracks.items():  # GoldCurve reads the held-out prompts when built
        write_testbed(track.testbed, 0, tmp_path / "data" / t)
    stages = resolve_stages(parsed.stages.as_dict() if hasattr(parsed.stages, "as_dict") else dict(parsed.stages))
    return cfg, parsed, stages, plan_jobs(cfg, stages, 0, str(tmp_path), dict(parsed.defaults))


def test_tiny_study_config_parses_into_two_tracks_with_the_ladder_and_its_controls(tmp_path):
    cfg, parsed, stages, jobs = _tiny_study(tmp_path)
    assert set(cfg.tracks) == {"A", "B"} and cfg.tracks["B"].testbed.gold["lexicon"] == "abc"
    check_tracks(stages, cfg.tracks)
    # the Table-3 ladder adds one trick per rung
    rung = [stages[n]["config"] for n in ("a_ppo_base", "a_ppo_advnorm", "a_ppo_largebatch", "a_ppo_ema")]
    assert [c["model"]["init_args"]["normalize_advantages"] for c in rung] == [False, True, True, True]
    assert [c["data"]["init_args"]["rollout_batch_size"] for c in rung] == [16, 16, 64, 64]
    assert [len(c["trainer"].get("callbacks", [])) for c in rung] == [0, 0, 0, 1]
    # controls: sample-matched (1/4 iterations of the large batch), compute-matched (4x iterations of the small one)
    assert stages["a_ppo_largebatch_samples"]["config"]["trainer"]["max_steps"] * 4 == rung[2]["trainer"]["max_steps"]
    assert stages["a_ppo_advnorm_long"]["config"]["trainer"]["max_steps"] == 4 * rung[1]["trainer"]["max_steps"]
    assert stages["a_ppo_kl0"]["config"]["model"]["init_args"]["kl_coef"] == 0.0
    # Track A reads the gold reward itself; Track B its standardized learned reward model
    a_reward = jobs["seed0/fit:a_ppo_base"][0].config["model"]["init_args"]["reward"]
    gold = cfg.tracks["A"].testbed.gold_args()
    assert a_reward == {"class_path": "recipes.study.testbed.GoldReward", "init_args": gold}
    b_reward = jobs["seed0/fit:b_ppo"][0].config["model"]["init_args"]["reward"]
    assert b_reward["init_args"]["path"] == str(tmp_path / "b_reward" / "hf")
    assert jobs["seed0/fit:b_reward"][0].standardize and jobs["seed0/fit:b_reward"][1] == {"seed0/fit:b_sft"}
    assert jobs["seed0/eval:b_reward"][0].config["pairs_test"] == str(tmp_path / "data" / "B" / "shifted_test.jsonl")
    assert jobs["seed0/eval:b_dpo"][1] == {"seed0/fit:b_dpo", "seed0/fit:b_sft", "seed0/fit:b_reward"}
    assert jobs["seed0/eval:a_dpo"][1] == {"seed0/fit:a_dpo", "seed0/fit:a_sft"}
    assert "seed0/eval:b_sftpref_weak" not in jobs  # helpers are not evaluated
    assert jobs["seed0/fit:b_sftpref_dpo_strong"][1] == {"seed0/fit:b_sftpref_strong"}
    config = jobs["seed0/fit:a_ppo_base"][0].config
    assert config["data"]["init_args"]["data"] == str(tmp_path / "data" / "A" / "train_prompts.jsonl")
    assert config["data"]["init_args"]["seed"] == 0 and config["seed_everything"] == 0
    # every finding reads stages (or frontiers) of its own track
    frontiers = {e["frontier"] for e in stages.values() if e["frontier"]} | {"KL-regularised optimum (IS)"}
    for f in cfg.findings:
        names = set(stages) if f.at_kl is None else frontiers
        assert set(f.contrast) <= names, f.name
        assert f.at_kl is not None or all(stages[s]["track"] == f.track for s in f.contrast), f.name
    # --only keeps what a stage and its evaluation need
    assert set(select(stages, cfg.tracks, ["b_ppo_noshift"])) == {"b_ppo_noshift", "b_reward_noshift", "b_sft",
                                                                  "b_reward"}


@pytest.mark.slow
def test_every_study_stage_instantiates_through_the_cli(tmp_path):
    """Each stage's generated Lightning config goes through the project's own CLI (``run=False``: parse and
    instantiate; models load in configure_model, so the placeholder folders need not exist yet)."""
    import yaml
    from recipes.__main__ import cli_main

    _, _, _, jobs = _tiny_study(tmp_path)
    for key, (job, _) in jobs.items():
        if job.kind != "fit":
            continue
        path = tmp_path / f"{job.stage}.yaml"
        path.write_text(yaml.safe_dump(job.config))
        cli = cli_main(["--config", str(path)], run=False)
        assert type(cli.model).__module__.startswith("recipes.modules."), key


def _eval(seed, stage, track, gold, per_prompt, kl=0.0):
    return {"seed": seed, "stage": stage, "track": track, "label": stage, "kind": "eval", "gold": gold,
            "learned_reward": 0.0, "kl": kl, "foreign_frac": 0.0, "too_long": 0.0, "out_of_support": 0.0,
            "good_frac": 0.5, "length": 5.0, "eos_rate": 1.0, "per_prompt_gold": per_prompt}


def test_report_only_rewrites_the_report_from_saved_evaluations(tmp_path):
    from recipes.study import main

    for seed, stage, gold in [(0, "a_sft", 0.25), (0, "a_dpo", 0.3), (1, "a_sft", 0.2), (1, "a_dpo", 0.1)]:
        (tmp_path / f"seed{seed}" / stage).mkdir(parents=True)
        (tmp_path / f"seed{seed}" / stage / "eval.json").write_text(json.dumps(_eval(seed, stage, "A", gold,
                                                                                     [gold] * 4)))
    report = main(["--config", TINY_YAML, "--out", str(tmp_path), "--seeds", "0", "1", "--report_only", "true",
                   "--only", "a_dpo"])
    # mean of 0.3 and 0.1; SE = sample std / sqrt(2) = 0.1414 / 1.414 = 0.100
    assert "| DPO (beta 0.1) | 0.200 ± 0.100 |" in report["table"]
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["track"], r["method"], r["seed"]) for r in rows] == [("A", "SFT", "0"), ("A", "DPO (beta 0.1)", "0"),
                                                                    ("A", "SFT", "1"), ("A", "DPO (beta 0.1)", "1")]
    assert "--report_only" not in report["table"]


SHRINK = ["stages.a_sft.config.trainer.max_steps=30", "stages.a_dpo.config.trainer.max_steps=4",
          "stages.a_ppo_base.config.trainer.max_steps=2",
          "stages.a_ppo_base.config.data.init_args.rollout_batch_size=8",
          "stages.a_ppo_base.config.model.init_args.mini_batch_size=4",
          "stages.b_reward.config.trainer.max_steps=10", "stages.b_dpo.config.trainer.max_steps=4",
          "stages.b_ppo.config.trainer.max_steps=2", "stages.b_ppo.config.data.init_args.rollout_batch_size=8",
          "stages.b_ppo.config.model.init_args.mini_batch_size=4"]


@pytest.mark.slow
def test_shrunken_study_of_both_tracks_writes_table_csv_plots_and_doc(tmp_path):
    from recipes.study import main
    from recipes.study.report import BEGIN, END, PLOTS

    doc = tmp_path / "doc" / "study.md"
    doc.parent.mkdir()
    doc.write_text(f"# Study\n\n{BEGIN}\nOLD-CONTENT\n{END}\n\nafter\n")
    report = main(["--config", TINY_YAML, "--out", str(tmp_path / "out"), "--seeds", "[0]", "--workers", "2",
                   "--only", "a_dpo", "a_ppo_base", "b_dpo", "b_ppo", "--eval.samples_per_prompt", "1",
                   "--eval.optimum_samples", "8", "--eval.curve_every_n_steps", "2", "--eval.curve_prompts", "4",
                   "--doc", str(doc), "--set", *SHRINK])
    out = tmp_path / "out"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["track"], r["stage"]) for r in rows] == [("A", "a_sft"), ("A", "a_dpo"), ("A", "a_ppo_base"),
                                                        ("B", "b_sft"), ("B", "b_dpo"), ("B", "b_ppo")]
    assert {"track", "method", "seed", "gold", "kl"} <= set(rows[0])
    assert rows[0]["method"] == "SFT" and float(rows[0]["kl"]) == pytest.approx(0.0, abs=1e-5)
    assert float(rows[0]["win_rate"]) == 0.5  # SFT against itself: every prompt a tie
    table = (out / "results.md").read_text()
    assert "### Track A" in table and "### Track B" in table and "± 0.000" not in table
    assert "| reward model (shifted pairs) |" in table and "Bayes accuracy" in table
    verdicts = {j["finding"]: j["verdict"] for j in report["findings"]}
    assert verdicts["PPO > DPO-Iter"] == "not run" and verdicts["PPO > DPO at matched KL 1"] in ("1 seed", "not run")
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (doc.parent / "img" / name).exists()
    text = doc.read_text()
    assert text.startswith("# Study\n\n" + BEGIN) and text.endswith(END + "\n\nafter\n") and "OLD-CONTENT" not in text
    assert "](img/study_gold_vs_kl.png)" in text
    assert '"step": 0' in (out / "seed0" / "b_dpo" / "gold_curve.json").read_text()
    rm = json.loads((out / "seed0" / "b_reward" / "eval.json").read_text())
    assert 0.5 < rm["bayes_accuracy"] < 1 and rm["standardization"]["scale"] > 0


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped has finished)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_when_the_study_is_killed(tmp_path):
    """The study's workers are SIGKILLed by the kernel when the study process dies, even by SIGKILL (no cleanup
    code runs then): a killed study leaves nothing training on."""
    script = tmp_path / "study.py"
    script.write_text(
        "import os, sys, time\n"
        "from recipes.study.runner import worker_pool\n"
        "def work(folder):\n"  # runs after the worker's initializer: the death signal is armed
        "    open(os.path.join(folder, str(os.getpid())), 'w').close()\n"
        "    time.sleep(300)\n"
        "if __name__ == '__main__':\n"
        "    pool = worker_pool(2)\n"
        "    futures = [pool.submit(work, sys.argv[1]) for _ in range(2)]\n"
        "    time.sleep(300)\n")
    started = tmp_path / "started"
    started.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(started)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120  # spawned interpreters import the package: slow on a loaded machine
        while len(list(started.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [int(p.name) for p in started.iterdir()]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers), workers
    finally:
        proc.kill()
