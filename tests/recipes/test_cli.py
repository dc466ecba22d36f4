"""The CLI and the shipped configs: every YAML parses, every tiny YAML fits, every module imports."""

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

from recipes import config_path
from recipes.__main__ import cli_main
from tests.conftest import REPO


def command_of(path: Path) -> str:
    """The `python -m recipes` subcommand a shipped YAML is written for (its own tests parse the non-Trainer ones)."""
    if path.parts[1] == "study":
        return "study"
    return "evaluate" if path.stem.startswith("eval") else "fit"


SHIPPED_YAML = sorted(p.relative_to(REPO) for p in (REPO / "yaml").rglob("*.yaml"))
ALL_YAML = [p for p in SHIPPED_YAML if command_of(p) == "fit"]
TINY_YAML = [p for p in ALL_YAML if p.parts[1] == "tiny"]
PACKAGES = ["recipes", "recipes.modules", "recipes.datamodules", "recipes.callbacks"]  # one import root


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "recipes", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0
    assert "{fit,validate,test,predict,study,evaluate}" in out.stdout  # each one a subcommand, not an epilog
    for sub in ("fit", "validate", "test", "predict", "study", "evaluate"):
        assert re.search(rf"^\s+{sub}\s+\S", out.stdout, re.M), sub  # listed with its help line


@pytest.mark.parametrize("path", ALL_YAML, ids=str)
def test_every_yaml_parses(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(REPO / path), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("path", TINY_YAML, ids=str)
def test_every_tiny_yaml_fits_two_steps(path, tmp_path):
    cli = cli_main(["fit", "--config", str(REPO / path), "--trainer.max_steps", "2", "--trainer.logger", "false",
                    "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.limit_val_batches", "1", "--trainer.callbacks", "[]"])
    assert cli.trainer.global_step == 2


def test_config_path_finds_shipped_yaml():
    assert config_path("yaml/tiny/sft.yaml") == config_path("tiny/sft.yaml")
    assert config_path("tiny/sft.yaml").exists()


def _modules_on_disk(pkg: str) -> set[str]:
    """Every module name under ``pkg``'s folders, found by walking the file system (sub-folders included)."""
    names = set()
    for root in importlib.import_module(pkg).__path__:
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            rel = os.path.relpath(folder, root)
            parts = [pkg] + ([] if rel == "." else rel.split(os.sep))
            names |= {".".join(parts + [f[:-3]]) if f != "__init__.py" else ".".join(parts)
                      for f in files if f.endswith(".py")}
    return names - {pkg}


def _raise(name: str) -> None:
    raise ImportError(f"walk_packages could not import {name}")


def test_every_module_imports():
    """Every module of the one import root imports, sub-packages at every depth included: the modules that
    walk_packages reaches (told to raise, not skip, when a sub-package fails to import) are exactly the .py files on
    disk, so a sub-package that is not recursed into, or not a package, fails here."""
    names, on_disk = set(), set()
    for pkg in PACKAGES:  # a source checkout maps modules/, datamodules/, callbacks/ into recipes from outside it
        mod = importlib.import_module(pkg)
        names |= {m.name for m in pkgutil.walk_packages(mod.__path__, prefix=f"{pkg}.", onerror=_raise)}
        on_disk |= _modules_on_disk(pkg)
    assert on_disk - names == set(), "modules on disk that the walk did not reach"
    assert {n for n in names if n.count(".") >= 3}, "no sub-sub-package module found"
    for name in sorted(names):
        if not name.endswith("__main__"):
            importlib.import_module(name)
    for nested in ("recipes.modules.code.sandbox.harness", "recipes.modules.code.execution", "recipes.evaluate.runner",
                   "recipes.study.runner", "recipes.paper.synthetic", "recipes.datamodules.collate"):
        assert nested in names, nested
    assert len(names) > 60


def test_tiny_sft_end_to_end_exports_a_generating_model(tmp_path):
    """The README's main job, shortened: trains, validation loss falls, checkpoint + HF export that generates."""
    import csv

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path / "run"
    cli = cli_main(["fit", "--config", "yaml/tiny/sft.yaml", "--trainer.max_steps", "60",
                    "--trainer.val_check_interval", "30", "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
                    "--data.init_args.max_length", "320"])
    log_dir = Path(cli.trainer.log_dir)
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 2 and val[-1] < val[0]
    assert list((log_dir / "checkpoints").glob("*.ckpt"))
    export = log_dir / "hf"
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    ids = tok("Write the word in capital letters.", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1] and torch.isfinite(model(out).logits).all()


def test_validate_test_and_export_from_checkpoint(tmp_path):
    """A checkpoint from fit feeds `validate` and `test`, and `recipes.export` turns it into an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from recipes.export import export_checkpoint

    root = tmp_path / "run"
    common = ["--config", "yaml/tiny/sft.yaml", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
              "--data.init_args.max_rows", "80"]
    cli = cli_main(["fit", *common, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3"])
    ckpt = cli.trainer.checkpoint_callback.last_model_path or cli.trainer.checkpoint_callback.best_model_path
    if not ckpt:
        ckpt = str(tmp_path / "manual.ckpt")
        cli.trainer.save_checkpoint(ckpt)
    for sub, key in (("validate", "val/loss"), ("test", "test/loss")):
        res = cli_main([sub, *common, "--ckpt_path", ckpt]).trainer.callback_metrics
        assert key in res and torch.isfinite(res[key])
    preds = tmp_path / "preds.jsonl"
    writer = {"class_path": "recipes.callbacks.prediction_writer.JSONLPredictionWriter", "init_args": {"path": str(preds)}}
    cli_main(["predict", *common, "--ckpt_path", ckpt, "--trainer.callbacks", json.dumps([writer]),
              "--model.init_args.max_new_tokens", "4", "--return_predictions", "false"])
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 4 and all(set(r) == {"prompt", "response"} for r in rows)  # the 5% held out of 80 rows
    assert all(r["prompt"].endswith("### Response:\n") and len(r["response"]) <= 4 for r in rows)  # 4 byte tokens
    config = Path(cli.trainer.log_dir) / "config.yaml"
    out = export_checkpoint(str(config), ckpt, str(tmp_path / "hf"))
    exported = AutoModelForCausalLM.from_pretrained(out)
    trained = cli.model.policy
    torch.testing.assert_close(exported.model.embed_tokens.weight, trained.model.embed_tokens.weight)
