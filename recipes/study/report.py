"""The study's report: a tidy row per track × method × seed (gold reward, KL to the track's SFT policy, learned
reward, win-rate against SFT, response shape), each method's frontier of gold against KL with its value at matched
KLs, the reward models against their Bayes accuracy, every `recipes.study.findings.Finding` judged on paired per-seed
differences, PNG plots, and the same report written into docs/study.md between its markers."""

from __future__ import annotations

import csv
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from recipes.evaluate.metrics import win_tie_loss
from recipes.study.findings import format_estimate, gold_at_kl, judge, paired_stats, per_seed_values

COLUMNS = ("gold", "kl", "learned_reward", "win_rate", "out_of_support", "too_long", "foreign_frac", "good_frac",
           "length")
HEADERS = {"gold": "gold reward", "kl": "KL to SFT", "learned_reward": "learned reward", "win_rate": "win-rate vs SFT",
           "out_of_support": "out of support", "too_long": "too long", "foreign_frac": "foreign chars",
           "good_frac": "good letters", "length": "length"}
MATCHED_KLS = (1.0, 2.0, 4.0)
OPTIMUM = "KL-regularised optimum (IS)"
BEGIN, END = "<!-- study:begin (written by recipes.study.report; do not edit) -->", "<!-- study:end -->"
PLOTS = ("study_gold_vs_kl.png", "study_reward_curves.png", "study_out_of_support.png")


def policy_stages(stages: Mapping[str, Mapping[str, Any]], track: str) -> list[str]:
    """The track's evaluated policies in config order."""
    return [n for n, e in stages.items() if e["track"] == track and e["role"] == "policy"]


