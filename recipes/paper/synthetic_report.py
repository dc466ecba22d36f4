"""Reporting of the synthetic experiment (`recipes.paper.synthetic`): the markdown block of the doc (tables over seeds,
paired differences with verdicts), its rewriting between marker comments, and the Fig. 1-style plot (matplotlib Agg)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

SeedResult = Any  # `recipes.paper.synthetic.SeedResult` (that module imports this one, so not the other way round)
SyntheticConfig = Any  # `recipes.paper.synthetic.SyntheticConfig`, likewise

BEGIN, END = "<!-- synthetic:begin -->", "<!-- synthetic:end -->"
INTERVAL_SE = 2.0  # a verdict reads the interval mean ± 2 SE of the paired difference (~88% coverage at 5 seeds)
POLICIES = ("reference", "dpo", "ppo", "ppo_kl0", "kl_optimum")  # SeedResult fields, in table order


def labels(config: SyntheticConfig) -> dict[str, str]:
    """Row label of each policy field of a `SeedResult`."""
    return {
        "reference": "pi_ref",
        "dpo": f"DPO (beta {config.beta})",
        "ppo": f"PPO, kl_coef {config.beta}",
        "ppo_kl0": "PPO, kl_coef 0 (control)",
        "kl_optimum": f"closed-form KL optimum of the RM (beta {config.beta})",
    }


def _short(config: SyntheticConfig) -> dict[str, str]:
    """Short labels, for column headers and plots."""
    return {"reference": "pi_ref", "dpo": "DPO", "ppo": f"PPO kl {config.beta}", "ppo_kl0": "PPO kl 0",
            "kl_optimum": "KL optimum"}


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def format_markdown(results: list[SeedResult], config: SyntheticConfig) -> str:
    """Mean ± std over seeds of each statistic, one row per policy."""
    lines = [
        f"| policy ({len(results)} seeds, mean ± std) | out-of-data mass | pi(optimal y) | diagonal accuracy |",
        "|---|---|---|---|",
    ]
    for name, label in labels(config).items():
        stats = [asdict(getattr(result, name)) for result in results]
        keys = ("out_of_data_mass", "diagonal_prob", "diagonal_accuracy")
        cells = [_mean_std([s[key] for s in stats]) for key in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Claim:
    """``minuend - subtrahend`` (out-of-data mass, paired by seed) is claimed ``direction`` ``threshold``."""

    text: str
    minuend: str  # a policy field of SeedResult
    subtrahend: str
    direction: Literal[">", "<"]
    threshold: float


def claims(config: SyntheticConfig) -> list[Claim]:
    """The experiment's claims, with thresholds fixed before the runs (0 for a direction, ``near_margin`` for near)."""
    return [
        Claim("DPO moves mass out of data", "dpo", "reference", ">", 0.0),
        Claim("DPO puts more mass out of data than PPO with the KL", "dpo", "ppo", ">", 0.0),
        Claim("without the KL, PPO puts more mass out of data (the KL is the mechanism)", "ppo_kl0", "ppo", ">", 0.0),
        Claim("with the KL, PPO stays near pi_ref", "ppo", "reference", "<", config.near_margin),
    ]


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error (numpy, ddof 1) of the per-seed differences ``a - b``."""
    diff = np.asarray(a) - np.asarray(b)
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def verdict(mean: float, se: float, direction: str, threshold: float) -> str:
    """reproduced if all of mean ± INTERVAL_SE * se is on the claimed side of ``threshold``, not reproduced if all of
    it is on the other side, inconclusive otherwise."""
    low, high = mean - INTERVAL_SE * se, mean + INTERVAL_SE * se
    above, below = low > threshold, high < threshold
    if (direction == ">" and above) or (direction == "<" and below):
        return "reproduced"
    if (direction == ">" and below) or (direction == "<" and above):
        return "not reproduced"
    return "inconclusive"


def format_claims(results: list[SeedResult], config: SyntheticConfig) -> str:
    """One row per claim: the paired difference of out-of-data mass over seeds, its interval and the verdict."""
    names = labels(config)
    lines = [
        (f"| claim (out-of-data mass, paired over {len(results)} seeds) | difference | mean ± SE "
         f"| mean ± {INTERVAL_SE:g} SE | threshold | verdict |"),
        "|---|---|---|---|---|---|",
    ]
    for claim in claims(config):
        a = [getattr(r, claim.minuend).out_of_data_mass for r in results]
        b = [getattr(r, claim.subtrahend).out_of_data_mass for r in results]
        mean, se = paired_difference(a, b)
        low, high = mean - INTERVAL_SE * se, mean + INTERVAL_SE * se
        lines.append(
            f"| {claim.text} | {names[claim.minuend]} − {names[claim.subtrahend]} | {mean:+.3f} ± {se:.3f} "
            f"| [{low:+.3f}, {high:+.3f}] | {claim.direction} {claim.threshold:g} "
            f"| {verdict(mean, se, claim.direction, claim.threshold)} |"
        )
    return "\n".join(lines)


def format_seeds(results: list[SeedResult], config: SyntheticConfig) -> str:
    """Out-of-data mass of each policy per seed, and how many prompts the RM misranks out of data."""
    header = " | ".join(_short(config)[name] for name in POLICIES)
    lines = [
        f"| out-of-data mass: seed | {header} | prompts where the RM rates an out-of-data y above the optimal |",
        "|---" * (len(POLICIES) + 2) + "|",
    ]
    for r in results:
        cells = " | ".join(f"{getattr(r, name).out_of_data_mass:.3f}" for name in POLICIES)
        overrated = round(r.reward_overrated * config.num_prompts)
        lines.append(f"| {r.seed} | {cells} | {overrated} of {config.num_prompts} |")
    return "\n".join(lines)


def render_doc_block(results: list[SeedResult], config: SyntheticConfig, command: str) -> str:
    """The doc's synthetic block, markers included: the command, the config, and every table of the experiment."""
    setup = ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in fields(config))
    return "\n".join([
        BEGIN,
        "",
        (f"Written by `{command}` (it rewrites this block: change the code and rerun, do not edit by hand), with "
         f"`SyntheticConfig({setup})`."),
        "",
        format_markdown(results, config),
        "",
        format_claims(results, config),
        "",
        format_seeds(results, config),
        "",
        (f"Final DPO loss {_mean_std([r.dpo_final_loss for r in results])}; reward model pair accuracy "
         f"{_mean_std([r.reward_pair_accuracy for r in results])}; RM scale (std of the raw reward under pi_ref, "
         f"what PPO's reward is divided by{'' if config.normalize_reward else ': not applied here'}) "
         f"{_mean_std([r.reward_scale for r in results])}."),
        "",
        END,
    ])


