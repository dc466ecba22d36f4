"""Code problems from HumanEval, APPS and CodeContests rows, their prompts, and a prompt `Dataset` with test metadata.

Each adapter checks one row and raises `DataFormatError` naming the file, row and field of anything unusable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch.utils.data import Dataset

from recipes.datamodules.io import DataFormatError, load_records, optional_text, require_text
from recipes.modules.code.problems import CodeProblem

Format = Literal["auto", "humaneval", "apps", "code_contests"]
BUILTIN_CODE_SYNTHESIS = "builtin:code_synthesis"
# CodeContests' `difficulty` enum (deepmind/code_contests, contest_problem.proto); 7 onwards are Codeforces letters.
_CC_DIFFICULTY = ("UNKNOWN", "EASY", "MEDIUM", "HARD", "HARDER", "HARDEST", "EXTERNAL")
# The APPS evaluator runs every program after a block of common imports; ours is the same idea, minus numpy (slow).
APPS_HEADER = ("import sys\nimport math\nimport itertools\nimport collections\nimport heapq\nimport bisect\n"
               "from collections import Counter, defaultdict, deque\nfrom functools import lru_cache\n"
               "from typing import List, Tuple, Optional\n")


def humaneval_problem(row: Mapping[str, Any], source: str, index: int) -> CodeProblem:
    """HumanEval: the completion continues ``prompt``; ``test`` defines ``check``, called on ``entry_point``."""
    prompt = require_text(row, "prompt", source, index)
    return CodeProblem(
        task_id=require_text(row, "task_id", source, index), prompt=prompt, kind="script",
        tests=(require_text(row, "test", source, index),), prefix=prompt,
        entry_point=require_text(row, "entry_point", source, index), source="humaneval")


def apps_prompt(question: str, starter_code: str, call_based: bool) -> str:
    """The APPS paper's prompt: question, starter code, then which I/O format the answer must use."""
    fmt = "Use Call-Based format" if call_based else "Use Standard Input format"
    starter = f"{starter_code}\n" if starter_code.strip() else ""
    return f"\nQUESTION:\n{question}\n{starter}{fmt}\nANSWER:\n"


def apps_problem(row: Mapping[str, Any], source: str, index: int) -> CodeProblem:
    """APPS: ``input_output`` is a JSON string ``{"inputs": [...], "outputs": [...], "fn_name"?: str}``."""
    raw = require_text(row, "input_output", source, index, allow_empty=True)
    if not raw.strip():
        raise DataFormatError(source, index, "input_output", "is empty: the problem has no tests",
                              "drop the row (a problem without tests cannot be judged)")
    try:
        io = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataFormatError(source, index, "input_output", f"is not valid JSON ({e.msg} at char {e.pos})") from e
    if not isinstance(io, dict) or not isinstance(io.get("inputs"), list) or not isinstance(io.get("outputs"), list):
        raise DataFormatError(source, index, "input_output", "must be an object with lists 'inputs' and 'outputs'")
    if not io["inputs"]:
        raise DataFormatError(source, index, "input_output", "has no tests", "drop the row")
    if len(io["inputs"]) != len(io["outputs"]):
        raise DataFormatError(source, index, "input_output",
                              f"{len(io['inputs'])} inputs but {len(io['outputs'])} outputs")
    fn_name = io.get("fn_name")

    def text(x: Any) -> str:  # APPS stores some stdin/stdout tests as lists of lines
        return "\n".join(map(str, x)) if isinstance(x, list) else str(x)

    if fn_name:
        bad = [i for i, x in enumerate(io["inputs"]) if not isinstance(x, list)]
        if bad:
            raise DataFormatError(source, index, "input_output",
                                  f"call-based inputs must be argument lists; test {bad[0]} is not")
        tests, outputs = tuple(io["inputs"]), tuple(io["outputs"])
    else:
        tests, outputs = tuple(map(text, io["inputs"])), tuple(map(text, io["outputs"]))
    task_id = row.get("problem_id", row.get("id"))
    if task_id is None:
        raise DataFormatError(source, index, "problem_id", "missing", "APPS rows are identified by problem_id")
    question = require_text(row, "question", source, index)
    starter = optional_text(row, "starter_code", source, index)
    return CodeProblem(str(task_id), apps_prompt(question, starter, bool(fn_name)), "call" if fn_name else "stdio",
                       tests, outputs, prefix=APPS_HEADER, entry_point=fn_name, difficulty=row.get("difficulty"),
                       source="apps")