def table_rows(evals: Sequence[dict[str, Any]], stages: Mapping[str, Mapping[str, Any]],
               tracks: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One tidy row per (track, seed, policy stage): ``track, method`` (the stage's label), ``stage, seed`` and
    `COLUMNS`; the win-rate compares per-prompt gold with the track's SFT row of the seed
    (`recipes.evaluate.metrics.win_tie_loss`, ties count half)."""
    by_key = {(e["seed"], e["stage"]): e for e in evals if "gold" in e}
    rows = []
    for t, track in tracks.items():
        for seed in sorted({e["seed"] for e in evals}):
            sft = by_key.get((seed, track.sft))
            for stage in policy_stages(stages, t):
                e = by_key.get((seed, stage))
                if e is None:
                    continue
                row = {"track": t, "method": stages[stage]["label"], "stage": stage, "seed": seed}
                row.update({k: float(e.get(k, math.nan)) for k in COLUMNS if k != "win_rate"})
                row["win_rate"] = (win_tie_loss(torch.tensor(e["per_prompt_gold"]),
                                                torch.tensor(sft["per_prompt_gold"])).win_rate if sft else math.nan)
                rows.append(row)
    return rows


def frontier_points(rows: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]],
                    stages: Mapping[str, Mapping[str, Any]], tracks: Mapping[str, Any]
                    ) -> dict[str, dict[tuple[int, str], list[tuple[float, float]]]]:
    """Per track, ``(seed, frontier name) -> [(kl, gold), ...]``: the stages that name the frontier plus the SFT
    policy at KL 0, and the KL-regularised optimum (from the SFT evaluation) under `OPTIMUM`."""
    out: dict[str, dict[tuple[int, str], list[tuple[float, float]]]] = {t: {} for t in tracks}
    sft_gold = {(r["track"], r["seed"]): r["gold"] for r in rows if r["stage"] == tracks[r["track"]].sft}
    for r in rows:
        name = stages[r["stage"]].get("frontier")
        if name and (r["track"], r["seed"]) in sft_gold:
            pts = out[r["track"]].setdefault((r["seed"], name), [(0.0, sft_gold[(r["track"], r["seed"])])])
            pts.append((r["kl"], r["gold"]))
    for e in evals:
        if e.get("optimum") and e["track"] in tracks and (e["track"], e["seed"]) in sft_gold:
            out[e["track"]][(e["seed"], OPTIMUM)] = [(0.0, sft_gold[(e["track"], e["seed"])])] + [
                (p["kl"], p["gold"]) for p in e["optimum"]]
    return out


def judge_findings(findings: Sequence[Any], rows: Sequence[dict[str, Any]],
                   fronts: Mapping[str, Mapping[tuple[int, str], list[tuple[float, float]]]],
                   seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Each finding's per-seed values, mean, standard error and verdict (`recipes.study.findings.judge`); a finding
    whose stages were not run is reported with no value ("—")."""
    out = []
    for f in findings:
        metric = {(r["seed"], r["stage"]): r[f.metric] for r in rows if r["track"] == f.track and f.metric in r}
        values = per_seed_values(f, metric, fronts.get(f.track, {}), seeds)
        mean, se, n = paired_stats(list(values.values()))
        out.append({"finding": f.name, "track": f.track, "per_seed": values, "mean": mean, "se": se, "n": n,
                    "verdict": judge(mean, se, n, f.claim, f.delta) if n else "not run", "claim": f.claim,
                    "delta": f.delta, "note": f.note, "metric": f.metric, "at_kl": f.at_kl})
    return out


def _estimate(values: Sequence[float]) -> str:
    return format_estimate(*paired_stats([v for v in values if not math.isnan(v)]))


def reward_rows(evals: Sequence[dict[str, Any]], stages: Mapping[str, Mapping[str, Any]], track: str) -> list[str]:
    """Markdown rows of the track's reward models: accuracy against the held-out labels beside Bayes accuracy, and
    against the gold reward on held-out pairs and on pairs of SFT samples."""
    lines = []
    for stage in (n for n, e in stages.items() if e["track"] == track and e["role"] == "reward"):
        mine = [e for e in evals if e["stage"] == stage and "accuracy" in e]
        if not mine:
            continue
        cells = [_estimate([e[k] for e in mine]) for k in ("accuracy", "bayes_accuracy", "gold_accuracy",
                                                           "sft_gold_accuracy")]
        gaps = [e["bayes_accuracy"] - e["accuracy"] for e in mine]
        scale = _estimate([e.get("standardization", {}).get("scale", math.nan) for e in mine])
        lines.append(f"| {stages[stage]['label']} | " + " | ".join(cells) + f" | {_estimate(gaps)} | {max(gaps):.3f} | "
                     f"{scale} |")
    return lines


def markdown(rows: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]], study: Mapping[str, Any],
             judged: Sequence[dict[str, Any]], fronts: Mapping[str, Any], wall_seconds: float = 0.0,
             img: str = "") -> str:
    """The report as markdown: verdicts, then per track its methods, reward models, matched-KL table and probes,
    then every per-seed row; ``img`` prefixes the plot paths."""
    seeds, tracks, stages = study["seeds"], study["tracks"], study["stages"]
    lines = [f"Study over {len(seeds)} seed(s) {seeds}; each cell is the mean ± standard error over seeds"
             + (f"; wall time {wall_seconds / 60:.1f} min" if wall_seconds else "") + ".",
             f"Command: `{study['command']}`", "",
             "Tracks: " + "; ".join(f"**{t}**, {tr.title}" for t, tr in tracks.items() if any(
                 r["track"] == t for r in rows)) + ".", "", "### Findings", "",
             "Each value is the paired per-seed difference (its contrast), mean ± SE. *reproduced*: mean − 2 SE > 0 "
             "(for an *equivalent* claim: mean ± 2 SE inside ±δ); *not reproduced*: mean + 2 SE < δ (equivalent: "
             "|mean| − 2 SE ≥ δ); otherwise *inconclusive*; one seed gives no verdict.", "",
             "| finding | track | value (mean ± SE) | δ | seeds | verdict | control / reading |",
             "|---|---|---|---|---|---|---|"]
    for j in judged:
        where = f"gold at KL {j['at_kl']:g}" if j["at_kl"] is not None else j["metric"]
        lines.append(f"| {j['finding']} | {j['track']} | {format_estimate(j['mean'], j['se'], j['n'])} ({where}) | "
                     f"{j['delta']:g} | {j['n']} | {j['verdict']} | {j['note']} |")
    for t, track in tracks.items():
        mine = [r for r in rows if r["track"] == t]
        if not mine:
            continue
        sft = [r["gold"] for r in mine if r["stage"] == track.sft]
        best = max(policy_stages(stages, t), key=lambda s: _mean([r["gold"] for r in mine if r["stage"] == s]))
        lift = [r["gold"] - s for r, s in zip(sorted((r for r in mine if r["stage"] == best), key=lambda r: r["seed"]),
                                               sft)]
        lines += ["", f"### Track {t}: {track.title}", "",
                  f"Best method on held-out gold: {stages[best]['label']}, {_estimate(lift)} above SFT.", "",
                  "| method | " + " | ".join(HEADERS[c] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for stage in policy_stages(stages, t):
            r_s = [r for r in mine if r["stage"] == stage]
            if r_s:
                lines.append(f"| {stages[stage]['label']} | " + " | ".join(
                    _estimate([r[c] for r in r_s]) for c in COLUMNS) + " |")
        rm = reward_rows(evals, stages, t)
        if rm:
            lines += ["", "Reward models (held-out pairs; gold accuracy leaves gold ties out; scale: the "
                      "standardization onto gold's units on SFT samples):", "",
                      "| reward model | accuracy | Bayes accuracy | gold accuracy | gold accuracy on SFT samples | "
                      "Bayes − accuracy | worst seed | scale |", "|---|---|---|---|---|---|---|---|", *rm]
        names = sorted({name for (_, name) in fronts.get(t, {})}, key=lambda n: (n == OPTIMUM, n))
        if names:
            lines += ["", "Gold reward at matched KL to SFT (each frontier interpolated seed by seed through its "
                      "points and SFT at KL 0; — where a seed's frontier does not reach that KL):", "",
                      "| frontier | " + " | ".join(f"gold at KL {k:g}" for k in MATCHED_KLS) + " |",
                      "|---" * (len(MATCHED_KLS) + 1) + "|"]
            for name in names:
                cells = []
                for k in MATCHED_KLS:
                    vals = [gold_at_kl(pts, k) for (s, n), pts in fronts[t].items() if n == name]
                    cells.append(_estimate(vals) if vals and None not in vals else "—")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        probes = [p for e in evals if e.get("track") == t for p in e.get("probes", [])]
        if probes:
            lines += ["", "The learned reward model on hand-made held-out responses (in and out of the pairs' "
                      "support):", "", "| response | learned reward | gold reward |", "|---|---|---|"]
            for name in dict.fromkeys(p["probe"] for p in probes):
                ps = [p for p in probes if p["probe"] == name]
                lines.append(f"| {name} | {_estimate([p['learned_reward'] for p in ps])} | "
                             f"{_estimate([p['gold'] for p in ps])} |")
    if img is not None:
        lines += ["", "### Plots", ""] + [f"![{p.removesuffix('.png')}]({img}{p})" for p in PLOTS]
    lines += ["", "### Every run (the rows of results.csv)", "", "| track | seed | method | " + " | ".join(
        HEADERS[c] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 3) + "|"]
    for r in sorted(rows, key=lambda r: (r["track"], r["seed"])):
        lines.append(f"| {r['track']} | {r['seed']} | {r['method']} | " + " | ".join(f"{r[c]:.3f}" for c in COLUMNS)
                     + " |")
    return "\n".join(lines) + "\n"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else -math.inf


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def plot(rows: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]], study: Mapping[str, Any],
         fronts: Mapping[str, Any], out: Path) -> list[str]:
    """`PLOTS`: gold against KL per track (each frontier a line through its mean points with SE bars, the other
    methods as points, SFT and the KL-regularised optimum as reference lines); held-out gold over training per track
    and family (mean with the seeds' spread shaded); the out-of-support share of every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracks, stages = [t for t in study["tracks"] if any(r["track"] == t for r in rows)], study["stages"]
    colors = {s: plt.get_cmap("tab20")(i % 20) for i, s in enumerate(stages)}
    fam_colors = {}

    def mean_se(vals: Sequence[float]) -> tuple[float, float]:
        m, se, _ = paired_stats(vals)
        return m, (0.0 if math.isnan(se) else se)

    fig, axes = plt.subplots(1, len(tracks), figsize=(6.5 * len(tracks), 6.8), squeeze=False)
    for ax, t in zip(axes[0], tracks):
        mine = [r for r in rows if r["track"] == t]
        sft = mean_se([r["gold"] for r in mine if r["stage"] == study["tracks"][t].sft])[0]
        ax.axhline(sft, color="gray", ls="--", lw=1, label="SFT")
        names = sorted({n for (_, n) in fronts.get(t, {})})
        for i, name in enumerate(names):
            seeds_pts = [pts for (s, n), pts in fronts[t].items() if n == name]
            width = min(len(p) for p in seeds_pts)  # point i is the same stage (or beta) on every seed
            means = sorted((mean_se([p[i][0] for p in seeds_pts]), mean_se([p[i][1] for p in seeds_pts]))
                           for i in range(width))
            xs, ys = [x for x, _ in means], [y for _, y in means]
            style = dict(color="black", ls=":", marker="") if name == OPTIMUM else dict(
                color=fam_colors.setdefault(name, plt.get_cmap("Set1")(len(fam_colors))), marker="o")
            ax.errorbar([x for x, _ in xs], [y for y, _ in ys], xerr=[e for _, e in xs], yerr=[e for _, e in ys],
                        capsize=2, lw=1.5, ms=4, label=f"{name} (frontier)", **style)
        for stage in policy_stages(stages, t):
            if stages[stage].get("frontier") or stage == study["tracks"][t].sft:
                continue
            r_s = [r for r in mine if r["stage"] == stage]
            if r_s:
                (x, xe), (y, ye) = mean_se([r["kl"] for r in r_s]), mean_se([r["gold"] for r in r_s])
                ax.errorbar([x], [y], xerr=[xe], yerr=[ye], fmt="s", ms=6, capsize=2, color=colors[stage],
                            label=stages[stage]["label"])
        ax.set_xlabel("KL(policy || SFT) on held-out prompts (nats per response)")
        ax.set_ylabel("held-out gold reward")
        ax.set_title(f"Track {t}: {short_title(study['tracks'][t].title)}", fontsize=9)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.tight_layout()
    paths = [str(out / PLOTS[0])]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(len(tracks), 2, figsize=(12, 3.8 * len(tracks)), squeeze=False)
    for row_axes, t in zip(axes, tracks):
        for stage in policy_stages(stages, t):
            if stage == study["tracks"][t].sft:
                continue  # its curve starts from a random model: it would set the scale
            curves = [e["curve"] for e in evals if e["stage"] == stage and e.get("curve")]
            if not curves:
                continue
            module = str(stages[stage]["config"].get("model", {}).get("class_path", "")).lower()
            ax = row_axes[1 if "ppo" in module or "grpo" in module else 0]  # on-policy RL counts iterations
            steps = sorted({p["step"] for c in curves for p in c})
            stats = [_mean_std([p["gold"] for c in curves for p in c if p["step"] == s]) for s in steps]
            m = [a for a, _ in stats]
            ax.plot(steps, m, color=colors[stage], label=stages[stage]["label"], lw=1.2)
            if len(curves) > 1:
                ax.fill_between(steps, [a - b for a, b in stats], [a + b for a, b in stats], color=colors[stage],
                                alpha=0.15)
        for ax in row_axes:
            ax.axhline(_mean([r["gold"] for r in rows if r["stage"] == study["tracks"][t].sft]), color="gray", ls="--",
                       lw=1, label="SFT")
        row_axes[0].set_title(f"Track {t}: DPO family (optimizer steps)", fontsize=9)
        row_axes[1].set_title(f"Track {t}: PPO, GRPO, RLOO (iterations)", fontsize=9)
        for ax in row_axes:
            ax.set_xlabel("training step")
            ax.set_ylabel("held-out gold (mean ± std over seeds)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(str(out / PLOTS[1]))
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(tracks), figsize=(6.5 * len(tracks), 4.2), squeeze=False)
    for ax, t in zip(axes[0], tracks):
        names = [s for s in policy_stages(stages, t) if any(r["stage"] == s for r in rows)]
        stats = [mean_se([r["out_of_support"] for r in rows if r["stage"] == s]) for s in names]
        ax.barh(range(len(names)), [m for m, _ in stats], xerr=[e for _, e in stats], color=[colors[s] for s in names])
        ax.set_yticks(range(len(names)), [stages[s]["label"] for s in names], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("out-of-support share (too long or foreign chars)")
        ax.set_xlim(0, 1)
        ax.set_title(f"Track {t}: {short_title(study['tracks'][t].title)}", fontsize=9)
    fig.tight_layout()
    paths.append(str(out / PLOTS[2]))
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths


def short_title(title: str) -> str:
    """A track's title up to its first parenthesis (for plot titles)."""
    return title.split("(")[0].strip()


