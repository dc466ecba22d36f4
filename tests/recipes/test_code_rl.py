"""RL on code with an execution-checked reward: the toy synthesis task, its prompts carrying the tests to the reward,
a PPO iteration scored in the sandbox, `recipes.code_eval --model`, and (slow) SFT -> PPO raising the pass rate."""

from __future__ import annotations

import json
import os

import pytest
import torch

from recipes import code_eval
from recipes.__main__ import cli_main
from recipes.datamodules.code import load_problems
from recipes.datamodules.code_synthesis import PROMPT, code_sft_rows, expression_problem, synthesis_problems
from recipes.datamodules.prompts import PromptDataModule
from recipes.modules.code.execution import SandboxConfig
from recipes.modules.code.host import sandbox_capabilities
from recipes.modules.code.problems import CodeProblem
from recipes.modules.code.reward import UnitTestReward
from recipes.modules.models import ModelSpec, build_causal_lm
from recipes.modules.ppo import PPOModule
from tests.conftest import REPO, TINY_LLAMA, quiet_trainer

CONFIG = SandboxConfig(timeout_s=5.0, startup_s=30.0)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny, and two spinning threads collapse on a shared, loaded CPU."""
    torch.set_num_threads(1)


class RecordingReward:
    """`UnitTestReward` that keeps what each call received and returned."""

    def __init__(self) -> None:
        self.inner, self.calls = UnitTestReward(config=CONFIG, n_workers=2), []

    def __call__(self, prompts, responses, metadata=None):
        scores = self.inner(prompts, responses, metadata)
        self.calls.append((list(prompts), list(responses), metadata, scores, self.inner.last_verdicts))
        return scores


def test_toy_problem_is_judged_by_running_the_expression():
    """`answer()` must return the target: 3*4 and 24//2 pass for 12; 3*5, 24/5, a syntax error and a crash fail."""
    problem = expression_problem(12)
    assert problem.prompt == "Write a Python expression equal to 12.\n" and problem.kind == "call"
    responses = ["3*4", "24//2", "3*5", "24/5", "3*", "1/0"]
    reward = UnitTestReward(config=CONFIG, n_workers=2)
    scores = reward([problem.prompt] * 6, responses, [problem.to_metadata()] * 6)
    assert scores.tolist() == [10.0, 10.0, 0.0, 0.0, 0.0, 0.0]
    assert [v.status for v in reward.last_verdicts[2:]] == ["wrong_answer", "wrong_answer", "error", "error"]


def test_demonstrations_are_as_correct_as_labelled_by_execution():
    """The SFT rows' ``correct`` labels (computed in-process) agree with the sandboxed reward on 24 rows, and about
    half of all rows are wrong (the careless teacher), so an imitating model cannot be right every time."""
    rows = code_sft_rows(n=2000)
    assert 0.4 < sum(r["correct"] for r in rows) / len(rows) < 0.6
    sample = rows[:24]
    metadata = [expression_problem(int(r["prompt"].split()[-1].rstrip("."))).to_metadata() for r in sample]
    scores = UnitTestReward(config=CONFIG, n_workers=2)([r["prompt"] for r in sample],
                                                        [r["response"] for r in sample], metadata)
    assert scores.tolist() == [10.0 * r["correct"] for r in sample]


@pytest.mark.skipif(not sandbox_capabilities().isolated, reason="needs the isolated sandbox (root, namespaces)")
def test_reward_runs_the_program_in_the_sandbox():
    """An expression that returns 12 only under a sandbox uid (63000 + n) and with no network interface up passes:
    the reward ran it there, not in this process."""
    problem = expression_problem(12)
    inside = f"12 if __import__('os').getuid() >= 63000 and __import__('os').getuid() != {os.getuid()} else -1"
    here = "12 if __import__('os').path.exists(" + repr(str(REPO / "README.md")) + ") else -1"  # repo is hidden
    scores = UnitTestReward(config=CONFIG, n_workers=2)([problem.prompt] * 2, [inside, here],
                                                        [problem.to_metadata()] * 2)
    assert scores.tolist() == [10.0, 0.0]


def test_code_prompts_carry_each_problem_to_the_reward(byte_tokenizer):
    """`PromptDataModule(source_format="code")` serves each problem's prompt with its full problem as metadata."""
    data = PromptDataModule(data="builtin:code_synthesis", source_format="code", max_length=64,
                            max_prompt_length=48, rollout_batch_size=8)
    data.setup("fit")
    assert data.counts == {"rows": 100, "kept": 100}
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and len(batch["metadata"]) == 8
    for prompt, meta, ids, mask in zip(batch["prompts"], batch["metadata"], batch["input_ids"],
                                       batch["attention_mask"]):
        target = int(prompt.split()[-1].rstrip("."))
        assert prompt == PROMPT.format(target=target)
        assert CodeProblem.from_metadata(meta) == expression_problem(target)
        assert byte_tokenizer.decode(ids[mask.bool()]) == prompt  # left-padded, nothing cut


