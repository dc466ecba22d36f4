"""`python -m recipes.export` on a LoRA DPO-Iter checkpoint: the checkpoint holds DPOIterRound's round-reference
adapter, which the export re-adds before the weights load (it failed with "Unexpected key ... round_reference"), and
the merged export equals the run's own export."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from recipes.__main__ import cli_main
from recipes.export import export_checkpoint


def test_lora_dpo_iter_checkpoint_exports_like_the_run(tmp_path):
    torch.set_num_threads(1)
    root = tmp_path / "run"
    lora = json.dumps({"r": 4, "alpha": 8, "dropout": 0.0})
    cli_main(["fit", "--config", "yaml/tiny/dpo_iter.yaml", "--trainer.max_epochs", "1", "--trainer.max_steps", "2",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
              "--trainer.callbacks", json.dumps([
                  {"class_path": "recipes.callbacks.dpo_iter.DPOIterRound", "init_args": {"rounds": 1}},
                  {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
                  {"class_path": "recipes.callbacks.hf_export.HFExport", "init_args": {"dirpath": str(root / "hf")}}]),
              "--model.init_args.model.lora", lora, "--model.init_args.reference_mode", "disabled_adapter",
              "--data.init_args.prompts_per_round", "16", "--data.init_args.k", "2"])
    config, ckpt = next(root.rglob("config.yaml")), next(root.rglob("last.ckpt"))
    assert any("round_reference" in k for k in torch.load(ckpt, weights_only=False)["state_dict"])
    out = Path(export_checkpoint(str(config), str(ckpt), str(tmp_path / "exported")))
    exported, run = load_file(out / "model.safetensors"), load_file(root / "hf" / "model.safetensors")
    assert exported.keys() == run.keys()
    for name, value in run.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0, msg=name)
