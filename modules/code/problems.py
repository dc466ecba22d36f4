"""Code problems and how a completion is judged: HumanEval (asserts), APPS (stdin/stdout or call-based), CodeContests.

`CodeProblem` is the format-free problem (built from dataset rows by `recipes.datamodules.code`); `make_job` turns a
problem and a completion into an `ExecutionJob`; `judge` compares what ran with the expected outputs, in this process.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from recipes.modules.code.execution import ExecutionJob, ExecutionResult, SandboxConfig, execute_many

Kind = Literal["script", "stdio", "call"]
REL_TOL, ABS_TOL = 1e-5, 1e-8  # numpy.allclose defaults, which the APPS evaluator uses for numeric outputs


@dataclass(frozen=True)
class CodeProblem:
    """One problem with its tests. Expected outputs never enter the program's process (HumanEval's asserts run in a
    trusted process of the sandbox that calls the program across a pipe).

    Args:
        task_id: unique id (HumanEval ``task_id``, APPS ``problem_id``, CodeContests ``name``).
        prompt: the text a policy is given.
        kind: ``script`` (tests are code run after the completion), ``stdio`` or ``call``.
        tests: ``script``: one test program; ``stdio``: one stdin text per test; ``call``: one argument list per test.
        outputs: expected stdout texts (``stdio``) or return values (``call``); empty for ``script``.
        n_public: the first ``n_public`` tests are public (what n@k filters on); 0 means none are.
        prefix: code placed before the completion (HumanEval: the prompt, i.e. signature and docstring).
        entry_point: HumanEval function passed to ``check``; APPS ``fn_name`` for call-based problems.
    """

    task_id: str
    prompt: str
    kind: Kind
    tests: tuple[Any, ...]
    outputs: tuple[Any, ...] = ()
    n_public: int = 0
    prefix: str = ""
    entry_point: str | None = None
    difficulty: str | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not self.tests:
            raise ValueError(f"problem {self.task_id!r} has no tests; a program cannot pass (or fail) zero tests")
        if self.kind != "script" and len(self.outputs) != len(self.tests):
            raise ValueError(f"problem {self.task_id!r}: {len(self.tests)} test inputs but {len(self.outputs)} outputs")

    def to_metadata(self) -> dict[str, Any]:
        """A plain dict (JSON-able) to carry in a prompt dataset's metadata rows."""
        return asdict(self) | {"tests": list(self.tests), "outputs": list(self.outputs)}

    @classmethod
    def from_metadata(cls, row: Mapping[str, Any]) -> CodeProblem:
        """Inverse of `to_metadata`; also accepts ``{"problem": CodeProblem}``."""
        if isinstance(row.get("problem"), CodeProblem):
            return row["problem"]
        fields = {k: row[k] for k in cls.__dataclass_fields__ if k in row}
        return cls(**fields | {"tests": tuple(row["tests"]), "outputs": tuple(row.get("outputs", ()))})


@dataclass(frozen=True)
class Verdict:
    """How one completion did: ``passed`` means every test ran and matched; ``public_passed`` the public ones."""

    task_id: str
    passed: bool
    public_passed: bool
    n_passed: int
    n_tests: int
    status: str  # "passed", or why not: "wrong_answer", "timeout", "error", "incomplete", "crashed", ...


def make_job(problem: CodeProblem, completion: str) -> ExecutionJob:
    """The sandbox job: ``prefix + completion`` runs in the sandbox. HumanEval's tests (``script``) run in ``check``
    mode: the prompt and ``check`` run in a trusted process that calls the program's ``entry_point`` across a pipe, so
    the asserts never share an interpreter with the completion (docs/execution.md, threat model)."""
    code = problem.prefix + completion
    if problem.kind == "script":
        return ExecutionJob(code, "check", (f"{problem.prefix}\n\n{problem.tests[0]}\n",), problem.entry_point)
    return ExecutionJob(code, problem.kind, problem.tests, problem.entry_point)


