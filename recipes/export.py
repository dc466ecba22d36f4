"""Export a checkpoint as a Hugging Face folder, after the fact (the HFExport callback does it at the end of fit).

    python -m recipes.export --config runs/tiny_sft/version_0/config.yaml --ckpt_path last.ckpt --out my-model

The checkpoint may be one file (single device, DDP, FSDP with ``state_dict_type: full``), a distributed-checkpoint
folder (FSDP ``state_dict_type: sharded``, ``ModelParallelStrategy``/FSDP2) or a DeepSpeed ZeRO folder (needs
deepspeed installed); one process on a CPU reads any of them whole, so the machine needs the model's size in RAM.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

import recipes.modules.models  # noqa: F401  (registers the specs a checkpoint pickles for weights_only=True)
import yaml
from recipes import legacy
from recipes.__main__ import cli_main
from recipes.modules.export import model_card, write_model_card


def checkpoint_kind(ckpt_path: str) -> str:
    """``file``, ``distributed`` (a torch.distributed.checkpoint folder) or ``deepspeed`` (a ZeRO folder)."""
    path = Path(ckpt_path)
    if path.is_file():
        return "file"
    if (path / ".metadata").is_file():
        return "distributed"
    if (path / "checkpoint").is_dir() or (path / "latest").is_file():
        return "deepspeed"
    raise FileNotFoundError(f"Checkpoint '{ckpt_path}' is neither a file, a distributed-checkpoint folder (with "
                            "'.metadata') nor a DeepSpeed folder (with 'checkpoint/'); pass the .ckpt file or folder "
                            "that ModelCheckpoint wrote.")


def load_module_state(ckpt_path: str) -> dict[str, torch.Tensor]:
    """The LightningModule's full (unsharded) state dict from any checkpoint kind, on CPU.

    A checkpoint of rlhf-recipes 0.1 loads too: its pickled specs (``modules.models.ModelSpec``) are read under their
    new names (``recipes.modules.models`` registers the old ones for ``weights_only=True``); where a load must unpickle
    with ``weights_only=False`` (DeepSpeed's conversion) and meets an old module, the error names the new path."""
    kind = checkpoint_kind(ckpt_path)
    if kind == "file":
        return torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    if kind == "distributed":
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        state: dict[str, Any] = _load_distributed_checkpoint(Path(ckpt_path))
        return state["state_dict"] if "state_dict" in state else state["model"]  # FSDP2 / FSDP (sharded)
    try:
        import deepspeed  # noqa: F401
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    except ImportError as e:
        raise RuntimeError(f"'{ckpt_path}' is a DeepSpeed checkpoint: `pip install deepspeed` to export it (no GPU "
                           "needed), or convert it with its own zero_to_fp32.py first.") from e
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "fp32.ckpt")
        try:  # both unpickle with weights_only=False, which imports each pickled class by its (maybe 0.1) path
            convert_zero_checkpoint_to_fp32_state_dict(ckpt_path, out)
            return torch.load(out, map_location="cpu", weights_only=False)["state_dict"]
        except ModuleNotFoundError as e:
            legacy.explain_unpickling(e, ckpt_path)
            raise


def export_checkpoint(config: str, ckpt_path: str, out: str, merge_lora: bool = True) -> str:
    """Build the run's module from its config, load the checkpoint's weights, and write ``out`` with a model card
    (README.md) holding the run's config, data settings and hyperparameters."""
    legacy.check(["--config", config])  # an old run's config names 0.1 class paths: say so naming this file
    with open(config, encoding="utf-8") as f:
        values = yaml.safe_load(f)
    for key in ("ckpt_path", "weights_only"):  # subcommand keys saved with fit's config; not model or data settings
        values.pop(key, None)
    # One CPU process builds the unsharded module: the run's accelerator, devices and strategy do not apply here.
    values["trainer"] = {**values.get("trainer", {}), "accelerator": "cpu", "devices": 1, "strategy": "auto",
                         "num_nodes": 1, "precision": "32-true"}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(values, f)
    try:
        cli = cli_main(["--config", f.name], run=False)
    finally:
        os.unlink(f.name)
    module = cli.model
    module.configure_model()
    for callback in cli.trainer.callbacks:  # EMAReference and DPOIterRound re-add the LoRA reference adapter that
        if type(callback).__name__ in ("EMAReference", "DPOIterRound"):  # the checkpoint holds (at load time)
            callback.setup(cli.trainer, module, "export")  # not "fit": no training wiring is checked
    module.load_state_dict(load_module_state(ckpt_path))
    out = module.export_pretrained(out, merge_lora=merge_lora)
    with open(config, encoding="utf-8") as f:  # the card of a module without its trainer: no final metrics
        write_model_card(out, model_card(module, config=f.read(), datamodule=cli.datamodule))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the run's config.yaml (saved next to its logs)")
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file, or the folder of a sharded checkpoint")
    parser.add_argument("--out", required=True)
    parser.add_argument("--keep_adapter", action="store_true", help="save a LoRA adapter instead of merging it")
    args = parser.parse_args()
    print(export_checkpoint(args.config, args.ckpt_path, args.out, merge_lora=not args.keep_adapter))


if __name__ == "__main__":
    main()
