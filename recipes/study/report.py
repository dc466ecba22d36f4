"""The study's report: one row per method and seed (gold reward, learned reward, KL to SFT, win-rate against SFT by
gold reward, response shape), mean ± std across seeds, the paper's findings checked seed by seed, and PNG plots."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from recipes.evaluate.metrics import win_tie_loss

COLUMNS = ("gold", "learned_reward", "kl", "win_rate", "foreign_frac", "too_long", "length", "eos_rate")
HEADERS = {"gold": "gold reward", "learned_reward": "learned reward", "kl": "KL to SFT", "win_rate": "win-rate vs SFT",
           "foreign_frac": "foreign chars", "too_long": "too long", "length": "length", "eos_rate": "EOS rate"}
# The paper's findings as (name, the stages each compares, a test on their gold rewards).
FINDINGS = (
    ("PPO >= DPO-Iter > DPO", ("ppo_ema", "dpo_iter", "dpo"), lambda p, i, d: p >= i > d),
    ("+adv. norm does not hurt", ("ppo_advnorm", "ppo_base"), lambda a, b: a >= b),
    ("+large batch does not hurt", ("ppo_largebatch", "ppo_advnorm"), lambda a, b: a >= b),
    ("+EMA ref. does not hurt", ("ppo_ema", "ppo_largebatch"), lambda a, b: a >= b),
    ("full ladder > PPO base", ("ppo_ema", "ppo_base"), lambda a, b: a > b),
    ("SFT-on-preferred narrows DPO's gap", ("dpo_sft_preferred", "dpo"), lambda a, b: a > b),
)


def table_rows(evals: Sequence[dict[str, Any]], order: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (seed, method) in ``order``; the win-rate compares per-prompt gold with the seed's SFT row
    (`recipes.evaluate.metrics.win_tie_loss`, ties count half)."""
    by_key = {(e["seed"], e["stage"]): e for e in evals}
    rows = []
    for seed in sorted({e["seed"] for e in evals}):
        sft = by_key.get((seed, "sft"))
        for stage in order:
            e = by_key.get((seed, stage))
            if e is None:
                continue
            row = {"seed": seed, "method": stage, "label": e["label"]}
            row.update({k: e[k] for k in COLUMNS if k != "win_rate"})
            row["win_rate"] = (win_tie_loss(torch.tensor(e["per_prompt_gold"]),
                                            torch.tensor(sft["per_prompt_gold"])).win_rate if sft else float("nan"))
            rows.append(row)
    return rows


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def findings(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each paper finding checked per seed on held-out gold reward: ``{finding, stages, per_seed: {seed: bool},
    holds, of}``; findings whose stages were not run are left out."""
    gold = {(r["seed"], r["method"]): r["gold"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    out = []
    for name, stages, test in FINDINGS:
        if not all((seeds[0], s) in gold for s in stages):
            continue
        per_seed = {seed: bool(test(*(gold[(seed, s)] for s in stages))) for seed in seeds}
        out.append({"finding": name, "stages": stages, "per_seed": per_seed, "holds": sum(per_seed.values()),
                    "of": len(seeds)})
    return out


def markdown(rows: Sequence[dict[str, Any]], order: Sequence[str], checks: Sequence[dict[str, Any]],
             wall_seconds: float) -> str:
    """The summary table (mean ± std over seeds), the per-seed table and the findings, as markdown."""
    seeds = sorted({r["seed"] for r in rows})
    head = "| method | " + " | ".join(HEADERS[c] for c in COLUMNS) + " |"
    rule = "|---" * (len(COLUMNS) + 1) + "|"
    lines = [f"Held-out gold reward and the rest over {len(seeds)} seed(s) {seeds}: mean ± std "
             + (f"(wall time {wall_seconds / 60:.1f} min)." if wall_seconds else ""), "", head, rule]
    for stage in order:
        mine = [r for r in rows if r["method"] == stage]
        if mine:
            cells = [f"{m:.3f} ± {s:.3f}" for m, s in (mean_std([r[c] for r in mine]) for c in COLUMNS)]
            lines.append(f"| {mine[0]['label']} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed:", "", "| seed | " + head[2:], "|---" + rule]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['label']} | " + " | ".join(f"{r[c]:.3f}" for c in COLUMNS) + " |")
    if checks:
        lines += ["", "The paper's findings on held-out gold reward, seed by seed:", "",
                  "| finding | holds in | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|---" + "|---" * len(seeds) + "|"]
        for c in checks:
            marks = " | ".join("yes" if c["per_seed"][s] else "no" for s in seeds)
            lines.append(f"| {c['finding']} | {c['holds']}/{c['of']} | {marks} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]], order: Sequence[str], out: Path) -> list[str]:
    """``study_gold_vs_kl.png`` (each seed a small marker, the mean a large one) and ``study_reward_curves.png``
    (held-out gold reward over training steps, mean over seeds; DPO family and PPO ladder side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {stage: plt.get_cmap("tab10")(i % 10) for i, stage in enumerate(order)}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for stage in order:
        mine = [r for r in rows if r["method"] == stage]
        if not mine:
            continue
        ax.scatter([r["kl"] for r in mine], [r["gold"] for r in mine], s=14, alpha=0.5, color=colors[stage])
        ax.scatter([mean_std([r["kl"] for r in mine])[0]], [mean_std([r["gold"] for r in mine])[0]], s=90,
                   color=colors[stage], edgecolor="black", label=mine[0]["label"])
    ax.set_xlabel("KL(policy || SFT) on held-out prompts (nats per response)")
    ax.set_ylabel("gold reward on held-out prompts")
    ax.set_title("Gold reward against KL to the SFT policy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [str(out / "study_gold_vs_kl.png")]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for stage in order:
        curves = [e["curve"] for e in evals if e["stage"] == stage and e.get("curve")]
        if not curves:
            continue
        steps = sorted({p["step"] for c in curves for p in c})
        means = [mean_std([p["gold"] for c in curves for p in c if p["step"] == s])[0] for s in steps]
        ax = axes[1] if stage.startswith("ppo") else axes[0]
        label = next(e["label"] for e in evals if e["stage"] == stage)
        ax.plot(steps, means, marker=".", color=colors[stage], label=label)
    axes[0].set_title("DPO family (optimizer steps)")
    axes[1].set_title("PPO ladder (PPO iterations)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out gold reward (mean over seeds)")
    fig.tight_layout()
    paths.append(str(out / "study_reward_curves.png"))
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def write_report(evals: Sequence[dict[str, Any]], stages: dict[str, dict[str, Any]], out: Path,
                 wall_seconds: float = 0.0, seeds: Sequence[int] = ()) -> dict[str, Any]:
    """Write ``results.csv``, ``results.md`` and the plots into ``out``; returns rows, findings, table, paths."""
    order = [name for name, entry in stages.items() if entry["evaluate"]]
    rows = table_rows(evals, order)
    checks = findings(rows)
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["seed", "method", "label", *COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, order, checks, wall_seconds)
    (out / "results.md").write_text(table, encoding="utf-8")
    return {"rows": rows, "findings": checks, "table": table, "plots": plot(rows, evals, order, out), "out": str(out)}


def probe_markdown(probes: Sequence[dict[str, Any]], out: Path) -> str:
    """Write ``probes.csv`` (one row per seed and probe) and return the mean-over-seeds table as markdown."""
    with open(out / "probes.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["seed", "probe", "learned_reward", "gold"])
        writer.writeheader()
        writer.writerows(probes)
    intro = ("The learned reward model on hand-made held-out responses, inside and outside the pairs' support "
             "(mean ± std over seeds):")
    lines = ["", intro, "", "| response | learned reward | gold reward |", "|---|---|---|"]
    for name in dict.fromkeys(p["probe"] for p in probes):
        mine = [p for p in probes if p["probe"] == name]
        (lm, ls), (gm, gs) = mean_std([p["learned_reward"] for p in mine]), mean_std([p["gold"] for p in mine])
        lines.append(f"| {name} | {lm:.3f} ± {ls:.3f} | {gm:.3f} ± {gs:.3f} |")
    return "\n".join(lines) + "\n"
