"""The model card (README.md) every export writes: front matter the hub reads, and a body naming base model,
algorithm, data, hyperparameters, final metrics, the config and, for reward models, the input convention."""

from pathlib import Path

import pytest
import torch

import yaml
from recipes.__main__ import cli_main
from recipes.modules.export import ModelCard, render_model_card, save_pretrained


def front_matter(text: str) -> dict:
    """The YAML between the first two ``---`` lines."""
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_render_writes_front_matter_and_sections():
    card = ModelCard(base_model="meta-llama/Llama-2-7b-hf", algorithm="DPOModule", data={"data": "pairs.jsonl"},
                     hyperparameters={"beta": 0.1}, metrics={"train/loss": 0.5}, config="trainer: {max_steps: 3}\n",
                     adapter=True)
    text = render_model_card(card)
    assert front_matter(text) == {"library_name": "peft", "tags": ["rlhf-recipes", "dpo", "lora"],
                                  "base_model": "meta-llama/Llama-2-7b-hf"}
    for line in ("- Base model: meta-llama/Llama-2-7b-hf", "- Algorithm: DPOModule", "data: pairs.jsonl",
                 "beta: 0.1", "train/loss: 0.5", "trainer: {max_steps: 3}", "a peft LoRA adapter"):
        assert line in text, line
    assert "## Input convention" not in text


def test_plain_save_pretrained_writes_a_minimal_card(tmp_path, tiny_model, byte_tokenizer):
    """Without a module's card: library and tags only (a random-init model has no base_model)."""
    save_pretrained(tiny_model, byte_tokenizer, str(tmp_path / "hf"))
    text = (tmp_path / "hf" / "README.md").read_text()
    assert front_matter(text) == {"library_name": "transformers", "tags": ["rlhf-recipes"]}
    assert "randomly initialized" in text and "## Final metrics" not in text


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    """yaml/tiny/reward.yaml fitted 2 steps (HFExport writes its hf folder at fit end) and a checkpoint of it."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("card") / "run"
    cli = cli_main(["fit", "--config", "yaml/tiny/reward.yaml", "--trainer.max_steps", "2",
                    "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                    "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
                    "--trainer.logger.init_args.save_dir", str(root)])
    ckpt = root / "manual.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    return Path(cli.trainer.log_dir), ckpt


def test_fit_export_card_names_everything(reward_run):
    log_dir, _ = reward_run
    text = (log_dir / "hf" / "README.md").read_text()
    assert front_matter(text) == {"library_name": "transformers", "tags": ["rlhf-recipes", "reward-model"]}
    for line in ("- Algorithm: RewardModule", "data: builtin:preference", "source_format: generic",
                 "use_margin: true", "train/loss: ", "val/rewards/accuracies: ",
                 "class_path: recipes.modules.reward.RewardModule", "max_steps: 2", "## Input convention",
                 "followed by the EOS token"):
        assert line in text, line
    assert "_class_path" not in text.split("## Config")[0]


def test_export_checkpoint_card_holds_the_run_config(reward_run, tmp_path):
    """`python -m recipes.export` has no trainer metrics but the run's config.yaml, written verbatim."""
    from recipes.export import export_checkpoint

    log_dir, ckpt = reward_run
    out = Path(export_checkpoint(str(log_dir / "config.yaml"), str(ckpt), str(tmp_path / "hf")))
    text = (out / "README.md").read_text()
    assert (log_dir / "config.yaml").read_text().rstrip() in text
    assert "- Algorithm: RewardModule" in text and "data: builtin:preference" in text
    assert "## Final metrics" not in text and "## Input convention" in text