def write_doc_block(path: Path, block: str) -> None:
    """Replace the text from the ``BEGIN`` marker line to the ``END`` one (both kept) in ``path`` by ``block``."""
    text = Path(path).read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(
            f"{path}: needs exactly one '{BEGIN}' line and one '{END}' line after it, around the synthetic "
            f"experiment's tables; add them where the tables belong and rerun."
        )
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    Path(path).write_text(text[:start] + block + text[stop:])


def read_doc_block(path: Path) -> str:
    """The block ``write_doc_block`` would replace, markers included."""
    text = Path(path).read_text()
    return text[text.index(BEGIN) : text.index(END) + len(END)]


def _bars(ax: Any, results: list[SeedResult], config: SyntheticConfig, metric: str, title: str, legend: str) -> None:
    """Mean ± std bars of ``metric`` per policy with each seed as a dot and pi_ref's mean as a dashed line."""
    names = [name for name in POLICIES if name != "kl_optimum"]
    short = {name: label.replace(" kl", "\nkl") for name, label in _short(config).items()}
    colors = {"reference": "tab:gray", "dpo": "tab:red", "ppo": "tab:blue", "ppo_kl0": "tab:orange"}
    for i, name in enumerate(names):
        values = [getattr(getattr(r, name), metric) for r in results]
        ax.bar(i, statistics.mean(values), yerr=statistics.stdev(values), capsize=4, color=colors[name], alpha=0.7)
        ax.scatter([i + 0.15 * (k / max(len(values) - 1, 1) - 0.5) for k in range(len(values))], values, s=12,
                   color="black", zorder=3, label="one seed" if i == 0 else None)
    ax.axhline(statistics.mean(getattr(r.reference, metric) for r in results), color="tab:gray", ls="--", lw=1,
               label="pi_ref")
    ax.set_xticks(range(len(names)), [short[name] for name in names])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(title)
    ax.set_title(f"{title}: mean ± std, {len(results)} seeds")
    ax.legend(loc=legend, fontsize=8)


