"""Reporting of the synthetic experiment (`recipes.paper.synthetic`): the markdown table of mean ± std over seeds
and the Fig. 1-style plot (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

SeedResult = Any  # `recipes.paper.synthetic.SeedResult` (that module imports this one, so not the other way round)


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def format_markdown(results: list[SeedResult]) -> str:
    """Mean ± std over seeds of each statistic, one row per policy."""
    lines = [
        f"| policy ({len(results)} seeds) | out-of-data mass | pi(optimal y) | diagonal accuracy |",
        "|---|---|---|---|",
    ]
    labels = dict(reference="pi_ref", dpo="DPO", ppo="PPO (learned RM)", kl_optimum="closed-form KL optimum of the RM")
    for name in ("reference", "dpo", "ppo", "kl_optimum"):
        stats = [asdict(getattr(result, name)) for result in results]
        cells = [
            _mean_std([s[key] for s in stats]) for key in ("out_of_data_mass", "diagonal_prob", "diagonal_accuracy")
        ]
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nFinal DPO loss: {_mean_std([r.dpo_final_loss for r in results])}; "
        f"reward model pair accuracy: {_mean_std([r.reward_pair_accuracy for r in results])}"
    )
    return "\n".join(lines)


def plot(results: list[SeedResult], in_data: torch.Tensor, path: Path) -> None:
    """Bar chart of out-of-data mass over seeds, and seed 0's pi(y | x) tables with the data's coverage (``in_data``,
    the prompt x response mask of `recipes.paper.synthetic.in_data_mask`) outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    names, keys = ["pi_ref", "DPO", "PPO"], ["reference", "dpo", "ppo"]
    for metric, offset, label in (
        ("out_of_data_mass", -0.2, "out-of-data mass"),
        ("diagonal_prob", 0.2, "pi(optimal y)"),
    ):
        values = [[getattr(getattr(r, key), metric) for r in results] for key in keys]
        means = [statistics.mean(v) for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        axes[0].bar([i + offset for i in range(3)], means, width=0.4, yerr=stds, capsize=3, label=label)
    axes[0].set_xticks(range(3), names)
    axes[0].set_ylim(0, 1)
    axes[0].legend(loc="upper left", fontsize=8)
    axes[0].set_title(f"mean ± std over {len(results)} seeds")
    for ax, name in zip(axes[1:], names, strict=True):
        ax.imshow(results[0].tables[name], vmin=0, vmax=1, cmap="Blues")
        for i, j in in_data.nonzero().tolist():
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="orange", lw=1.2))
        ax.set_title(f"{name}: pi(y | x), seed 0")
        ax.set_xlabel("response y (orange: in preference data)")
        ax.set_ylabel("prompt x")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
