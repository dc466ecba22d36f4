"""The PPO configs: yaml/ppo_llama2.yaml holds the paper's HH-RLHF settings, and the Table-3 ablation ladder adds
exactly one trick per rung (Xu et al., arXiv 2404.10719, Sec. 5 and Table 3)."""

import pytest

import yaml
from tests.conftest import REPO

LADDER = ["ppo_base", "ppo_advnorm", "ppo_largebatch", "ppo_ema"]
EMA = "recipes.callbacks.ema_reference.EMAReference"


def flat(tree, prefix=""):
    """Dotted keys of a YAML tree; lists of callbacks become their class paths."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if key == "callbacks":
            out[name] = tuple(c["class_path"] for c in value or [])
        elif isinstance(value, dict):
            out.update(flat(value, name + "."))
        else:
            out[name] = value
    return out


def load(rel):
    return flat(yaml.safe_load((REPO / "yaml" / rel).read_text()))


def test_ppo_llama2_has_the_papers_settings():
    cfg, m = load("ppo_llama2.yaml"), "model.init_args."
    devices, per_gpu = cfg["trainer.devices"], cfg["data.init_args.rollout_batch_size"]
    mini = cfg[m + "mini_batch_size"]
    assert devices * per_gpu == 512 and per_gpu // mini == 4  # rollout batch 512 in 4 minibatches
    assert cfg[m + "optimizer.init_args.lr"] == 1e-5 and cfg[m + "critic_optimizer.init_args.lr"] == 5e-6
    expected = {"temperature": 1.0, "top_k": 200, "gamma": 1.0, "lam": 1.0, "kl_coef": 0.1, "reward_clip": 20.0,
                "normalize_advantages": True, "normalize_values": True, "max_new_tokens": 256}
    assert {k: cfg[m + k] for k in expected} == expected
    assert EMA in cfg["trainer.callbacks"]
    assert cfg[m + "critic.name_or_path"] == cfg[m + "reward.init_args.path"]  # critic starts from the reward model


def test_ablation_ladder_adds_one_trick_per_rung():
    rungs = [load(f"ablations/{name}.yaml") for name in LADDER]
    paths = {"trainer.default_root_dir", "trainer.logger.init_args.save_dir"}  # each rung writes its own folder
    diffs = [{k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} - paths for a, b in zip(rungs, rungs[1:])]
    m = "model.init_args."
    assert diffs == [{m + "normalize_advantages"}, {"data.init_args.rollout_batch_size"}, {"trainer.callbacks"}]
    base, advnorm, large, ema = rungs
    assert base[m + "normalize_advantages"] is False and advnorm[m + "normalize_advantages"] is True
    assert [r["data.init_args.rollout_batch_size"] // r[m + "mini_batch_size"] for r in (advnorm, large)] == [1, 4]
    assert EMA not in large["trainer.callbacks"] and EMA in ema["trainer.callbacks"]


HEADLINE = [  # (config, processes, extra overrides)
    ("yaml/ppo_llama2.yaml", 2, ("--trainer.strategy.init_args.data_parallel_size", "2")),
    ("yaml/ppo_llama2_lora.yaml", 1, ()),
    ("yaml/ppo_llama2_lora.yaml", 1, ("--model.init_args.model.load_in_4bit", "true")),
]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("config, processes, extra", HEADLINE, ids=["fsdp2-2-processes", "lora", "qlora"])
def test_headline_ppo_yamls_run_on_cpu(tmp_path, tiny_llama2, config, processes, extra):
    """The two headline PPO configs as shipped, with only the hardware, the sizes and the paths overridden: tiny
    random Llamas on the real Llama-2 tokenizer, the real HH-RLHF harmless test prompts, two iterations.
    yaml/ppo_llama2.yaml on 2 CPU processes (FSDP2, bf16-mixed, sharded reward model, EMA reference, sample logger,
    distributed checkpoints, HF export: the checkpoint is a sharded folder, the export loads in plain transformers);
    yaml/ppo_llama2_lora.yaml on one (LoRA policy and critic, the EMA adapter; merged export), and as QLoRA (4-bit
    base through bitsandbytes; exported as an adapter, which must have been trained: its B matrices start at 0)."""
    import csv
    import math
    import sys

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.conftest import shared_file
    from tests.recipes.test_distributed import _run, _skip_without_gloo

    _skip_without_gloo()
    tok_dir = shared_file("llama2-tokenizer/tokenizer.model").parent
    hh = shared_file("hh-rlhf/harmless-base-test.jsonl.gz")
    run = tmp_path / "run"
    _run([sys.executable, "-m", "recipes", "fit", "--config", config, "--trainer.accelerator", "cpu",
          "--trainer.devices", str(processes), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(run), "--model.init_args.model.name_or_path", str(tiny_llama2 / "sft"),
          "--model.init_args.critic.name_or_path", str(tiny_llama2 / "rm"),
          "--model.init_args.reward.init_args.path", str(tiny_llama2 / "rm"),
          "--model.init_args.max_new_tokens", "8", "--model.init_args.generation_batch_size", "2",
          "--model.init_args.mini_batch_size", "2", "--model.init_args.micro_batch_size", "1",
          "--data.init_args.tokenizer", str(tok_dir), "--data.init_args.data", str(hh),
          "--data.init_args.rollout_batch_size", "4", *extra], tmp_path)
    version = run / "lightning_logs" / "version_0"
    assert (version / "checkpoints" / "last.ckpt" / ".metadata").is_file() == (processes == 2)  # sharded folder
    rows = [r for r in csv.DictReader(open(version / "metrics.csv")) if r.get("ppo/reward")]
    assert len(rows) == 2 and all(math.isfinite(float(r["ppo/kl"])) for r in rows)
    if "load_in_4bit" in extra:  # a 4-bit base is exported as its adapter
        adapter = load_file(version / "hf" / "adapter_model.safetensors")
        assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0
    else:
        assert AutoModelForCausalLM.from_pretrained(version / "hf").config.vocab_size == 32000
