"""GRPO and RLOO on the toy program-synthesis task with the execution-checked reward (yaml/tiny/grpo.yaml,
yaml/tiny/rloo.yaml, from the export of yaml/tiny/code_sft.yaml): pass@1 on the 20 problems RL never saw rises; and
under 2-process DDP and FSDP2 GRPO ends where one process does on the same global batch."""

import json

import pytest
import torch
import torch.nn.functional as F

from recipes import code_eval
from recipes.__main__ import cli_main
from recipes.datamodules.code_synthesis import synthesis_problems
from recipes.modules.generation import sample
from recipes.modules.grpo import GRPOModule
from recipes.modules.types import Generation
from tests.conftest import REPO
from tests.recipes.test_code_rl import CONFIG
from tests.recipes.test_distributed import FSDP2, PPO_TOLERANCE, _assert_same, _fit, _gap, _skip_without_gloo

HELD_OUT = {k: v for k, v in synthesis_problems().items() if int(k.split("/")[1]) >= 80}  # max_rows 80: RL sees 0..79


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def held_out_pass_rate(model_dir: str) -> float:
    """pass@1 of 8 samples per held-out problem (temperature 1, seed 0), judged in the sandbox."""
    samples = code_eval.generate_samples(HELD_OUT, model_dir, n_samples=8, max_new_tokens=8, seed=0, batch_size=160,
                                         progress=False)
    return code_eval.evaluate(HELD_OUT, samples, ks=(1,), config=CONFIG, n_workers=2, progress=False)["overall"]["pass@1"]


@pytest.mark.slow  # SFT 300 steps + GRPO and RLOO 30 iterations each (1920 sandboxed programs) + 480 judged
def test_grpo_and_rloo_raise_the_held_out_pass_rate(tmp_path, capsys):
    """Seed 0: SFT's held-out pass@1 0.41 rises to 0.89 (GRPO) and 0.96 (RLOO) (measured on 2 cores, 2026-12-01);
    the test asks for +0.3 each, on problems whose prompts RL never sampled."""
    common = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    sft_dir = tmp_path / "sft" / "hf"
    cli_main(["fit", "--config", str(REPO / "yaml/tiny/code_sft.yaml"), *common,
              "--trainer.default_root_dir", str(tmp_path / "sft"), "--trainer.val_check_interval", "300",
              "--trainer.callbacks.init_args.dirpath", str(sft_dir)])
    before = held_out_pass_rate(str(sft_dir))
    after = {}
    for name in ("grpo", "rloo"):
        out = tmp_path / name / "hf"
        cli_main(["fit", "--config", str(REPO / f"yaml/tiny/{name}.yaml"), *common,
                  "--model.init_args.model.name_or_path", str(sft_dir), "--trainer.default_root_dir",
                  str(tmp_path / name), "--trainer.callbacks.init_args.dirpath", str(out)])
        after[name] = held_out_pass_rate(str(out))
    with capsys.disabled():
        print(f"\nheld-out pass@1: SFT {before:.3f}, GRPO {after['grpo']:.3f}, RLOO {after['rloo']:.3f}")
    assert before < 0.65 and all(rate >= before + 0.3 for rate in after.values()), (before, after)


class LayoutInvariantGRPO(GRPOModule):
    """GRPOModule whose sampler draws each row from its own generator, seeded by the row's prompt tokens and its
    index in the group, on the row without its left padding: the same responses on any number of ranks (the
    module's own generator is seeded per rank), so the test isolates what data parallelism does to the update."""

    def forward(self, batch):
        hp, tok, rows, run = self.hparams, self.tokenizer, [], 0
        ids, att = batch["input_ids"], batch["attention_mask"]
        for i in range(ids.shape[0]):
            run = run + 1 if i and torch.equal(ids[i], ids[i - 1]) else 0
            prompt = ids[i][att[i].bool()][None]
            seed = int((prompt[0] * torch.arange(1, prompt.shape[1] + 1)).sum()) * 31 + run
            rows.append(sample(self.policy, prompt, torch.ones_like(prompt), hp.max_new_tokens, tok.eos_token_id,
                               tok.pad_token_id, hp.temperature, generator=torch.Generator().manual_seed(seed)))
        width = max(g.response_ids.shape[1] for g in rows)
        pad = [width - g.response_ids.shape[1] for g in rows]
        return Generation(torch.cat([F.pad(g.response_ids, (0, p), value=tok.pad_token_id) for g, p in zip(rows, pad)]),
                          torch.cat([F.pad(g.response_mask, (0, p)) for g, p in zip(rows, pad)]),
                          torch.cat([g.ended_with_eos for g in rows]))


class LengthReward:
    """0.1 x the response's length in characters: responses that differ score differently."""

    def __call__(self, prompts, responses, metadata=None):
        return torch.tensor([0.1 * len(r) for r in responses])


@pytest.mark.slow
@pytest.mark.distributed
def test_grpo_ddp_and_fsdp2_match_one_process(tmp_path):
    """GRPO, 2 iterations of 8 prompts x 4 samples (drawn per row, so every layout samples the same responses:
    `LayoutInvariantGRPO`), one minibatch, 2 epochs, the KL in the loss (a frozen reference), SGD (Adam's first steps turn 1e-9 gradient noise
    into lr-sized steps): 2 x 4 prompts under DDP and FSDP2 end where 1 x 8
    does (to 5e-4), while a rollout of 4 prompts ends elsewhere: group statistics are a group's own (a group never
    spans ranks) and the loss's denominators are summed over ranks."""
    _skip_without_gloo()
    reward = {"class_path": "tests.recipes.test_critic_free_rl.LengthReward"}
    grpo = ("--model.init_args.reward", json.dumps(reward),  # first: the code reward's settings would not carry over
            "--model.class_path", "tests.recipes.test_critic_free_rl.LayoutInvariantGRPO",
            "--model.init_args.samples_per_prompt", "4",
            "--model.init_args.mini_batch_size", "null", "--model.init_args.ppo_epochs", "2",
            "--model.init_args.loss_aggregation", "token_mean",
            "--model.init_args.optimizer", json.dumps({"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}}))
    kwargs = dict(config="yaml/tiny/grpo.yaml", extra=grpo, steps=2, batch_arg="rollout_batch_size")
    single = _fit(tmp_path, "grpo-single", 1, "auto", global_batch=8, **kwargs)
    control = _fit(tmp_path, "grpo-control", 1, "auto", global_batch=4, **kwargs)
    assert _gap(control, single) > 10 * PPO_TOLERANCE
    for label, strategy in (("ddp", "ddp"), ("fsdp2", FSDP2)):
        _assert_same(_fit(tmp_path, f"grpo-{label}", 2, strategy, global_batch=8, **kwargs), single, PPO_TOLERANCE,
                     f"grpo {label}")