def _is_number(token: str) -> float | None:
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def tokens_match(actual: str, expected: str) -> bool:
    """Equal as strings, or both finite numbers with ``|a - e| <= ABS_TOL + REL_TOL * |e|`` (numpy.allclose)."""
    if actual == expected:
        return True
    a, e = _is_number(actual), _is_number(expected)
    return a is not None and e is not None and abs(a - e) <= ABS_TOL + REL_TOL * abs(e)


def stdout_matches(actual: str, expected: str) -> bool:
    """Compare program output with the expected output the way the APPS evaluator accepts it, minus its leniencies.

    1. Line by line after stripping each line and dropping blank lines (trailing spaces, ``\\r\\n``, final newline).
    2. Otherwise whitespace-separated tokens, pairwise `tokens_match` (float formatting: ``0.5`` == ``0.50000``).
    APPS also accepts outputs whose token *sets* are equal (any order); we do not, since that passes wrong answers.
    """
    a_lines = [line.strip() for line in actual.splitlines() if line.strip()]
    e_lines = [line.strip() for line in expected.splitlines() if line.strip()]
    if a_lines == e_lines:
        return True
    a_tokens, e_tokens = actual.split(), expected.split()
    return len(a_tokens) == len(e_tokens) and all(map(tokens_match, a_tokens, e_tokens))


def values_match(actual: Any, expected: Any) -> bool:
    """Call-based: equal after JSON round trip (tuples are lists), floats within tolerance; APPS wraps a return value
    in a one-element list, so ``actual == expected[0]`` counts too."""

    def same(a: Any, e: Any) -> bool:
        if isinstance(a, bool) or isinstance(e, bool):
            return a is e or a == e and type(a) is type(e)
        if isinstance(a, (int, float)) and isinstance(e, (int, float)):
            return a == e or abs(a - e) <= ABS_TOL + REL_TOL * abs(e)
        if isinstance(a, list) and isinstance(e, list):
            return len(a) == len(e) and all(map(same, a, e))
        if isinstance(a, dict) and isinstance(e, dict):
            return a.keys() == e.keys() and all(same(a[k], e[k]) for k in a)
        return a == e

    return same(actual, expected) or (isinstance(expected, list) and len(expected) == 1 and same(actual, expected[0]))


def judge(problem: CodeProblem, result: ExecutionResult) -> Verdict:
    """Decide pass/fail from an execution: every unit must be ``ok`` and (stdio/call) match its expected output."""
    passed_tests = []
    first_failure = None
    for i, unit in enumerate(result.units):
        ok = unit.status == "ok"
        if ok and problem.kind == "stdio":
            ok = stdout_matches(unit.stdout, problem.outputs[i])
        elif ok and problem.kind == "call":
            ok = values_match(unit.value, problem.outputs[i])
        passed_tests.append(ok)
        if not ok and first_failure is None:
            first_failure = "wrong_answer" if unit.status == "ok" else unit.status
    all_ran = result.status == "done" and len(passed_tests) == len(problem.tests)
    passed = all_ran and all(passed_tests)
    status = "passed" if passed else (first_failure or result.status)
    public_passed = all(passed_tests[: problem.n_public]) if problem.n_public else True  # none public: no filter
    return Verdict(problem.task_id, passed, public_passed, sum(passed_tests), len(problem.tests), status)


def evaluate_completions(problems: Sequence[CodeProblem], completions: Sequence[str],
                         config: SandboxConfig | None = None, n_workers: int | None = None,
                         progress: bool = True) -> list[Verdict]:
    """Run and judge ``completions[i]`` against ``problems[i]`` in parallel sandboxes."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions; pass one problem each")
    results = execute_many([make_job(p, c) for p, c in zip(problems, completions)], config, n_workers, progress)
    return [judge(p, r) for p, r in zip(problems, results)]
