"""UnitTestReward: 10 / 0 per response, partial credit, fenced code, the reward protocol, bad metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recipes.datamodules.code import CodePromptDataset, load_problems
from recipes.modules.code.execution import SandboxConfig
from recipes.modules.code.reward import UnitTestReward, extract_code
from recipes.modules.reward_functions import RewardFunction

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "code"
CONFIG = SandboxConfig(timeout_s=5.0, startup_s=30.0)


@pytest.fixture(scope="module")
def batch():
    problems = load_problems(str(FIXTURES / "apps.jsonl"))
    dataset = CodePromptDataset([problems["101"], problems["104"]])
    return CodePromptDataset.collate([dataset[0], dataset[1]])


def test_reward_is_ten_for_all_tests_passed_else_zero(batch):
    reward = UnitTestReward(config=CONFIG)
    assert isinstance(reward, RewardFunction)
    responses = ["a, b = map(int, input().split())\nprint(a + b)\n", "def square(n):\n    return n + n\n"]
    scores = reward(batch["prompts"], responses, batch["metadata"])
    assert scores.dtype == torch.float32 and scores.tolist() == [10.0, 0.0]


def test_partial_credit_and_custom_values(batch):
    """square(n) = n + n is right for n = 2 only: 1 of 3 tests -> -1 + (2 - -1) * 1/3 = 0."""
    reward = UnitTestReward(pass_reward=2.0, fail_reward=-1.0, partial_credit=True, config=CONFIG)
    responses = ["```python\na, b = map(int, input().split())\nprint(a + b)\n```", "def square(n):\n    return n + n\n"]
    assert reward(batch["prompts"], responses, batch["metadata"]).tolist() == pytest.approx([2.0, 0.0])


def test_extract_code_takes_the_first_fenced_block():
    assert extract_code("Here:\n```python\nprint(1)\n```\nand ```py\nprint(2)\n```") == "print(1)\n"
    assert extract_code("print(3)\n") == "print(3)\n"


def test_missing_or_bad_metadata_is_an_error(batch):
    reward = UnitTestReward(config=CONFIG)
    with pytest.raises(ValueError, match="one metadata row"):
        reward(batch["prompts"], ["", ""], None)
    with pytest.raises(ValueError, match="metadata row 1 is not a code problem"):
        reward(batch["prompts"], ["", ""], [batch["metadata"][0], {"task_id": "x"}])