def test_ppo_iteration_is_scored_by_execution(byte_tokenizer):
    """One PPO iteration on the code prompts: the reward receives each prompt's own problem, runs every response
    in the sandbox (one verdict each) and the logged reward is the mean of those 0 / 10 scores."""
    data = PromptDataModule(data="builtin:code_synthesis", source_format="code", max_length=64,
                            max_prompt_length=48, rollout_batch_size=8)
    reward = RecordingReward()
    module = PPOModule(model=ModelSpec(config=dict(TINY_LLAMA)), critic=ModelSpec(config=dict(TINY_LLAMA)),
                       reward=reward, tokenizer=data.tokenizer, max_length=64, max_new_tokens=6, ppo_epochs=1)
    quiet_trainer(max_steps=1).fit(module, data)
    (prompts, responses, metadata, scores, verdicts), = reward.calls
    assert len(prompts) == len(responses) == len(metadata) == len(verdicts) == 8
    for prompt, meta, verdict in zip(prompts, metadata, verdicts):
        assert meta["prompt"] == prompt and verdict.task_id == meta["task_id"]
        assert verdict.status in {"passed", "wrong_answer", "error", "timeout"}
    assert set(scores.tolist()) <= {0.0, 10.0}
    assert module.trainer.callback_metrics["ppo/reward"] == pytest.approx(scores.mean().item())


def save_tiny_model(tokenizer, path):
    torch.manual_seed(0)
    model = build_causal_lm(ModelSpec(config=dict(TINY_LLAMA)), tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_code_eval_generates_then_evaluates(byte_tokenizer, tmp_path):
    """``--model``: n samples per problem written next to the report, the report counts them, and the same seed
    gives the same samples (a different seed does not)."""
    model_dir = save_tiny_model(byte_tokenizer, tmp_path / "model")
    problems = {k: v for k, v in synthesis_problems().items() if k in ("expr/3", "expr/12", "expr/45")}
    first = code_eval.generate_samples(problems, str(model_dir), n_samples=3, max_new_tokens=6, seed=7,
                                       batch_size=4, progress=False)
    again = code_eval.generate_samples(problems, str(model_dir), n_samples=3, max_new_tokens=6, seed=7,
                                       batch_size=4, progress=False)
    other = code_eval.generate_samples(problems, str(model_dir), n_samples=3, max_new_tokens=6, seed=8,
                                       batch_size=4, progress=False)
    assert first == again and first != other
    assert [s["task_id"] for s in first] == [t for t in problems for _ in range(3)]

    out = tmp_path / "report.json"
    report = code_eval.main(["--problems", "builtin:code_synthesis", "--model", str(model_dir), "--n-samples", "2",
                             "--max-new-tokens", "6", "--seed", "7", "--batch-size", "64", "--k", "1", "2",
                             "--no-progress", "--workers", "2", "--out", str(out)])
    samples = [json.loads(line) for line in (tmp_path / "report.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 200 and all(sum(s["task_id"] == t for s in samples) == 2 for t in synthesis_problems())
    saved = json.loads(out.read_text())
    assert saved["overall"]["problems"] == 100 and saved["overall"]["samples"] == 200
    assert set(saved["by_difficulty"]) == {"1-digit", "2-digit"}
    assert saved["by_difficulty"]["1-digit"]["samples"] == 20 and sum(saved["statuses"].values()) == 200
    assert 0.0 <= saved["overall"]["pass@1"] <= saved["overall"]["pass@2"] <= 1.0
    assert saved["args"]["samples"] == str(tmp_path / "report.samples.jsonl") and report["overall"] == saved["overall"]


def test_code_eval_model_needs_out(tmp_path):
    with pytest.raises(SystemExit):
        code_eval.main(["--problems", "builtin:code_synthesis", "--model", str(tmp_path)])


def test_load_problems_builtin_synthesis():
    problems = load_problems("builtin:code_synthesis")
    assert len(problems) == 100 and problems["expr/7"] == expression_problem(7)


def pass_rate(model_dir: str) -> float:
    """pass@1 of 4 samples per problem (temperature 1, seed 0), judged in the sandbox."""
    problems = synthesis_problems()
    samples = code_eval.generate_samples(problems, model_dir, n_samples=4, max_new_tokens=8, seed=0, batch_size=100,
                                         progress=False)
    return code_eval.evaluate(problems, samples, ks=(1,), config=CONFIG, n_workers=2, progress=False)["overall"]["pass@1"]


@pytest.mark.slow  # SFT 300 steps + PPO 30 iterations (960 sandboxed programs) + 800 judged: 80 s on 2 loaded cores
def test_sft_then_ppo_raises_the_execution_checked_pass_rate(tmp_path):
    """The documented two-step run (yaml/tiny/code_sft.yaml, then yaml/tiny/code_ppo.yaml from its export, seed 0):
    PPO raises the execution-checked pass@1 by at least 0.3 (measured with 8 samples per problem: 0.44 -> 0.97,
    docs/execution.md)."""
    common = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    sft_dir, ppo_dir = tmp_path / "sft" / "hf", tmp_path / "ppo" / "hf"
    cli_main(["fit", "--config", str(REPO / "yaml/tiny/code_sft.yaml"), *common,
              "--trainer.default_root_dir", str(tmp_path / "sft"), "--trainer.val_check_interval", "300",
              "--trainer.callbacks.init_args.dirpath", str(sft_dir)])
    before = pass_rate(str(sft_dir))
    cli_main(["fit", "--config", str(REPO / "yaml/tiny/code_ppo.yaml"), *common,
              "--model.init_args.model.name_or_path", str(sft_dir),
              "--trainer.default_root_dir", str(tmp_path / "ppo"), "--trainer.callbacks.init_args.dirpath",
              str(ppo_dir)])
    after = pass_rate(str(ppo_dir))
    assert before < 0.65 and after >= before + 0.3, (before, after)
