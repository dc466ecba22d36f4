"""The evaluation command's outputs: a table shaped like Table 4 of Xu et al. 2024 (one row per method: reward-model
score, win/tie/loss against each baseline; KL, judge and SafeRLHF columns when measured) as Markdown and CSV, the
JSON report, and PNG plots (score histograms per method, win/tie/loss bars).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

CHOSEN = "chosen"


def _wtl(c: Mapping[str, Any]) -> str:
    return f"{c['win']}/{c['tie']}/{c['loss']} ({c['win_rate']:.2f})"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]], list[dict[str, Any]]]:
    """(Markdown header, Markdown rows, CSV records): one row per policy, then the dataset's chosen responses."""
    policies: Mapping[str, Any] = report["policies"]
    comparisons = {(c["policy"], c["baseline"]): c for c in report["comparisons"]}
    judged = {(c["policy"], c["baseline"]): c for c in report.get("judge") or []}
    baselines = list(dict.fromkeys(b for _, b in comparisons))
    judge_baselines = list(dict.fromkeys(b for _, b in judged))
    has_kl = any(p.get("kl") for p in policies.values())
    safety = report.get("safety") or {}
    header = ["method", "RM score"] + [f"vs {b} W/T/L" for b in baselines]
    header += [f"judge vs {b} W/T/L" for b in judge_baselines] + (["KL"] if has_kl else [])
    header += ["Δhelp", "harm", "safety rate"] if safety else []
    md_rows, records = [], []
    for name, p in policies.items():
        reward = p.get("reward")
        row = [name, f"{reward['mean']:.3f} ± {reward['std']:.3f}" if reward else "-"]
        record: dict[str, Any] = {"method": name, "rm_mean": reward and reward["mean"],
                                  "rm_std": reward and reward["std"]}
        for b in baselines:
            c = comparisons.get((name, b))
            row.append(_wtl(c) if c else "-")
            for k in ("win", "tie", "loss", "win_rate"):
                record[f"vs_{b}_{k}"] = c[k] if c else None
        for b in judge_baselines:
            c = judged.get((name, b))
            row.append(_wtl(c) + (f", {c['failed']} failed" if c and c["failed"] else "") if c else "-")
            for k in ("win", "tie", "loss", "win_rate", "failed"):
                record[f"judge_vs_{b}_{k}"] = c[k] if c else None
        if has_kl:
            row.append(_fmt(p["kl"]["mean"]) if p.get("kl") else "-")
            record["kl"] = p["kl"]["mean"] if p.get("kl") else None
        if safety:
            s = safety.get(name, {})
            row += [_fmt(s.get("delta_help")), _fmt(s.get("harm")), _fmt(s.get("safety_rate"), 2)]
            record.update({k: s.get(k) for k in ("delta_help", "harm", "safety_rate")})
        md_rows.append(row)
        records.append(record)
    chosen = report.get(CHOSEN)
    if chosen and chosen.get("reward"):
        r = chosen["reward"]
        md_rows.append([f"{CHOSEN} (dataset)", f"{r['mean']:.3f} ± {r['std']:.3f}"] + ["-"] * (len(header) - 2))
        records.append({"method": CHOSEN, "rm_mean": r["mean"], "rm_std": r["std"]})
    return header, md_rows, records


def write_table(report: Mapping[str, Any], out_dir: str) -> tuple[str, str]:
    """Write ``table.md`` and ``table.csv``; return their paths."""
    header, rows, records = table_rows(report)
    md = os.path.join(out_dir, "table.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(f"Prompts: {report['prompts']['kept']}; reward-model tie margin: {report['tie_margin']}.\n\n")
        f.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
        f.writelines("| " + " | ".join(row) + " |\n" for row in rows)
    path = os.path.join(out_dir, "table.csv")
    fields = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
    return md, path


def write_json(report: Mapping[str, Any], out_dir: str) -> str:
    path = os.path.join(out_dir, "report.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
    return path


def write_generations(path: str, prompts: Sequence[str], rows: Mapping[str, Mapping[str, Sequence[Any]]]) -> str:
    """One JSON line per (policy, prompt): ``{"method", "index", "prompt", "response", <per-response values>}``."""
    with open(path, "w", encoding="utf-8") as f:
        for method, columns in rows.items():
            for i, prompt in enumerate(prompts):
                values = {k: v[i] for k, v in columns.items() if v is not None}
                f.write(json.dumps({"method": method, "index": i, "prompt": prompt, **values}) + "\n")
    return path


def plot_scores(scores: Mapping[str, Sequence[float]], path: str, title: str = "reward-model scores") -> str:
    """Overlaid histograms of each method's scores on shared bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.concatenate([np.asarray(v, dtype=float) for v in scores.values()])
    lo, hi = float(values.min()), float(values.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, v in scores.items():
        ax.hist(v, bins=bins, alpha=0.45, label=f"{name} (mean {np.mean(v):.2f})", histtype="stepfilled")
    ax.set_xlabel("score")
    ax.set_ylabel("responses")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_win_tie_loss(comparisons: Sequence[Mapping[str, Any]], path: str) -> str:
    """Horizontal stacked bars of win / tie / loss shares, one bar per (policy, baseline, judged by)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{c['policy']} vs {c['baseline']} ({c['by']})" for c in comparisons]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(labels) + 1.5))
    left = [0.0] * len(comparisons)
    for part, color in (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red")):
        share = [c[part] / c["n"] if c["n"] else 0.0 for c in comparisons]
        ax.barh(labels, share, left=left, color=color, label=part)
        left = [a + b for a, b in zip(left, share)]
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of prompts")
    ax.invert_yaxis()
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
