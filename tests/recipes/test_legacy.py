"""Paths of rlhf-recipes 0.1 (top-level modules, datamodules, callbacks): a config naming one stops before anything
loads, with the new path; a checkpoint pickled under the old names loads; the old -> new map cannot go stale."""

import dataclasses
import importlib
import json
import logging
import sys
import types

import pytest
import torch

import recipes.__main__ as main
from recipes import legacy
from recipes.__main__ import cli_main
from recipes.export import load_module_state
from recipes.modules.models import LoRASpec, ModelSpec
from tests.conftest import REPO

OLD_YAML = """\
# an rlhf-recipes 0.1 config
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
    - class_path: callbacks.ema_reference.EMAReference
model:
  class_path: modules.sft.SFTModule
  init_args:
    reward: {class_path: "modules.rewards.SequenceClassifierReward"}
    # class_path: modules.dpo.DPOModule   (a comment is no config)
data:
  class_path: datamodules.sft.SFTDataModule
"""
NOTE = "(rlhf-recipes 0.2 installs one package, recipes): update the"


@pytest.fixture
def no_cli(monkeypatch):
    """Fail the test if the LightningCLI is built, i.e. if anything would be parsed, imported or loaded."""
    monkeypatch.setattr(main, "AlignmentCLI", lambda *a, **kw: pytest.fail("the CLI was built"))


def _exit_message(args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert isinstance(exit_info.value.code, str), exit_info.value.code  # a message, not a bare exit status
    return exit_info.value.code


def test_old_yaml_stops_before_anything_loads_naming_file_old_and_new_path(tmp_path, no_cli):
    config = tmp_path / "old.yaml"
    config.write_text(OLD_YAML)
    message = _exit_message(["fit", "--config", str(config)])
    lines = message.splitlines()
    assert lines == [
        f"{config}:5: class_path 'callbacks.ema_reference.EMAReference' moved to "
        f"'recipes.callbacks.ema_reference.EMAReference' {NOTE} config.",
        f"{config}:7: class_path 'modules.sft.SFTModule' moved to 'recipes.modules.sft.SFTModule' {NOTE} config.",
        f"{config}:9: class_path 'modules.rewards.SequenceClassifierReward' moved to "
        f"'recipes.modules.reward_functions.SequenceClassifierReward' {NOTE} config.",
        f"{config}:12: class_path 'datamodules.sft.SFTDataModule' moved to 'recipes.datamodules.sft.SFTDataModule' "
        f"{NOTE} config.",
    ]  # ModelCheckpoint (lightning.pytorch.callbacks) and the commented-out line are not flagged


def test_old_config_json_and_equals_form(tmp_path, no_cli):
    config = tmp_path / "old.json"
    config.write_text(json.dumps({"model": {"class_path": "modules.code_reward.UnitTestReward"}}))
    message = _exit_message(["fit", f"--config={config}"])
    assert message.startswith(f"{config}:1: class_path 'modules.code_reward.UnitTestReward' moved to "
                              "'recipes.modules.code.reward.UnitTestReward'")


def test_old_paths_on_the_command_line_name_the_argument(no_cli):
    callbacks = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"},
                            {"class_path": "callbacks.dpo_iter.DPOIterRound"}])
    message = _exit_message(["fit", "--config", "yaml/tiny/sft.yaml", "--model", "modules.sft.SFTModule",
                             "--data=datamodules.preference.PreferenceDataModule", "--trainer.callbacks", callbacks,
                             "--model.init_args.sandbox.class_path", "modules.execution.SandboxConfig"])
    assert message.splitlines() == [
        f"--model: class_path 'modules.sft.SFTModule' moved to 'recipes.modules.sft.SFTModule' {NOTE} argument.",
        "--data: class_path 'datamodules.preference.PreferenceDataModule' moved to "
        f"'recipes.datamodules.preference.PreferenceDataModule' {NOTE} argument.",
        "--trainer.callbacks: class_path 'callbacks.dpo_iter.DPOIterRound' moved to "
        f"'recipes.callbacks.dpo_iter.DPOIterRound' {NOTE} argument.",
        "--model.init_args.sandbox.class_path: class_path 'modules.execution.SandboxConfig' moved to "
        f"'recipes.modules.code.execution.SandboxConfig' {NOTE} argument.",
    ]


def test_the_export_command_names_the_old_run_config(tmp_path):
    from recipes.export import export_checkpoint

    config = tmp_path / "config.yaml"
    config.write_text(OLD_YAML)
    with pytest.raises(SystemExit, match=rf"^{config}:5: class_path 'callbacks.ema_reference.EMAReference' moved"):
        export_checkpoint(str(config), str(tmp_path / "last.ckpt"), str(tmp_path / "hf"))


