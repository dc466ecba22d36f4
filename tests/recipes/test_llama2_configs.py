"""Every 7B training YAML runs as shipped on this CPU, with only the hardware, the sizes and the paths overridden:
a tiny random Llama on the real Llama-2 tokenizer, the real HH-RLHF harmless test split and Stanford Alpaca rows
from ../shared/data (PKU-SafeRLHF: the exact-format fixture), two optimizer steps, then the HF export.

``FSDPStrategy`` refuses a CPU, so those YAMLs run under Lightning's FSDP2 (``ModelParallelStrategy``) on two gloo
processes instead: model, data, callbacks, precision and optimization are the YAML's own. The DeepSpeed YAMLs run
with their own strategy on two processes (``tests/deepspeed_cpu`` bypasses only Lightning's CUDA device bookkeeping;
needs deepspeed, the `dev` extra). The PPO YAMLs run in test_ppo_configs.py. Markers ``slow`` and ``distributed``."""

import os
import sys

import pytest

import yaml
from tests.conftest import REPO, shared_file

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

FSDP2 = '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", ' \
        '"init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}'
SAFERLHF = REPO / "tests" / "fixtures" / "saferlhf" / "pairs.jsonl"
CONFIGS = ["sft_llama2", "sft_llama2_lora", "sft_saferlhf_llama2", "reward_llama2", "dpo_llama2", "dpo_llama2_lora",
           "dpo_saferlhf_llama2", "dpo_iter_llama2", "rrhf_llama2", "pro_llama2", "sft_llama2_deepspeed_zero2",
           "reward_llama2_deepspeed_zero2", "dpo_llama2_deepspeed_zero3"]


@pytest.mark.parametrize("name", CONFIGS)
def test_llama2_yaml_runs_two_steps_on_cpu(name, tiny_llama2, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from tests.recipes.test_distributed import _run, _skip_without_gloo

    config = yaml.safe_load((REPO / "yaml" / f"{name}.yaml").read_text())
    strategy = config["trainer"].get("strategy")
    fsdp1 = isinstance(strategy, dict) and strategy["class_path"].endswith("FSDPStrategy")
    deepspeed = isinstance(strategy, dict) and strategy["class_path"].endswith("DeepSpeedStrategy")
    sharded = fsdp1 or deepspeed
    if sharded:
        _skip_without_gloo()
    if deepspeed:
        pytest.importorskip("deepspeed")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests" / "deepspeed_cpu"), str(REPO)]))
    data = config["data"]["init_args"]
    sources = {"alpaca": "alpaca/alpaca_5000.json.gz", "hh": "hh-rlhf/harmless-base-test.jsonl.gz"}
    fmt = data["source_format"]
    source = shared_file(sources[fmt]) if fmt in sources else SAFERLHF
    args = ["--trainer.accelerator", "cpu", "--trainer.devices", "2" if sharded else "1", "--trainer.max_steps", "2",
            "--trainer.max_epochs", "1", "--trainer.accumulate_grad_batches", "1", "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path / "run"),
            "--model.init_args.model.name_or_path", str(tiny_llama2 / "sft"),
            "--data.init_args.tokenizer", str(tiny_llama2 / "sft"), "--data.init_args.data", str(source),
            "--data.init_args.batch_size", "2"]
    if fsdp1:
        args += ["--trainer.strategy", FSDP2]
    if "val_data" in data:  # a local file has one split
        args += ["--data.init_args.val_data", str(source), "--data.init_args.val_split", "train"]
    if "split" in data:
        args += ["--data.init_args.split", "train"]
    if "reward" in data:  # DPO-Iter: the reward model labels each round's samples
        args += ["--data.init_args.reward.init_args.path", str(tiny_llama2 / "rm"),
                 "--data.init_args.prompts_per_round", "8", "--data.init_args.k", "2",
                 "--data.init_args.max_new_tokens", "8", "--data.init_args.generation_batch_size", "4"]
    else:
        args += ["--data.init_args.max_rows", "64"]
    _run([sys.executable, "-m", "recipes", "fit", "--config", f"yaml/{name}.yaml", *args], tmp_path)
    exported = next((tmp_path / "run").rglob("hf/config.json")).parent
    weights = load_file(exported / "model.safetensors")
    assert weights and all(t.isfinite().all() for t in weights.values())
