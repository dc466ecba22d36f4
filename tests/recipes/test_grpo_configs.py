"""The critic-free 7B configs: yaml/grpo_llama2.yaml holds GRPO's published settings (Shao et al., arXiv 2402.03300,
Sec. 4.2) and yaml/rloo_llama2.yaml RLOO's, both with PPO's 512 responses per iteration; both run as shipped on CPU
with tiny models (slow)."""

import pytest

from tests.recipes.test_ppo_configs import load

M = "model.init_args."


def test_grpo_llama2_has_the_papers_settings():
    cfg = load("grpo_llama2.yaml")
    assert cfg["trainer.devices"] * cfg["data.init_args.rollout_batch_size"] * cfg[M + "samples_per_prompt"] == 512
    assert cfg[M + "advantage.class_path"].endswith("GroupNormalizedAdvantage")
    assert cfg[M + "advantage.init_args.scale_by_std"] is True
    assert cfg[M + "policy_loss.init_args.kl_coef"] == 0.04 and cfg[M + "optimizer.init_args.lr"] == 1e-6
    assert cfg[M + "ppo_epochs"] == 1 and cfg[M + "loss_aggregation"] == "sequence_mean"


def test_rloo_llama2_puts_the_kl_in_the_reward():
    cfg = load("rloo_llama2.yaml")
    assert cfg["trainer.devices"] * cfg["data.init_args.rollout_batch_size"] * cfg[M + "samples_per_prompt"] == 512
    assert cfg[M + "advantage.class_path"].endswith("LeaveOneOutAdvantage") and cfg[M + "samples_per_prompt"] == 4
    assert cfg[M + "reward_kl_coef"] == 0.05 and cfg[M + "policy_loss.init_args.kl_coef"] == 0.0
    assert cfg[M + "ppo_epochs"] == 1 and cfg[M + "loss_aggregation"] == "constant"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["grpo_llama2", "rloo_llama2"])
def test_critic_free_yamls_run_on_cpu(tmp_path, tiny_llama2, name):
    """As shipped, with only the hardware, the sizes and the paths overridden: tiny random Llamas on the real Llama-2
    tokenizer, the real HH-RLHF harmless test prompts, two iterations on 2 CPU processes (FSDP2, bf16-mixed, sharded
    reward model, distributed checkpoints); the export loads in plain transformers."""
    import csv
    import math
    import sys

    from transformers import AutoModelForCausalLM

    from tests.conftest import shared_file
    from tests.recipes.test_distributed import _run, _skip_without_gloo

    _skip_without_gloo()
    tok_dir = shared_file("llama2-tokenizer/tokenizer.model").parent
    hh = shared_file("hh-rlhf/harmless-base-test.jsonl.gz")
    run = tmp_path / "run"
    _run([sys.executable, "-m", "recipes", "fit", "--config", f"yaml/{name}.yaml", "--trainer.accelerator", "cpu",
          "--trainer.devices", "2", "--trainer.strategy.init_args.data_parallel_size", "2",
          "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(run), "--model.init_args.model.name_or_path", str(tiny_llama2 / "sft"),
          "--model.init_args.reward.init_args.path", str(tiny_llama2 / "rm"),
          "--model.init_args.max_new_tokens", "8", "--model.init_args.generation_batch_size", "2",
          "--model.init_args.micro_batch_size", "2", "--model.init_args.samples_per_prompt", "2",
          "--data.init_args.tokenizer", str(tok_dir), "--data.init_args.data", str(hh),
          "--data.init_args.rollout_batch_size", "2"], tmp_path)
    version = run / "lightning_logs" / "version_0"
    assert (version / "checkpoints" / "last.ckpt" / ".metadata").is_file()  # a sharded folder
    rows = [r for r in csv.DictReader(open(version / "metrics.csv")) if r.get("grpo/reward")]
    assert len(rows) == 2 and all(math.isfinite(float(r["grpo/rollout_kl"])) for r in rows)
    assert AutoModelForCausalLM.from_pretrained(version / "hf").config.vocab_size == 32000
