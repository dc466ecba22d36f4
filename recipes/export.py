"""Export a checkpoint as a Hugging Face folder, after the fact (the HFExport callback does it at the end of fit).

    python -m recipes.export --config runs/tiny_sft/version_0/config.yaml --ckpt_path last.ckpt --out my-model
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import yaml

from recipes.__main__ import cli_main


def export_checkpoint(config: str, ckpt_path: str, out: str, merge_lora: bool = True) -> str:
    """Build the run's module from its config, load the checkpoint's weights, and write ``out``."""
    with open(config, encoding="utf-8") as f:
        values = yaml.safe_load(f)
    for key in ("ckpt_path", "weights_only"):  # subcommand keys saved with fit's config; not model or data settings
        values.pop(key, None)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(values, f)
    cli = cli_main(["--config", f.name], run=False)
    module = cli.model
    module.configure_model()
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])
    return module.export_pretrained(out, merge_lora=merge_lora)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the run's config.yaml (saved next to its logs)")
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--keep_adapter", action="store_true", help="save a LoRA adapter instead of merging it")
    args = parser.parse_args()
    print(export_checkpoint(args.config, args.ckpt_path, args.out, merge_lora=not args.keep_adapter))


if __name__ == "__main__":
    main()
