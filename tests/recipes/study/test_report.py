"""The study's report: tidy rows with win-rates against the track's SFT, frontiers through SFT at KL 0, findings
judged on paired per-seed differences, no spurious precision for one seed, and the doc block rewrite."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from recipes.study.findings import Finding
from recipes.study.report import BEGIN, END, OPTIMUM, frontier_points, judge_findings, markdown, table_rows, write_doc

TRACKS = {"A": SimpleNamespace(title="track a (test)", sft="sft", reward=None)}
STAGES = {"sft": {"track": "A", "role": "policy", "label": "SFT", "frontier": None, "config": {}},
          "dpo": {"track": "A", "role": "policy", "label": "DPO", "frontier": "DPO grid", "config": {}},
          "dpo2": {"track": "A", "role": "policy", "label": "DPO 2", "frontier": "DPO grid", "config": {}},
          "ppo": {"track": "A", "role": "policy", "label": "PPO", "frontier": None, "config": {}}}


def _eval(seed, stage, gold, per_prompt, kl=0.0, oos=0.0, **extra):
    return {"seed": seed, "stage": stage, "track": "A", "label": stage, "gold": gold, "learned_reward": math.nan,
            "kl": kl, "foreign_frac": 0.0, "too_long": oos, "out_of_support": oos, "good_frac": 0.5, "length": 5.0,
            "per_prompt_gold": per_prompt, **extra}


def _evals():
    """Seed 0: DPO per-prompt (0.5, 0.2, 0.1, 0.4) against SFT (0.3, 0.3, 0.1, 0.3): win, loss, tie, win ->
    win-rate (2 + 0.5) / 4 = 0.625. PPO - DPO: seed 0 0.6 - 0.3 = 0.3, seed 1 0.5 - 0.3 = 0.2, seed 2 0.4 - 0.3 =
    0.1 -> mean 0.2, sample std 0.1, SE 0.1 / sqrt(3) = 0.0577: mean - 2 SE = 0.085 > 0, reproduced."""
    out = []
    for seed, ppo in [(0, 0.6), (1, 0.5), (2, 0.4)]:
        out += [_eval(seed, "sft", 0.25, [0.3, 0.3, 0.1, 0.3], optimum=[{"kl": 1.0, "gold": 0.9}]),
                _eval(seed, "dpo", 0.3, [0.5, 0.2, 0.1, 0.4], kl=1.0, oos=0.2),
                _eval(seed, "dpo2", 0.5, [0.5] * 4, kl=3.0),
                _eval(seed, "ppo", ppo, [ppo] * 4, kl=0.5)]
    return out


def test_rows_win_rate_and_frontiers():
    rows = table_rows(_evals(), STAGES, TRACKS)
    assert [(r["seed"], r["method"]) for r in rows[:4]] == [(0, "SFT"), (0, "DPO"), (0, "DPO 2"), (0, "PPO")]
    assert rows[1]["win_rate"] == pytest.approx(0.625) and rows[0]["win_rate"] == 0.5
    fronts = frontier_points(rows, _evals(), STAGES, TRACKS)["A"]
    assert fronts[(0, "DPO grid")] == [(0.0, 0.25), (1.0, 0.3), (3.0, 0.5)]  # SFT at KL 0, then the grid
    assert fronts[(0, OPTIMUM)] == [(0.0, 0.25), (1.0, 0.9)]


def test_findings_judged_on_paired_differences():
    rows = table_rows(_evals(), STAGES, TRACKS)
    fronts = frontier_points(rows, _evals(), STAGES, TRACKS)
    findings = [Finding("PPO > DPO", "A", {"ppo": 1, "dpo": -1}),
                # DPO grid at KL 2: 0.3 + (0.5 - 0.3) / 2 = 0.4; optimum never reaches KL 2 -> not run
                Finding("grid at KL 2", "A", {"DPO grid": 1}, at_kl=2.0),
                Finding("optimum at KL 2", "A", {OPTIMUM: 1}, at_kl=2.0),
                Finding("DPO out of support", "A", {"dpo": 1, "sft": -1}, metric="out_of_support", delta=0.05),
                Finding("missing stage", "A", {"ppo": 1, "nope": -1})]
    judged = {j["finding"]: j for j in judge_findings(findings, rows, fronts, [0, 1, 2])}
    j = judged["PPO > DPO"]
    assert j["mean"] == pytest.approx(0.2) and j["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert j["verdict"] == "reproduced" and j["per_seed"] == pytest.approx({0: 0.3, 1: 0.2, 2: 0.1})
    assert judged["grid at KL 2"]["mean"] == pytest.approx(0.4) and judged["grid at KL 2"]["se"] == pytest.approx(0)
    assert judged["optimum at KL 2"]["verdict"] == "not run"
    assert judged["DPO out of support"]["mean"] == pytest.approx(0.2)  # identical on every seed: SE 0
    assert judged["DPO out of support"]["verdict"] == "reproduced"
    assert judged["missing stage"]["verdict"] == "not run"
    one = judge_findings(findings[:1], [r for r in rows if r["seed"] == 0], fronts, [0])[0]
    assert one["verdict"] == "1 seed" and one["n"] == 1


def test_markdown_names_tracks_and_never_prints_a_zero_spread_for_one_seed():
    evals = [e for e in _evals() if e["seed"] == 0]
    rows = table_rows(evals, STAGES, TRACKS)
    fronts = frontier_points(rows, evals, STAGES, TRACKS)
    study = {"seeds": [0], "tracks": TRACKS, "stages": STAGES, "command": "python -m recipes study --x"}
    judged = judge_findings([Finding("PPO > DPO", "A", {"ppo": 1, "dpo": -1})], rows, fronts, [0])
    text = markdown(rows, evals, study, judged, fronts)
    assert "**A**, track a (test)" in text and "### Track A: track a (test)" in text
    assert "± 0.000" not in text and "| PPO > DPO | A | 0.300 (1 seed) (gold) | 0.03 | 1 | 1 seed |" in text
    assert "| A | 0 | DPO | 0.300 | 1.000 |" in text  # the tidy per-seed row: track, seed, method, gold, KL
    assert "Best method on held-out gold: PPO, 0.350 (1 seed) above SFT." in text
    # the DPO grid at KL 1 is its own point; at KL 4 beyond its last point (3.0): not reached
    assert "| DPO grid | 0.300 (1 seed) | 0.400 (1 seed) | — |" in text


def test_write_doc_replaces_only_the_block_and_copies_plots(tmp_path):
    doc, plot = tmp_path / "docs" / "study.md", tmp_path / "p.png"
    doc.parent.mkdir()
    plot.write_bytes(b"png")
    doc.write_text(f"intro\n{BEGIN}\nstale numbers\n{END}\noutro\n")
    write_doc(doc, "fresh\n", [str(plot)])
    assert doc.read_text() == f"intro\n{BEGIN}\nfresh\n{END}\noutro\n"
    assert (doc.parent / "img" / "p.png").read_bytes() == b"png"
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="no study block"):
        write_doc(tmp_path / "bare.md", "x", [])
