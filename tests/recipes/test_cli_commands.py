"""The CLI's inputs and commands: mistyped config paths, ``config: null`` on the command line, ``test`` on the
preference configs, the default progress bar."""

import math

import pytest

from recipes.__main__ import cli_main
from recipes.argv import nested_nulls

QUICK = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--data.init_args.max_rows", "40"]


@pytest.mark.parametrize("flag", ["--config {}", "--config={}", "-c {}"])
def test_mistyped_config_names_the_path_and_the_nearest_shipped_configs(flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: the shipped configs are found by name
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", *flag.format("yaml/tiny/sfft.yaml").split()])
    message = str(e.value.code)
    assert "--config yaml/tiny/sfft.yaml: no such file" in message and str(tmp_path) in message
    assert "yaml/tiny/sft.yaml" in message and "ModuleNotFoundError" not in message


def test_config_equals_form_resolves_like_the_spaced_form(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for args in (["--config", "tiny/sft.yaml"], ["--config=tiny/sft.yaml"]):
        with pytest.raises(SystemExit) as e:
            cli_main(["fit", *args, "--print_config"])
        assert e.value.code in (0, None)
        assert "recipes.modules.sft.SFTModule" in capsys.readouterr().out


def test_nested_null_becomes_a_dict_with_a_real_none():
    assert nested_nulls(["--model.init_args.model.config", "null", "--trainer.max_steps", "2"]) == [
        '--model={"init_args": {"model": {"config": null}}}', "--trainer.max_steps", "2"]
    assert nested_nulls(["--model.init_args.model.config=null"]) == ['--model={"init_args": {"model": {"config": null}}}']
    kept = ["--trainer.logger.init_args.save_dir", "null", "--model.init_args.model.name_or_path", "null_folder"]
    assert nested_nulls(kept) == kept  # one level below init_args parses as None already; a name is no null


def test_config_null_loads_the_pretrained_folder(tmp_path, byte_tokenizer):
    """A tiny config (random 64-wide model) pointed at a saved 32-wide model with ``config null`` loads the folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import TINY_LLAMA

    cfg = AutoConfig.for_model(**TINY_LLAMA, vocab_size=len(byte_tokenizer), pad_token_id=byte_tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "pretrained")
    cli = cli_main(["fit", "--config", "yaml/tiny/sft.yaml", "--model.init_args.model.name_or_path",
                    str(tmp_path / "pretrained"), "--model.init_args.model.config", "null", "--trainer.max_steps", "1",
                    "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.callbacks", "[]",
                    "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(tmp_path), *QUICK])
    assert cli.config.fit.model.init_args.model.config is None
    assert cli.model.policy.config.hidden_size == TINY_LLAMA["hidden_size"] and cli.trainer.global_step == 1


@pytest.mark.parametrize("name", ["reward", "dpo"])
def test_test_subcommand_runs_the_validation_metrics_on_the_held_out_split(name, tmp_path):
    cli = cli_main(["test", "--config", f"yaml/tiny/{name}.yaml", "--trainer.default_root_dir", str(tmp_path), *QUICK])
    metrics = cli.trainer.callback_metrics
    for key in ("test/loss", "test/rewards/accuracies", "test/rewards/margins"):
        assert key in metrics and math.isfinite(float(metrics[key])), key


def test_the_default_progress_bar_counts_steps_and_can_be_turned_off(tmp_path):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from recipes.callbacks.progress import StepProgressBar

    common = ["--config", "yaml/tiny/sft.yaml", "--trainer.default_root_dir", str(tmp_path)]
    assert isinstance(cli_main(common, run=False).trainer.progress_bar_callback, StepProgressBar)
    off = cli_main([*common, "--trainer.enable_progress_bar", "false"], run=False).trainer
    assert off.progress_bar_callback is None
    own = cli_main([*common, "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"], run=False).trainer
    assert type(own.progress_bar_callback) is TQDMProgressBar  # a bar the config names is kept, not doubled