def _claims_panel(ax: Any, results: list[SeedResult], config: SyntheticConfig) -> None:
    """Each claim's paired difference with its ± INTERVAL_SE * SE bar and its threshold."""
    short = _short(config)
    items = claims(config)
    for i, claim in enumerate(items):
        a = [getattr(r, claim.minuend).out_of_data_mass for r in results]
        b = [getattr(r, claim.subtrahend).out_of_data_mass for r in results]
        mean, se = paired_difference(a, b)
        ax.errorbar(mean, i, xerr=INTERVAL_SE * se, fmt="o", color="black", capsize=4)
        ax.plot([claim.threshold] * 2, [i - 0.3, i + 0.3], color="tab:green", lw=2,
                label="threshold" if i == 0 else None)
        ax.text(mean, i + 0.22, verdict(mean, se, claim.direction, claim.threshold), ha="center", fontsize=8)
    ax.axvline(0, color="tab:gray", lw=0.8)
    ax.set_yticks(range(len(items)), [f"{short[c.minuend]} − {short[c.subtrahend]}\n{c.direction} {c.threshold:g}?"
                                      for c in items], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("paired difference of out-of-data mass")
    ax.set_title(f"claims: mean ± {INTERVAL_SE:g} SE over seeds")
    ax.legend(loc="lower right", fontsize=8)


def plot(results: list[SeedResult], in_data: torch.Tensor, config: SyntheticConfig, path: Path) -> None:
    """Top: out-of-data mass and pi(optimal y) per policy over seeds, the claims, and seed 0's learned reward.
    Bottom: seed 0's pi(y | x) tables, with the data's coverage (``in_data``, the prompt x response mask of
    `recipes.paper.synthetic.in_data_mask`) outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(19, 9))
    _bars(axes[0, 0], results, config, "out_of_data_mass", "out-of-data mass", "upper right")
    _bars(axes[0, 1], results, config, "diagonal_prob", "pi(optimal y)", "upper left")
    _claims_panel(axes[0, 2], results, config)

    def outline(ax: Any) -> None:
        for i, j in in_data.nonzero().tolist():
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="orange", lw=1.5))
        ax.set_xlabel("response y (orange: in preference data)")
        ax.set_ylabel("prompt x")

    reward = torch.tensor(results[0].tables["reward"])
    bound = reward.abs().max().item()
    image = axes[0, 3].imshow(reward, cmap="RdBu_r", vmin=-bound, vmax=bound)
    fig.colorbar(image, ax=axes[0, 3], fraction=0.046)
    overrated = (reward > reward.diagonal()[:, None]) & ~in_data
    for i, j in overrated.nonzero().tolist():
        axes[0, 3].text(j, i, "★", ha="center", va="center", color="black", fontsize=11)
    outline(axes[0, 3])
    axes[0, 3].set_title(f"learned reward{' (normalized)' if config.normalize_reward else ''}, seed 0\n"
                         "★: out of data, rated above the optimal y", fontsize=10)
    for ax, name in zip(axes[1], ("pi_ref", "DPO", "PPO", "PPO kl 0"), strict=True):
        image = ax.imshow(results[0].tables[name], vmin=0, vmax=1, cmap="Blues")
        outline(ax)
        title = {"PPO": f"PPO, kl_coef {config.beta}", "PPO kl 0": "PPO, kl_coef 0 (control)"}.get(name, name)
        ax.set_title(f"{title}: pi(y | x), seed 0")
    fig.colorbar(image, ax=axes[1, 3], fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