@pytest.mark.parametrize("args", [
    ["--config", "yaml/tiny/sft.yaml"],  # new paths only
    ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint"],  # "callbacks." inside a path
    ["--trainer.callbacks", json.dumps([{"class_path": "callbacks.my_logger.MyLogger"}])],  # a user's own package
    ["--model", "modules.MyModule", "--data", "datamodules.Mine"],  # no module of 0.1 after the root
    ["--data.init_args.data", "modules.sft.jsonl"],  # a data file, not a class path
    ["--model.init_args.callbacks", "3"],  # a user key named callbacks
], ids=["new", "lightning", "user-package", "user-modules", "data-file", "user-key"])
def test_new_and_unrelated_paths_are_not_flagged(args):
    assert legacy.find_moved(["fit", *args]) == []


def test_every_shipped_config_uses_new_paths():
    configs = sorted(str(p) for p in (REPO / "yaml").rglob("*.yaml"))
    assert len(configs) > 20
    assert legacy.find_moved([arg for path in configs for arg in ("--config", path)]) == []


def test_new_config_passes_through_untouched(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", "yaml/tiny/sft.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path: recipes.modules.sft.SFTModule" in capsys.readouterr().out


def test_every_new_path_in_the_map_imports():
    """Each new module imports and each moved symbol is in its new module, so the map cannot go stale."""
    assert len(legacy.MODULES) == 51 and len(legacy.SYMBOLS) == 25  # every module of 0.1; the symbols that moved
    for new in legacy.MODULES.values():
        importlib.import_module(new)
    for old, new in legacy.SYMBOLS.items():
        module, _, name = new.rpartition(".")
        assert hasattr(importlib.import_module(module), name), f"{old} -> {new}"
        assert name == old.rpartition(".")[2]


@pytest.mark.parametrize(("old", "new"), [
    ("modules.models.fsdp2_shard", "recipes.modules.sharding.fsdp2_shard"),  # a symbol that moved wins
    ("modules.models.ModelSpec", "recipes.modules.models.ModelSpec"),  # the rest of its file did not move
    ("modules.sandbox_harness", "recipes.modules.code.sandbox.harness"),  # a module alone
    ("datamodules.tokenizer.load_tokenizer", "recipes.modules.tokenizer.load_tokenizer"),
    ("modules.judge.OpenAIJudge.score", "recipes.evaluate.judge.OpenAIJudge.score"),  # deeper than a symbol
    ("modules.MyModule", None), ("recipes.modules.sft.SFTModule", None), ("callbacks", None),
])
def test_new_path(old, new):
    assert legacy.new_path(old) == new


def test_checkpoint_hyperparameters_are_upgraded():
    hparams = {"class_path": "modules.ppo.PPOModule", "dict_kwargs": {
        "reward": {"class_path": "modules.rewards.CharacterFractionReward", "init_args": {"char": "a"}},
        "callbacks": [{"_class_path": "callbacks.ema_reference.EMAReference"}], "lr": 1.0}}
    assert legacy.upgrade_class_paths(hparams) == {"class_path": "recipes.modules.ppo.PPOModule", "dict_kwargs": {
        "reward": {"class_path": "recipes.modules.reward_functions.CharacterFractionReward", "init_args": {"char": "a"}},
        "callbacks": [{"_class_path": "recipes.callbacks.ema_reference.EMAReference"}], "lr": 1.0}}


def _old_cli_checkpoint(tmp_path):
    """(the fit's CLI, a checkpoint of it as 0.1's CLI wrote it: ``_class_path: modules.sft.SFTModule``, its args)."""
    common = ["--config", "yaml/tiny/sft.yaml", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
              "--trainer.callbacks", "[]", "--trainer.default_root_dir", str(tmp_path), "--data.init_args.max_rows",
              "40", "--trainer.limit_val_batches", "1"]
    cli = cli_main(["fit", *common, "--trainer.max_steps", "1", "--trainer.val_check_interval", "1"])
    ckpt = tmp_path / "old.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert state["hyper_parameters"]["_class_path"] == "recipes.modules.sft.SFTModule"
    state["hyper_parameters"]["_class_path"] = "modules.sft.SFTModule"
    torch.save(state, ckpt)
    return cli, ckpt, common


def test_old_cli_checkpoint_feeds_validate(tmp_path, caplog):
    """A checkpoint written by 0.1's CLI names its module ``modules.sft.SFTModule``: `validate` reads the new one."""
    _, ckpt, common = _old_cli_checkpoint(tmp_path)
    metrics = cli_main(["validate", *common, "--ckpt_path", str(ckpt)]).trainer.callback_metrics
    assert torch.isfinite(metrics["val/loss"])
    assert f"--ckpt_path {ckpt}: class_path 'modules.sft.SFTModule' read as 'recipes.modules.sft.SFTModule'" in caplog.text


def _old_classes() -> dict[str, type]:
    """Stand-ins for 0.1's specs: pickled as ``modules.models.ModelSpec`` / ``modules.models.LoRASpec``."""
    classes = {}
    for name in ("ModelSpec", "LoRASpec"):
        cls = type(name, (), {})
        cls.__module__, cls.__qualname__ = "modules.models", name
        classes[name] = cls
    return classes


def _as_old(spec: ModelSpec, classes: dict[str, type]) -> object:
    old = classes["ModelSpec"]()
    old.__dict__.update(dataclasses.asdict(spec), lora=classes["LoRASpec"]())
    old.lora.__dict__.update(dataclasses.asdict(spec.lora))
    return old


@pytest.fixture
def old_checkpoint(tmp_path, monkeypatch):
    """A Lightning-style checkpoint whose hyperparameters 0.1 pickled under ``modules.models``, and its new spec."""
    spec = ModelSpec(config={"model_type": "llama", "hidden_size": 8}, lora=LoRASpec(r=4, target_modules=["q_proj"]))
    state = {"policy.lm_head.weight": torch.arange(6.0).reshape(2, 3)}
    classes = _old_classes()
    path = tmp_path / "old.ckpt"
    with monkeypatch.context() as m:  # importable as 0.1 had it while saving only
        package, module = types.ModuleType("modules"), types.ModuleType("modules.models")
        module.__dict__.update(classes)
        package.models = module
        m.setitem(sys.modules, "modules", package)
        m.setitem(sys.modules, "modules.models", module)
        torch.save({"state_dict": state, "hyper_parameters": {"model": _as_old(spec, classes), "beta": 0.1}}, path)
    assert "modules.models" not in sys.modules or sys.modules["modules.models"] is not module
    return path, spec, state


def test_old_checkpoint_loads_with_weights_only(old_checkpoint):
    path, spec, state = old_checkpoint
    assert b"modules.models\nModelSpec" in path.read_bytes()  # the pickle (stored uncompressed) names the old class
    loaded = torch.load(path, weights_only=True)
    model = loaded["hyper_parameters"]["model"]
    assert type(model) is ModelSpec and type(model.lora) is LoRASpec
    assert model == spec and loaded["hyper_parameters"]["beta"] == 0.1
    torch.testing.assert_close(loaded["state_dict"], state)


def test_old_checkpoint_loads_through_export(old_checkpoint):
    path, _, state = old_checkpoint
    torch.testing.assert_close(load_module_state(str(path)), state)


def test_unpickling_an_old_class_without_weights_only_names_the_new_path(old_checkpoint, monkeypatch):
    """weights_only=False imports ``modules.models``, which 0.2 does not install; the message gives the new path."""
    path, _, _ = old_checkpoint
    # Nothing named modules.models, as in an install (a checkout's root holds a folder modules/ that would import).
    monkeypatch.setitem(sys.modules, "modules", None)
    with pytest.raises(ModuleNotFoundError) as error:
        try:
            torch.load(path, weights_only=False)
        except ModuleNotFoundError as e:
            legacy.explain_unpickling(e, str(path))
            raise
    assert str(error.value).startswith(f"{path}: written by rlhf-recipes 0.1, it pickles classes of 'modules.models', "
                                       "now 'recipes.modules.models' (rlhf-recipes 0.2 installs one package, recipes).")


def test_old_cli_checkpoint_loads_through_load_from_checkpoint(tmp_path, caplog):
    """``SFTModule.load_from_checkpoint`` of a 0.1 CLI checkpoint (``_class_path: modules.sft.SFTModule``, which
    Lightning refuses as not imported) loads as ``recipes.modules.sft.SFTModule``, with a warning naming both."""
    from recipes.modules.sft import SFTModule

    cli, ckpt, _ = _old_cli_checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING):
        loaded = SFTModule.load_from_checkpoint(ckpt, weights_only=True, tokenizer=cli.model.tokenizer)
    assert type(loaded) is SFTModule
    for name, tensor in cli.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert "class path 'modules.sft.SFTModule' (rlhf-recipes 0.1) read as 'recipes.modules.sft.SFTModule'" in caplog.text