def write_doc(doc: str | Path, table: str, plots: Sequence[str]) -> None:
    """Replace the block between `BEGIN` and `END` in ``doc`` with ``table`` (whose plot links point at ``img/``)
    and copy the plots into the doc's ``img/`` folder."""
    doc = Path(doc)
    text = doc.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise ValueError(f"--doc {doc}: it has no study block; add the two lines\n{BEGIN}\n{END}\n"
                         "where the results go.")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    doc.write_text(f"{head}{BEGIN}\n{table}{END}{tail}", encoding="utf-8")
    (doc.parent / "img").mkdir(exist_ok=True)
    for p in plots:
        shutil.copyfile(p, doc.parent / "img" / Path(p).name)


def write_report(evals: Sequence[dict[str, Any]], study: Mapping[str, Any], out: Path, wall_seconds: float = 0.0,
                 doc: str | Path | None = None) -> dict[str, Any]:
    """Write ``results.csv``, ``results.md`` and the plots into ``out`` (and the report into ``doc``); returns
    rows, judged findings, frontiers, table and plot paths."""
    stages, tracks = study["stages"], study["tracks"]
    rows = table_rows(evals, stages, tracks)
    fronts = frontier_points(rows, evals, stages, tracks)
    judged = judge_findings(study["findings"], rows, fronts, study["seeds"])
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["track", "method", "stage", "seed", *COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    plots = plot(rows, evals, study, fronts, out)
    table = markdown(rows, evals, study, judged, fronts, wall_seconds)
    (out / "results.md").write_text(table, encoding="utf-8")
    if doc is not None:
        write_doc(doc, markdown(rows, evals, study, judged, fronts, wall_seconds, img="img/"), plots)
    return {"rows": rows, "findings": judged, "frontiers": fronts, "table": table, "plots": plots, "out": str(out)}
