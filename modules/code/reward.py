"""Unit-test reward for code (Xu et al. 2024, Sec. 6: 10 if the program passes every test, else 0).

Satisfies `recipes.modules.reward_functions.RewardFunction`; PPO calls it in its rollout, DPO-Iter labels
pairs with it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from recipes.modules.code.execution import SandboxConfig
from recipes.modules.code.problems import CodeProblem, Verdict, evaluate_completions

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> str:
    """The first fenced code block of a chat-style response, or the response itself when it has no fence."""
    match = _FENCE.search(response)
    return match.group(1) if match else response


class UnitTestReward:
    """Runs each response against its problem's unit tests in the sandbox and scores it.

    ``pass_reward`` when every test passes, else ``fail_reward``; with ``partial_credit`` the reward is
    ``fail_reward + (pass_reward - fail_reward) * passed / total`` (and every test is run, not stopped at the first
    crash). A response that never reaches the end of its tests (timeout, crash, early exit) passes nothing.

    Example::

        reward = UnitTestReward()
        reward(prompts, responses, [problem.to_metadata() for problem in problems])  # tensor([10., 0., ...])

    Args:
        pass_reward: reward of a fully correct program (the paper uses 10).
        fail_reward: reward of any other program.
        partial_credit: interpolate by the fraction of tests passed.
        extract_fenced: score the first ```python fenced block when the response has one (chat models).
        config: sandbox limits; ``None``: `SandboxConfig` defaults.
        n_workers: parallel sandboxes (default: CPU count).

    After a call, ``last_verdicts`` holds each response's `recipes.modules.code.problems.Verdict` (status, tests
    passed), for logging and tests.
    """

    def __init__(self, pass_reward: float = 10.0, fail_reward: float = 0.0, partial_credit: bool = False,
                 extract_fenced: bool = True, config: SandboxConfig | None = None, n_workers: int | None = None,
                 progress: bool = False) -> None:
        self.pass_reward, self.fail_reward = float(pass_reward), float(fail_reward)
        self.partial_credit, self.extract_fenced = partial_credit, extract_fenced
        self.config = dataclasses.replace(config or SandboxConfig(), stop_on_error=not partial_credit)
        self.n_workers, self.progress = n_workers, progress
        self.last_verdicts: list[Verdict] = []

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> torch.Tensor:
        """Score responses; ``metadata[i]`` holds the tests of ``prompts[i]`` (`CodeProblem.to_metadata`)."""
        if metadata is None or len(metadata) != len(responses) or len(prompts) != len(responses):
            got = "no metadata" if metadata is None else f"{len(metadata)} metadata rows"
            raise ValueError(f"UnitTestReward needs one metadata row with the problem's tests per response; got "
                             f"{len(prompts)} prompts, {len(responses)} responses and {got}")
        problems = []
        for i, row in enumerate(metadata):
            try:
                problems.append(CodeProblem.from_metadata(row))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"UnitTestReward: metadata row {i} is not a code problem ({e}); build it with "
                                 "CodeProblem.to_metadata() or recipes.datamodules.code") from e
        codes = [extract_code(r) if self.extract_fenced else r for r in responses]
        verdicts = evaluate_completions(problems, codes, self.config, self.n_workers, self.progress)
        self.last_verdicts = verdicts
        if self.partial_credit:
            frac = [v.n_passed / v.n_tests if v.status != "crashed" else 0.0 for v in verdicts]
        else:
            frac = [1.0 if v.passed else 0.0 for v in verdicts]
        span = self.pass_reward - self.fail_reward
        return torch.tensor([self.fail_reward + span * f for f in frac], dtype=torch.float32)
