"""A toy program-synthesis task for CPU runs: "Write a Python expression equal to N.", judged by running the answer.

A response is the body of ``def answer(): return <response>``; the sandbox calls ``answer()`` and the parent compares
the returned value with N (`recipes.modules.code.problems`, call mode), so `recipes.modules.code.reward.UnitTestReward`
scores it exactly like an APPS call-based problem. ``builtin:code_synthesis`` is the problem set (for
`recipes.code_eval` and for PPO prompts through ``PromptDataModule(source_format="code")``); ``builtin:code_sft`` holds
imperfect demonstrations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any

from recipes.datamodules.builtin import BUILTIN_PREFIX
from recipes.datamodules.mixture import DataSource
from recipes.datamodules.sft import SFTDataModule
from recipes.modules.cache import cache_dir
from recipes.modules.code.problems import CodeProblem

PROMPT = "Write a Python expression equal to {target}.\n"
PREFIX = "def answer():\n    return "  # the response completes this line; answer() is called in the sandbox
N_TARGETS = 100  # targets 0..99
BUILTIN_SFT = BUILTIN_PREFIX + "code_sft"  # the problems are recipes.datamodules.code.BUILTIN_CODE_SYNTHESIS


def expression_problem(target: int) -> CodeProblem:
    """The problem "write an expression equal to ``target``": one call of ``answer()`` that must return it."""
    return CodeProblem(task_id=f"expr/{target}", prompt=PROMPT.format(target=target), kind="call", tests=((),),
                       outputs=(target,), prefix=PREFIX, entry_point="answer",
                       difficulty=f"{len(str(target))}-digit", source="code_synthesis")


def synthesis_problems(n_targets: int = N_TARGETS) -> dict[str, CodeProblem]:
    """``{task_id: CodeProblem}`` for targets ``0 .. n_targets - 1``."""
    return {p.task_id: p for p in map(expression_problem, range(n_targets))}


def demonstration(target: int, rng: random.Random, wrong_fraction: float) -> tuple[str, bool]:
    """One demonstration for ``target`` and whether it is correct (checked by evaluating it, here, in-process: the
    strings are ours).

    Every demonstration writes the number followed by an optional operation (``12``, ``12+0``, ``12*1``, ...); a
    careless teacher picks a wrong operation (``12+1``, ``12-1``, ``12*2``) ``wrong_fraction`` of the time. SFT thus
    learns to copy the number (easy for a tiny model) but not which operations keep it, so it is right only part of
    the time; PPO's execution-checked reward tells the operations apart.
    """
    forms = _WRONG if rng.random() < wrong_fraction else _RIGHT
    expression = rng.choice(forms).format(t=target)
    return expression, eval(expression) == target  # our own arithmetic strings, not model output


_RIGHT = ("{t}", "{t}+0", "{t}*1", "{t}-0")
_WRONG = ("{t}+1", "{t}-1", "{t}*2")


def code_sft_rows(n: int = 4000, seed: int = 0, n_targets: int = N_TARGETS,
                  wrong_fraction: float = 0.5) -> list[dict[str, Any]]:
    """``n`` rows ``{prompt, response, correct}`` for ``source_format: prompt_response``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        target = rng.randrange(n_targets)
        response, correct = demonstration(target, rng, wrong_fraction)
        rows.append({"prompt": PROMPT.format(target=target), "response": response, "correct": correct})
    return rows


def resolve_code_builtin(source: str) -> str:
    """Map ``builtin:code_sft`` to a JSONL file written once under the cache folder (as
    `recipes.datamodules.builtin.resolve_builtin` does for its sets); other sources pass through.
    (``builtin:code_synthesis`` needs no file: `recipes.datamodules.code.load_problems` builds it.)"""
    if source != BUILTIN_SFT:
        return source
    path = cache_dir() / "code_sft.jsonl"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in code_sft_rows():
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)  # atomic: concurrent processes never read a half-written file
    return str(path)


class CodeSynthesisSFTDataModule(SFTDataModule):
    """`recipes.datamodules.sft.SFTDataModule` that also reads ``builtin:code_sft`` (every other source as the parent).

    Example::

        CodeSynthesisSFTDataModule(data="builtin:code_sft", source_format="prompt_response", prompt_format="plain")
    """

    def _read(self, source: str | DataSource):
        if isinstance(source, DataSource):  # a mixture's source: resolve its path, keep its own settings
            return super()._read(dataclasses.replace(source, path=resolve_code_builtin(source.path)))
        return super()._read(resolve_code_builtin(source))