def _cc_tests(row: Mapping[str, Any], field: str, source: str, index: int) -> tuple[list[str], list[str]]:
    tests = row.get(field) or {"input": [], "output": []}
    if not isinstance(tests, Mapping) or not isinstance(tests.get("input"), list) \
            or not isinstance(tests.get("output"), list):
        raise DataFormatError(source, index, field, 'must be {"input": [...], "output": [...]}')
    if len(tests["input"]) != len(tests["output"]):
        raise DataFormatError(source, index, field,
                              f"{len(tests['input'])} inputs but {len(tests['output'])} outputs")
    return list(tests["input"]), list(tests["output"])


def code_contests_prompt(description: str) -> str:
    return (f"{description.strip()}\n\nWrite a Python 3 program that reads the input from standard input and writes "
            "the answer to standard output.\n")


def code_contests_problem(row: Mapping[str, Any], source: str, index: int) -> CodeProblem:
    """CodeContests: stdin/stdout tests in ``public_tests``, ``private_tests``, ``generated_tests`` (that order)."""
    name = require_text(row, "name", source, index)
    parts = [_cc_tests(row, f, source, index) for f in ("public_tests", "private_tests", "generated_tests")]
    tests = tuple(x for ins, _ in parts for x in ins)
    if not tests:
        raise DataFormatError(source, index, "public_tests", "the problem has no tests in any of public_tests, "
                              "private_tests, generated_tests", "drop the row")
    difficulty = row.get("difficulty")
    if isinstance(difficulty, int):
        difficulty = _CC_DIFFICULTY[difficulty] if difficulty < 7 else chr(ord("A") + difficulty - 7)
    return CodeProblem(name, code_contests_prompt(require_text(row, "description", source, index)), "stdio", tests,
                       tuple(x for _, outs in parts for x in outs), n_public=len(parts[0][0]),
                       difficulty=difficulty, source="code_contests")


_ADAPTERS = {"humaneval": humaneval_problem, "apps": apps_problem, "code_contests": code_contests_problem}


def detect_format(row: Mapping[str, Any], source: str, index: int) -> str:
    if "entry_point" in row and "test" in row:
        return "humaneval"
    if "input_output" in row:
        return "apps"
    if "public_tests" in row or "private_tests" in row:
        return "code_contests"
    raise DataFormatError(source, index, None, f"not a HumanEval, APPS or CodeContests row (fields: {sorted(row)})",
                          "pass format= explicitly or convert the rows")


def load_problems(source: str, format: Format = "auto", split: str = "train") -> dict[str, CodeProblem]:
    """Read a problem file (JSON/JSONL(.gz)/Parquet or hub id) into ``{task_id: CodeProblem}``.

    ``builtin:code_synthesis`` is the toy task of `recipes.datamodules.code_synthesis` (no file, no download).
    """
    if source == BUILTIN_CODE_SYNTHESIS:
        from recipes.datamodules.code_synthesis import synthesis_problems  # lazy: it pulls in the SFT data module

        return synthesis_problems()
    rows = load_records(source, split)
    problems: dict[str, CodeProblem] = {}
    for i, row in enumerate(rows):
        fmt = detect_format(row, source, i) if format == "auto" else format
        problem = _ADAPTERS[fmt](row, source, i)
        if problem.task_id in problems:
            raise DataFormatError(source, i, "task_id", f"duplicate id {problem.task_id!r}", "ids must be unique")
        problems[problem.task_id] = problem
    if not problems:
        raise DataFormatError(source, None, None, "holds no problems")
    return problems


class CodePromptDataset(Dataset):
    """Prompts of code problems; each item is ``{"prompt": str, "metadata": CodeProblem.to_metadata()}``.

    Use `collate` as the DataLoader's ``collate_fn`` to get ``{"prompts": [...], "metadata": [...]}``, which is what
    `recipes.modules.code.reward.UnitTestReward` takes.
    """

    def __init__(self, problems: Sequence[CodeProblem] | Mapping[str, CodeProblem]) -> None:
        self.problems = list(problems.values()) if isinstance(problems, Mapping) else list(problems)

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int) -> dict[str, Any]:
        problem = self.problems[index]
        return {"prompt": problem.prompt, "metadata": problem.to_metadata()}

    @staticmethod
    def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
        return {"prompts": [x["prompt"] for x in items], "metadata": [x["metadata"] for x in items]}


def code_prompt_records(source: str, split: str = "train") -> list[dict[str, Any]]:
    """The problems of ``source`` as prompt records for `recipes.datamodules.prompts.PromptDataModule` (``source_format:
    code``): each is `CodeProblem.to_metadata`, so its ``prompt`` is the text and the whole record, unit tests
    included, reaches the reward as that row's metadata."""
    return [problem.to_metadata() for problem in load_problems(source, "auto", split).values()]
